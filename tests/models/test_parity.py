"""Exact parity in float32 with the reference semantics, on random weights and clips.

(a) the ViT backbone against transformers' ViTModel (PyTorch, CPU) holding the same weights;
(b) TokenShift and every MSCA variant against tests/reference.py, an independent NumPy
    statement of docs/model.md that reads the reference PyTorch state-dict layout.
The weights reach our model through pretrained.load_torch_state_dict, so (b) also proves
the PyTorch converter for every variant.
"""

import itertools

import jax
import numpy as np
import pytest

from msca_jax import models, pretrained
from tests import helpers, reference

TOLERANCE = 1e-4  # max |logit difference|, float32 against float64


def _our_logits(overrides, state_dict, clip):
  model = models.build(helpers.small_config(**overrides))
  template = jax.eval_shape(model.init, jax.random.key(0), clip)["params"]
  grid = (clip.shape[2] // 8, clip.shape[3] // 8)
  params = pretrained.load_torch_state_dict(state_dict, template, grid=grid)
  return np.asarray(jax.jit(model.apply)({"params": params}, clip))


def _reference_logits(overrides, state_dict, clip):
  o = dict(overrides)
  return reference.forward(
      state_dict, np.asarray(clip, np.float64), num_heads=helpers.SMALL["num_heads"],
      model=o.pop("name"), shift_div=o.pop("shift_div", 4), msca_targets=o.pop("msca_targets", "kv"),
      msca_axis=o.pop("msca_axis", "head"), boundary=o.pop("boundary", "zero"))


CASES = [(name, dict(overrides, boundary=boundary))
         for (name, overrides), boundary in itertools.product(helpers.ALL_VARIANTS, ("zero", "circular"))]
# More heads moved (shift_div 2: two of four heads each way) and other TokenShift folds.
CASES += [("msca_kv_div2", dict(name="msca", msca_targets="kv", shift_div=2)),
          ("msca_q_patch_div3", dict(name="msca", msca_targets="q", msca_axis="patch", shift_div=3)),
          ("tokenshift_div8", dict(name="tokenshift", shift_div=8))]


@pytest.mark.parametrize("name,overrides", CASES, ids=[c[0] + "-" + c[1].get("boundary", "zero") for c in CASES])
def test_variant_matches_numpy_reference(name, overrides):
  state_dict = helpers.reference_state_dict(seed=3)
  clip = helpers.random_clip(seed=4, batch=2, frames=4)
  ours = _our_logits(overrides, state_dict, clip)
  want = _reference_logits(overrides, state_dict, clip)
  assert np.abs(want).max() > 0.1, "logits too small for the comparison to mean anything"
  np.testing.assert_allclose(ours, want, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("frames,height,width", [(1, 32, 32), (3, 16, 48), (6, 24, 40)])
def test_other_clip_shapes_match_numpy_reference(frames, height, width):
  overrides = dict(name="msca", msca_targets="qkv", shift_div=4)
  grid = (height // 8, width // 8)
  state_dict = helpers.reference_state_dict(seed=5, grid=grid)
  clip = helpers.random_clip(seed=6, batch=1, frames=frames, height=height, width=width)
  np.testing.assert_allclose(_our_logits(overrides, state_dict, clip),
                             _reference_logits(overrides, state_dict, clip), atol=TOLERANCE, rtol=0)


def test_vit_matches_transformers_vitmodel():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from benchmarks import torch_reference_benchmark
  s = helpers.SMALL
  config = torch_reference_benchmark.vit_config(
      width=s["width"], depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"],
      patch_size=s["patch_size"], image_size=32, attn_implementation="eager")
  torch.manual_seed(0)
  hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
  rng = np.random.RandomState(0)
  with torch.no_grad():  # randomise everything, LayerNorms and biases included
    for tensor in hf.state_dict().values():
      tensor.copy_(torch.from_numpy(rng.normal(0, 0.3, tensor.shape).astype(np.float32)))
  state_dict = reference.hf_vit_to_reference({k: v.numpy() for k, v in hf.state_dict().items()})
  state_dict["head.weight"] = rng.normal(0, 0.3, (s["num_classes"], s["width"])).astype(np.float32)
  state_dict["head.bias"] = rng.normal(0, 0.3, (s["num_classes"],)).astype(np.float32)

  clip = helpers.random_clip(seed=7, batch=2, frames=3)
  frames = torch.from_numpy(np.asarray(clip).reshape(6, 32, 32, 3).transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    cls = hf(pixel_values=frames).last_hidden_state[:, 0].numpy()
  frame_logits = cls @ state_dict["head.weight"].T + state_dict["head.bias"]
  want = frame_logits.reshape(2, 3, -1).mean(axis=1)

  ours = _our_logits(dict(name="vit"), state_dict, clip)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(ours, want, atol=TOLERANCE, rtol=0)
