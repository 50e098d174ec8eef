"""The trainer's train and eval steps lower for TPU and for CUDA, from this CPU machine.

A platform-specific break (an op one backend lacks, a sharding annotation a backend rejects, a
remat policy that does not lower) then shows in CI, before anyone pays for a pod. Each step is
exported with `jax.export(platforms=("tpu", "cuda"))` from abstract shapes: nothing is allocated
and nothing compiles. Attention takes the XLA path (config.model.attention_impl='xla'); cuDNN's
fused kernel lowers only on a GPU (benchmarks/benchmark.py reports it there).

Every model lowers at B/16 width, heads and 8x224 clips in bfloat16, with the recipe's optimiser
and the device-side view finishing of the input stream, with two blocks: the blocks are one
program repeated, so two show every op and the boundary between blocks, at a sixth of the time.
ViT, TokenShift and MSCA-KV lower with remat on and off, and their eval steps; MSCA-KV with remat
also at full depth, the run users start on a pod. The other MSCA variants (both axes) lower their
train step without remat: remat and the eval step wrap the same blocks whatever the variant.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax import export

from msca_jax.configs import recipe
from msca_jax import models
from msca_jax.data import pipeline
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import optim, state as state_lib, trainer
from msca_jax.data.decode import DecodeSettings

PLATFORMS = ("tpu", "cuda")
BATCH = 8          # one clip per fake CPU device (tests/conftest.py), data parallel
MAIN = ("vit", "tokenshift", "msca_kv")
OTHER_MSCA = tuple(f"msca_{t}{axis}" for axis in ("", "_patch")
                   for t in ("q", "k", "v", "qk", "qv", "kv", "qkv")
                   if f"msca_{t}{axis}" not in MAIN)


def _config(variant: str, *, remat: bool, depth: int | None):
  name, targets, axis = _parse(variant)
  config = recipe.get_config(name)
  m = config.model
  if name == "msca":
    m.msca_targets, m.msca_axis = targets, axis
  m.dtype, m.remat, m.attention_impl = "bfloat16", remat, "xla"
  if depth is not None:
    m.depth = depth
  return config


def _parse(variant: str) -> tuple[str, str, str]:
  if not variant.startswith("msca_"):
    return variant, "kv", "head"
  parts = variant.split("_")
  return "msca", parts[1], "patch" if parts[-1] == "patch" else "head"


def _abstract_run(config):
  """(mesh, rules, model, optimiser, abstract state, shardings): nothing allocated."""
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.rules(config.mesh)
  model = models.build(config.model)
  tx = optim.make_optimizer(config.train, steps_per_epoch=100)
  abstract, shardings = state_lib.abstract_state(model, tx, models.clip_spec(config.model), mesh,
                                                 rules)
  return mesh, rules, model, tx, abstract, shardings


def _train_export(config) -> export.Exported:
  mesh, rules, model, tx, abstract, shardings = _abstract_run(config)
  window = (pipeline.device_window(config.data, DecodeSettings().short_side)
            if pipeline.augments_on_device(config.data) else None)
  step = trainer.make_train_step(config, model, tx, shardings, mesh, rules, window)
  batch = {f.name: jax.ShapeDtypeStruct((BATCH,) + f.shape, jnp.dtype(f.dtype))
           for f in pipeline.train_fields(config.data, window) if f.device}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return export.export(step.jitted, platforms=PLATFORMS)(abstract, batch, rng)


def _eval_export(config) -> export.Exported:
  mesh, rules, model, _, abstract, shardings = _abstract_run(config)
  step = state_lib.make_eval_step(model, shardings, mesh, rules)
  views = config.data.val_clips * config.data.val_crops
  batch = {f.name: jax.ShapeDtypeStruct((BATCH,) + f.shape, jnp.dtype(f.dtype))
           for f in pipeline.eval_fields(config.data, views) if f.device}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return export.export(step.jitted, platforms=PLATFORMS)(abstract.params, batch)


def _check(exported: export.Exported) -> None:
  assert exported.platforms == PLATFORMS
  text = exported.mlir_module()
  # bfloat16 compute reached the lowered program, and no host callback sneaked in.
  assert "bf16" in text
  assert "callback" not in text.lower()
  assert exported.nr_devices == jax.device_count()


@pytest.mark.parametrize("remat", [False, True], ids=["no_remat", "remat"])
@pytest.mark.parametrize("variant", MAIN)
def test_train_step_lowers_for_tpu_and_cuda_at_b16(variant, remat):
  config = _config(variant, remat=remat, depth=2)
  assert (config.model.variant, config.model.num_frames, config.model.image_size) == ("B/16", 8, 224)
  _check(_train_export(config))


def test_full_depth_msca_kv_with_remat_lowers():
  _check(_train_export(_config("msca_kv", remat=True, depth=None)))


@pytest.mark.parametrize("variant", MAIN)
def test_eval_step_lowers_for_tpu_and_cuda_at_b16(variant):
  config = _config(variant, remat=False, depth=2)
  _check(_eval_export(config))


@pytest.mark.parametrize("variant", OTHER_MSCA)
def test_every_msca_variant_lowers_for_tpu_and_cuda(variant):
  # Remat and the eval step wrap the same block whatever the variant; the main three cover them.
  _check(_train_export(_config(variant, remat=False, depth=2)))
