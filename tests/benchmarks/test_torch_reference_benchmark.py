"""The PyTorch reference of benchmarks.torch_reference_benchmark computes what our models do.

One random state dict in the reference PyTorch layout (docs/weights.md, every tensor random)
goes into our Flax model through pretrained.load_torch_state_dict and into the PyTorch reference
(transformers' ViTModel, plus the MSCA-KV attention) through load_reference_state_dict; logits
and the recipe's train step must agree.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from msca_jax.configs import recipe  # noqa: E402
from msca_jax import models, pretrained  # noqa: E402
from benchmarks import torch_reference_benchmark as trb  # noqa: E402
from msca_jax.train import optim  # noqa: E402
from tests import reference  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=8)
FRAMES, SIZE, CLASSES = 4, 32, 5
TOLERANCE = 1e-4

# (variant, shift_div, attention): MSCA-KV moves 1 head each way with shift_div 4 (as 12 // 12
# does at B/16), and all four heads with shift_div 2.
CASES = [("vit", 4, "sdpa"), ("vit", 4, "eager"), ("msca_kv", 4, "sdpa"), ("msca_kv", 4, "eager"),
         ("msca_kv", 2, "sdpa")]


def _state_dict(seed=0):
  return reference.random_state_dict(seed, **TINY, grid=(SIZE // 8, SIZE // 8), num_classes=CLASSES)


def _clip(seed=1, batch=2):
  return np.random.RandomState(seed).uniform(-1, 1, (batch, FRAMES, SIZE, SIZE, 3)).astype(np.float32)


def _flax(variant, shift_div, state_dict):
  name = "vit" if variant == "vit" else "msca"
  model = models.build(dict(name=name, msca_targets="kv", msca_axis="head", shift_div=shift_div,
                            variant="Ti/8", **TINY, num_classes=CLASSES, head_zeroinit=False))
  template = jax.eval_shape(model.init, jax.random.key(0), _clip())["params"]
  return model, pretrained.load_torch_state_dict(state_dict, template, grid=(SIZE // 8, SIZE // 8))


def _torch(variant, shift_div, state_dict, attention="sdpa"):
  torch.manual_seed(0)
  model = trb.build_model(variant, **TINY, image_size=SIZE, num_frames=FRAMES, num_classes=CLASSES,
                          shift_div=shift_div, attn_implementation=attention)
  trb.load_reference_state_dict(model, state_dict)
  return model


@pytest.mark.parametrize("variant,shift_div,attention", CASES)
def test_logits_match_our_model(variant, shift_div, attention):
  state_dict, clip = _state_dict(), _clip()
  model, params = _flax(variant, shift_div, state_dict)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, clip))
  with torch.no_grad():
    theirs = _torch(variant, shift_div, state_dict, attention).eval()(torch.from_numpy(clip)).numpy()
  assert np.abs(theirs).max() > 0.1, "logits too small for the comparison to mean anything"
  np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)


def test_msca_kv_moves_information_between_frames():
  state_dict, clip = _state_dict(), _clip()
  with torch.no_grad():
    vit = _torch("vit", 4, state_dict).eval()(torch.from_numpy(clip)).numpy()
    msca = _torch("msca_kv", 4, state_dict).eval()(torch.from_numpy(clip)).numpy()
    # shift_div larger than the number of heads moves nothing: exactly ViT.
    none_moved = _torch("msca_kv", 8, state_dict).eval()(torch.from_numpy(clip)).numpy()
  assert np.abs(msca - vit).max() > 0.05
  np.testing.assert_allclose(none_moved, vit, atol=1e-6, rtol=0)


def test_shift_heads_follows_the_official_msca_kv_rule():
  """Heads [0, fold) from t+1, the last fold from t-1, the rest stay; zeros outside the clip."""
  heads = torch.randn(2 * FRAMES, 4, 5, 8)  # (B*T, heads, tokens, head_dim)
  shifted = trb.shift_heads(heads, FRAMES, fold=1).view(2, FRAMES, 4, 5, 8)
  heads = heads.view(2, FRAMES, 4, 5, 8)
  torch.testing.assert_close(shifted[:, :-1, 0], heads[:, 1:, 0], rtol=0, atol=0)   # head 0 <- t+1
  torch.testing.assert_close(shifted[:, 1:, 3], heads[:, :-1, 3], rtol=0, atol=0)   # head 3 <- t-1
  torch.testing.assert_close(shifted[:, :, 1:3], heads[:, :, 1:3], rtol=0, atol=0)  # others stay
  assert not shifted[:, -1, 0].any() and not shifted[:, 0, 3].any()                  # zeros


def test_weight_mapping_agrees_with_the_independent_one():
  """load_reference_state_dict is the inverse of tests/reference.hf_vit_to_reference."""
  state_dict = _state_dict()
  model = _torch("vit", 4, state_dict)
  back = reference.hf_vit_to_reference({k: v.numpy() for k, v in model.vit.state_dict().items()})
  back.update({"head.weight": model.head.weight.detach().numpy(),
               "head.bias": model.head.bias.detach().numpy()})
  assert sorted(back) == sorted(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  with pytest.raises(KeyError, match="missing"):
    trb.load_reference_state_dict(model, {k: v for k, v in state_dict.items() if k != "head.bias"})


def test_train_step_matches_our_recipe():
  """Two steps of SGD momentum 0.9, clipping at 1.0 and label smoothing 0.1 end at the same weights."""
  lr, steps = 0.5, 2
  state_dict, clip = _state_dict(), _clip()
  labels = np.array([1, 3])
  model, params = _flax("msca_kv", 4, state_dict)
  train_cfg = recipe.get_config("msca").train
  train_cfg.update(batch_size=2, base_batch_size=2, grad_accum_steps=1, base_lr=lr)
  tx = optim.make_optimizer(train_cfg, steps_per_epoch=100)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    def loss_fn(p):
      logits = model.apply({"params": p}, clip, train=True)
      return optim.classification_loss(logits, labels, label_smoothing=0.1)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  ours = []
  for _ in range(steps):
    params, opt_state, loss, grad_norm = step(params, opt_state)
    ours.append(float(loss))
  assert float(grad_norm) > 1.0, "the clipping is not exercised"

  reference_model = _torch("msca_kv", 4, state_dict)
  torch_step = trb.make_train_step(reference_model, lr=lr)
  theirs = [torch_step(torch.from_numpy(clip), torch.from_numpy(labels)) for _ in range(steps)]
  np.testing.assert_allclose(theirs, ours, rtol=1e-5)

  reference_model.eval()
  with torch.no_grad():
    after = reference_model(torch.from_numpy(clip)).numpy()
  np.testing.assert_allclose(after, np.asarray(model.apply({"params": params}, clip)),
                             atol=TOLERANCE, rtol=0)


def test_command_line_times_both_steps_against_jax_and_writes_json(tmp_path):
  # One process for the command line and the alternating rounds against msca_jax (CI time).
  out = tmp_path / "torch.json"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.torch_reference_benchmark", "--variant=msca_kv",
       "--model_variant=Ti/8", "--width=32", "--depth=1", "--num_heads=4", "--mlp_dim=64",
       "--frames=4", "--image_size=32", "--batch=8", "--num_classes=5", "--shift_div=4",
       "--steps=2", "--warmup=1", "--threads=2", "--against_jax", f"--json={out}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "train_step" in result.stdout and "forward" in result.stdout
  assert "msca_jax / PyTorch" in result.stdout
  record = json.loads(out.read_text())
  assert record["variant"] == "msca_kv" and record["threads"] == 2 and record["batch"] == 8
  assert record["arch"] == dict(width=32, depth=1, num_heads=4, mlp_dim=64, patch_size=8)
  assert record["moved_heads_each_way"] == 1 and record["torch_version"] == torch.__version__
  assert record["params"] == sum(
      v.size for k, v in reference.random_state_dict(
          0, **dict(TINY, depth=1), grid=(4, 4), num_classes=5).items())
  for name in ("train_step", "forward"):
    r = record[name]
    assert len(r["times_s"]) == 2 and 0 < r["min_s"] <= r["median_s"]
    assert r["clips_per_s"] == pytest.approx(8 / r["median_s"])
  # The alternating rounds: one msca_jax step time per PyTorch one, the ratio their median.
  ours = record["msca_jax"]
  assert len(ours["train_step"]["times_s"]) == len(record["train_step"]["times_s"]) == 2
  ratios = [o / t for o, t in zip(ours["train_step"]["times_s"], record["train_step"]["times_s"])]
  assert ours["vs_pytorch"] == pytest.approx(float(np.median(ratios)))
  assert ours["attention"] == "xla" and ours["grad_accum_steps"] == 1
