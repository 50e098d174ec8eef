"""Mesh construction from the config, logical rules, and global batches on 8 fake CPU devices."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msca_jax.train import mesh as mesh_lib
from tests import helpers


def _shape(**sizes):
  return ml_collections.ConfigDict(dict({"data": -1, "fsdp": 1, "model": 1}, **sizes))


def test_mesh_shape_resolves_minus_one_and_names_the_field():
  assert mesh_lib.mesh_shape(_shape(), 8) == (8, 1, 1)
  assert mesh_lib.mesh_shape(_shape(model=2), 8) == (4, 1, 2)
  assert mesh_lib.mesh_shape(_shape(data=2, fsdp=-1, model=2), 8) == (2, 2, 2)
  for bad, n in [(_shape(model=3), 8), (_shape(data=2, fsdp=2, model=1), 8), (_shape(fsdp=-1), 8),
                 (_shape(model=0), 8)]:
    with pytest.raises(ValueError, match="config.mesh.shape"):
      mesh_lib.mesh_shape(bad, n)


def test_rules_are_checked():
  cfg = mesh_lib.mesh_config()
  assert mesh_lib.rules(cfg) == mesh_lib.DEFAULT_RULES
  cfg.rules = (("embed", "tensor"),)
  with pytest.raises(ValueError, match="config.mesh.rules: 'embed' maps to unknown mesh axis 'tensor'"):
    mesh_lib.rules(cfg)


def test_params_follow_the_rules():
  cfg = mesh_lib.mesh_config()
  cfg.shape = _shape(data=2, fsdp=2, model=2)
  mesh = mesh_lib.make_mesh(cfg)
  model = helpers.small_model()
  abstract = jax.eval_shape(model.init, jax.random.key(0), helpers.random_clip(batch=2, frames=2))
  shardings = mesh_lib.tree_shardings(abstract["params"], mesh, mesh_lib.rules(cfg))
  block = shardings["Transformer"]["encoderblock_0"]
  assert block["MlpBlock_3"]["Dense_0"]["kernel"].spec == P("fsdp", "model")
  assert block["MultiHeadDotProductAttention_1"]["query"]["kernel"].spec == P("fsdp", "model", None)


@pytest.mark.parametrize("shape", [dict(), dict(data=2, fsdp=4), dict(data=4, model=2)])
def test_global_batch_is_the_local_batch_split_over_batch_axes(shape):
  cfg = mesh_lib.mesh_config()
  cfg.shape = _shape(**shape)
  mesh = mesh_lib.make_mesh(cfg)
  local = {"video": np.arange(16 * 3 * 2, dtype=np.float32).reshape(16, 3, 2),
           "label": np.arange(16, dtype=np.int32)}
  batch = mesh_lib.global_batch(local, mesh)
  np.testing.assert_array_equal(np.asarray(batch["video"]), local["video"])
  assert batch["video"].sharding.spec == P(("data", "fsdp"), None, None)
  shards = mesh_lib.batch_shards(mesh)
  assert {s.data.shape[0] for s in batch["label"].addressable_shards} == {16 // shards}
  mesh_lib.check_batch_size(16, mesh)
  bad = 16 + shards // 2
  with pytest.raises(ValueError, match=f"config.train.batch_size = {bad} must be divisible by the {shards}"):
    mesh_lib.check_batch_size(bad, mesh)
