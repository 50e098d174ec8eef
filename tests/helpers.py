"""Small models and clips shared by the tests."""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import msca_kv
from msca_jax import models
from tests import reference

# Tiny sizes: 4 heads so that shift_div 4 moves one head each way, as 12/12 does in B/16.
SMALL = dict(width=64, depth=2, num_heads=4, mlp_dim=96, patch_size=8, num_classes=7)
GRID = (4, 4)  # 32x32 frames, patch 8

MSCA_TARGETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
# (name, overrides) for every variant the zoo has.
ALL_VARIANTS = (
    [("vit", dict(name="vit")), ("tokenshift", dict(name="tokenshift", shift_div=4))]
    + [(f"msca_{t}", dict(name="msca", msca_targets=t, msca_axis="head", shift_div=4)) for t in MSCA_TARGETS]
    + [(f"msca_{t}_patch", dict(name="msca", msca_targets=t, msca_axis="patch", shift_div=4))
       for t in MSCA_TARGETS])


# The model of the end-to-end training runs, as flat config fields (for a config in process and
# for --config.KEY=VALUE flags alike): one block of width 32, 2 heads over 4 frames, and shift_div
# 2, so one head takes K/V from t-1 and one from t+1.
TINY_MODEL = {
    "model.depth": 1, "model.width": 32, "model.num_heads": 2, "model.mlp_dim": 64,
    "model.num_frames": 4, "model.shift_div": 2,
}


def tiny_config(fields: Mapping[str, Any], module=msca_kv, arg: str = "demo",
                **overrides) -> ml_collections.ConfigDict:
  """`module`'s config (a configs/ variant, msca_kv by default) for `arg`, with the flat `fields`
  (a test file's tiny run, e.g. {**TINY_MODEL, "train.num_steps": 4}) and then `overrides`."""
  config = module.get_config(arg)
  config.update_from_flattened_dict({**fields, **overrides})
  return config


def small_config(**overrides) -> dict:
  config = dict(name="vit", variant="Ti/8", head_zeroinit=False, **SMALL)
  config.update(overrides)
  return config


def small_model(**overrides):
  return models.build(small_config(**overrides))


def random_clip(seed: int = 0, batch: int = 2, frames: int = 4, height: int = 32, width: int = 32):
  rng = np.random.RandomState(seed)
  return jnp.asarray(rng.uniform(-1, 1, (batch, frames, height, width, 3)), jnp.float32)


def init_params(model, clip, seed: int = 0):
  return nn.unbox(model.init(jax.random.key(seed), clip)["params"])


def random_config_params(config) -> dict:
  """Random (seed 0) numpy params of config.model, as the inference tools' tests load them."""
  model = models.build(config.model)
  clip = np.zeros(models.clip_spec(config.model).shape, np.float32)
  return jax.tree.map(np.asarray, nn.unbox(jax.jit(model.init)(jax.random.key(0), clip)["params"]))


def saved_random_params(config, directory) -> tuple[dict, str]:
  """(params, checkpoint): random params of config.model saved where the tools read a checkpoint."""
  from msca_jax import pretrained
  params = random_config_params(config)
  return params, pretrained.save_params(str(directory), params)


def moving_square_video(num_frames: int = 30, height: int = 48, width: int = 64, seed: int = 0):
  """(T, H, W, 3) uint8 noise with a bright square moving right: frames and crops all differ."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 120, (num_frames, height, width, 3), dtype=np.uint8)
  for t in range(num_frames):
    x = 2 * t % (width - 12)
    frames[t, 16:28, x:x + 12] = 230
  return frames


def reference_state_dict(seed: int = 0, grid=GRID) -> dict:
  """Random weights of the SMALL model in the reference PyTorch layout."""
  s = SMALL
  return reference.random_state_dict(
      seed, width=s["width"], depth=s["depth"], num_heads=s["num_heads"], mlp_dim=s["mlp_dim"],
      patch_size=s["patch_size"], grid=grid, num_classes=s["num_classes"])


# Sharded or multi-process training is compared with a reference run parameter by parameter.
# Observed: every parameter within 1.2e-7, except the attention key biases. A key bias adds q.b_k
# to every logit of a query alike, which the softmax ignores: its gradient is zero up to rounding,
# and AdamW normalises that noise into lr-sized steps whose sign depends on the summation order
# (observed up to 2.4e-4 with the peak lr 5e-4). Those are only held to four peak-lr steps: there
# is no signal in them to compare.
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
KEY_BIAS_ATOL = 2e-3


def assert_trained_params_close(got: dict, want: dict) -> None:
  """{'a/b/kernel': array} trees of two training runs that should have done the same thing."""
  assert sorted(got) == sorted(want)
  for name in want:
    if name.endswith("/key/bias"):
      np.testing.assert_allclose(got[name], want[name], rtol=0, atol=KEY_BIAS_ATOL, err_msg=name)
    else:
      np.testing.assert_allclose(got[name], want[name], rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)
