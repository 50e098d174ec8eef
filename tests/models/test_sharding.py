"""The logical axis annotations shard the model on a device mesh without changing its results."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from msca_jax.train.mesh import DEFAULT_RULES as RULES
from tests import helpers


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 1, 4), (2, 2, 2)],
                         ids=["data", "fsdp", "model", "mixed"])
def test_sharded_forward_and_gradient_equal_single_device(mesh_shape):
  model = helpers.small_model(name="msca", msca_targets="kv", shift_div=4)
  clip = helpers.random_clip(batch=8, frames=4)
  boxed = model.init(jax.random.key(0), clip)["params"]
  params = nn.unbox(boxed)
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2)
  want = jax.jit(jax.value_and_grad(loss))(params, clip)

  mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "model"), axis_types=(AxisType.Auto,) * 3)
  param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, RULES)
  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(param_shardings, batch_sharding),
                   out_shardings=(NamedSharding(mesh, P()), param_shardings))
    got = step(jax.device_put(params, param_shardings), jax.device_put(clip, batch_sharding))
  kernel = got[1]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["kernel"]
  assert kernel.sharding == param_shardings["Transformer"]["encoderblock_0"][
      "MultiHeadDotProductAttention_1"]["query"]["kernel"]
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-4)
