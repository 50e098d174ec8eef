"""Temporal shift: move slices of an activation to the neighbouring frame.

Every temporal model here (TokenShift, each MSCA variant) is the frame-wise ViT
plus one primitive: some slices of an activation take their value from frame
t+1 or t-1 instead of frame t. Which slices move is a static integer pattern,
so the shift compiles to a roll and a select that XLA fuses into the producer of
the activation; no gather, no copy of the untouched slices.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

Boundary = Literal["zero", "circular"]
BOUNDARIES = ("zero", "circular")

# Offsets: +1 means "take frame t+1", -1 means "take frame t-1", 0 means "stay".
FROM_NEXT = 1
FROM_PREVIOUS = -1


def temporal_shift(x: jnp.ndarray, offsets: np.ndarray, boundary: Boundary = "zero") -> jnp.ndarray:
  """Returns y with y[:, t, ...] = x[:, t + offsets[...], ...].

  Args:
    x: (batch, time, *rest).
    offsets: static integer array in {-1, 0, +1}, broadcastable to `rest`,
      saying where each slice reads from.
    boundary: 'zero' makes frames outside the clip read as zeros (the reference
      behaviour); 'circular' wraps around the clip.
  """
  offsets = np.asarray(offsets)
  if offsets.ndim > x.ndim - 2:
    raise ValueError(f"offsets of shape {offsets.shape} do not broadcast to {x.shape[2:]}")
  if boundary not in BOUNDARIES:
    raise ValueError(f"boundary must be one of {BOUNDARIES}, got {boundary!r}")
  num_frames = x.shape[1]
  out = x
  for step in (FROM_NEXT, FROM_PREVIOUS):
    selected = offsets == step
    if not selected.any():
      continue
    moved = jnp.roll(x, -step, axis=1)  # moved[:, t] = x[:, t + step]
    if boundary == "zero":
      source = np.arange(num_frames) + step
      inside = (source >= 0) & (source < num_frames)
      moved = jnp.where(inside.reshape((num_frames,) + (1,) * (x.ndim - 2)), moved, 0)
    out = jnp.where(selected, moved, out)
  return out


def channel_fold_offsets(channels: int, shift_div: int) -> np.ndarray:
  """TokenShift's channel pattern: [0, fold) from t+1, [fold, 2 fold) from t-1."""
  fold = channels // shift_div
  offsets = np.zeros(channels, np.int8)
  offsets[:fold] = FROM_NEXT
  offsets[fold:2 * fold] = FROM_PREVIOUS
  return offsets


def head_fold_offsets(num_heads: int, shift_div: int) -> np.ndarray:
  """MSCA's head pattern: heads [0, fold) from t+1, the last fold heads from t-1."""
  fold = num_heads // shift_div
  offsets = np.zeros(num_heads, np.int8)
  if fold:
    offsets[:fold] = FROM_NEXT
    offsets[num_heads - fold:] = FROM_PREVIOUS
  return offsets


def patch_interleave_offsets(num_tokens: int, shift_div: int) -> np.ndarray:
  """Patch-axis pattern (our interpretation, README "Interpretations").

  Token 0 is the CLS token and never moves; patch p = token p + 1 reads from
  t+1 when p % shift_div == 0 and from t-1 when p % shift_div == 1.
  """
  offsets = np.zeros(num_tokens, np.int8)
  patch = np.arange(num_tokens - 1)
  offsets[1:][patch % shift_div == 0] = FROM_NEXT
  offsets[1:][patch % shift_div == 1] = FROM_PREVIOUS
  return offsets
