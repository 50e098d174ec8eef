"""Training on data-, fsdp- and model-parallel meshes gives the single-device losses and parameters."""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from msca_jax.train import mesh as mesh_lib
from msca_jax.train import state as state_lib
from tests import helpers


def _loss(logits, batch):
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def _train(shape, devices, steps=3):
  cfg = mesh_lib.mesh_config()
  cfg.shape = ml_collections.ConfigDict(shape)
  mesh = mesh_lib.make_mesh(cfg, devices)
  rules = mesh_lib.rules(cfg)
  model = helpers.small_model(name="msca", msca_targets="kv", shift_div=4)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
  clip = jax.ShapeDtypeStruct((8, 4, 32, 32, 3), jnp.float32)
  state, shardings = state_lib.create(model, tx, clip, mesh, rules, jax.random.key(0))
  train_step = state_lib.make_train_step(model, tx, _loss, shardings, mesh, rules)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    local = {"video": rng.uniform(-1, 1, (8, 4, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 7, 8).astype(np.int32)}
    state, metrics = train_step(state, mesh_lib.global_batch(local, mesh), jax.random.key(1))
    losses.append(float(metrics["loss"]))
  eval_step = state_lib.make_eval_step(model, shardings, mesh, rules)
  views = mesh_lib.global_batch({"video": rng.uniform(-1, 1, (8, 3, 4, 32, 32, 3)).astype(np.float32),
                                 "label": np.arange(8, dtype=np.int32)}, mesh)
  out = eval_step(state.params, views)
  np.testing.assert_array_equal(np.asarray(out["label"]), np.arange(8))  # rows stay with their labels
  return state, losses, np.asarray(out["logits"]), shardings


@functools.lru_cache(maxsize=1)
def _one_device():
  return _train(dict(data=1, fsdp=1, model=1), jax.devices()[:1])


# Data parallelism alone and a mesh of all three axes run through the whole trainer
# (tests/train/test_trainer.py, against one device): here the sharded parameter axes alone.
@pytest.mark.parametrize("shape", [dict(data=1, fsdp=8, model=1), dict(data=2, fsdp=1, model=4)],
                         ids=["fsdp", "model"])
def test_sharded_training_equals_one_device(shape):
  want_state, want_losses, want_eval, _ = _one_device()
  state, losses, evals, shardings = _train(shape, jax.devices())
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  chex.assert_trees_all_close(jax.device_get(state.params), jax.device_get(want_state.params),
                              atol=1e-5, rtol=1e-4)
  chex.assert_trees_all_close(jax.device_get(state.opt_state), jax.device_get(want_state.opt_state),
                              atol=1e-5, rtol=1e-4)
  np.testing.assert_allclose(evals, want_eval, atol=1e-5, rtol=1e-4)
  # The state lives where the rules put it, and the step kept it there.
  kernel = state.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert kernel.sharding == shardings.params["Transformer"]["encoderblock_0"]["MlpBlock_3"]["Dense_0"]["kernel"]
  assert int(state.step) == 3
