"""Attention probabilities on request: what they hold, and that asking for none changes nothing."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import msca_kv
from msca_jax import models
from msca_jax.data import pipeline
from msca_jax.models import msca, vit
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import optim, state as state_lib, trainer
from msca_jax.data.decode import DecodeSettings
from tests import helpers


def _attention(model, params, clip) -> list[np.ndarray]:
  """Per layer (B, T, heads, tokens, tokens)."""
  _, state = model.apply({"params": params}, clip, mutable=["intermediates"])
  blocks = state["intermediates"]["Transformer"]
  return [np.asarray(blocks[f"encoderblock_{i}"]["MultiHeadDotProductAttention_1"]["attention"][0])
          for i in range(len(blocks))]


@pytest.mark.parametrize("variant", ["vit", "tokenshift", "msca_kv", "msca_q_patch"])
def test_probabilities_sum_to_one_and_leave_the_logits_alone(variant):
  model = helpers.small_model(**dict(helpers.ALL_VARIANTS)[variant])
  clip = helpers.random_clip()
  params = helpers.init_params(model, clip)
  layers = _attention(model, params, clip)
  assert len(layers) == helpers.SMALL["depth"]
  for probs in layers:
    assert probs.shape == (2, 4, 4, 17, 17) and probs.dtype == np.float32
    assert probs.min() >= 0
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  captured, _ = model.apply({"params": params}, clip, mutable=["intermediates"])
  np.testing.assert_allclose(captured, model.apply({"params": params}, clip), atol=1e-5)


def test_a_shifted_head_at_a_boundary_frame_is_uniform():
  """MSCA-KV, head axis, shift_div 4 of 4 heads: head 0 reads frame t+1, head 3 frame t-1."""
  model = helpers.small_model(**dict(helpers.ALL_VARIANTS)["msca_kv"])
  clip = helpers.random_clip(seed=1)
  params = helpers.init_params(model, clip, seed=1)
  tokens = 17
  for probs in _attention(model, params, clip):
    np.testing.assert_allclose(probs[:, -1, 0], 1 / tokens, atol=1e-6)   # keys of frame T: zeros
    np.testing.assert_allclose(probs[:, 0, 3], 1 / tokens, atol=1e-6)    # keys of frame -1: zeros
    # Inside the clip the same heads, and the unshifted heads everywhere, are not uniform.
    for far in (probs[:, 0, 0], probs[:, -1, 3], probs[:, 0, 1], probs[:, -1, 2]):
      assert np.abs(far - 1 / tokens).max() > 1e-3


@pytest.mark.parametrize("variant", ["vit", "msca_kv", "msca_qkv", "msca_v_patch"])
def test_probabilities_times_values_give_the_attention_output(variant):
  """The captured weights, applied to the (shifted) values, reproduce the default fused path."""
  overrides = dict(helpers.ALL_VARIANTS)[variant]
  temporal = models.temporal_mixing(helpers.small_config(**overrides))
  heads, width = 4, 64
  layer = vit.Attention(num_heads=heads, temporal=temporal, attention_impl="xla")
  x = jnp.asarray(np.random.RandomState(0).normal(size=(2, 4, 17, width)), jnp.float32)
  params = nn.unbox(layer.init(jax.random.key(0), x, False)["params"])
  expected = layer.apply({"params": params}, x, False)
  _, state = layer.apply({"params": params}, x, False, mutable=["intermediates"])
  probs = state["intermediates"]["attention"][0]                      # (B, T, heads, q, k)

  project = lambda name: (jnp.einsum("btnd,dhk->btnhk", x, params[name]["kernel"])
                          + params[name]["bias"])
  q, k, v = (project(name) for name in ("query", "key", "value"))
  _, _, v = msca.cross_frame_qkv(q, k, v, targets=temporal.msca_targets, axis=temporal.msca_axis,
                                 shift_div=temporal.shift_div, boundary=temporal.boundary) \
      if temporal.kind == "msca" else (q, k, v)
  heads_out = jnp.einsum("bthqk,btkhd->btqhd", probs, v)
  got = jnp.einsum("btqhd,hdw->btqw", heads_out, params["out"]["kernel"]) + params["out"]["bias"]
  np.testing.assert_allclose(got, expected, atol=2e-5)


def _hlo(lowered) -> str:
  """The program XLA compiles, without source locations (they differ between call sites): the
  same text compiles to the same HLO, so comparing it before compiling is the stronger check."""
  text = re.sub(r", metadata=\{[^}]*\}", "", lowered.as_text(debug_info=False))
  kept, skipping = [], False
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      skipping = True
    elif skipping and not line.strip():
      skipping = False
    elif not skipping:
      kept.append(line)
  return "\n".join(kept)


def _lowered_steps(config) -> tuple[str, str]:
  """The programs of the trainer's default train step and eval step."""
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.rules(config.mesh)
  model = models.build(config.model)
  tx = optim.make_optimizer(config.train, steps_per_epoch=10)
  abstract, shardings = state_lib.abstract_state(model, tx, models.clip_spec(config.model), mesh,
                                                 rules)
  window = (pipeline.device_window(config.data, DecodeSettings().short_side)
            if pipeline.augments_on_device(config.data) else None)
  train = trainer.make_train_step(config, model, tx, shardings, mesh, rules, window)
  evaluate = state_lib.make_eval_step(model, shardings, mesh, rules)
  batch = 8
  train_batch = {f.name: jax.ShapeDtypeStruct((batch,) + f.shape, jnp.dtype(f.dtype))
                 for f in pipeline.train_fields(config.data, window) if f.device}
  eval_batch = {f.name: jax.ShapeDtypeStruct((batch,) + f.shape, jnp.dtype(f.dtype))
                for f in pipeline.eval_fields(config.data, 1) if f.device}
  rng = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return (_hlo(train.jitted.lower(abstract, train_batch, rng)),
            _hlo(evaluate.jitted.lower(abstract.params, eval_batch)))


def test_capture_adds_nothing_to_the_train_and_eval_steps(monkeypatch):
  """The default steps lower to the same program as with the capture path cut out of Attention."""
  config = msca_kv.get_config("demo")
  config.model.depth = 1

  def unfused(*args):
    raise AssertionError("the default step took the unfused attention path")

  with monkeypatch.context() as patch:
    patch.setattr(vit.Attention, "_explicit_attention", unfused)
    default = _lowered_steps(config)
  with monkeypatch.context() as patch:
    patch.setattr(vit.Attention, "is_mutable_collection", lambda self, col: False)
    without_capture = _lowered_steps(config)
  assert default[0] == without_capture[0]
  assert default[1] == without_capture[1]
  # The check sees capture when it is there: the forward with 'intermediates' lowers otherwise.
  model = models.build(config.model)
  clip = jax.ShapeDtypeStruct((2, 8, 32, 32, 3), jnp.uint8)
  params = jax.eval_shape(model.init, jax.random.key(0), clip)["params"]
  plain = jax.jit(lambda p, x: model.apply({"params": p}, x)).lower(params, clip)
  captured = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["intermediates"])[0])
  assert _hlo(plain) != _hlo(captured.lower(params, clip))
