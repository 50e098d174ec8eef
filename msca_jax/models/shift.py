"""Temporal shift: move slices of an activation to the neighbouring frame.

Every temporal model here (TokenShift, each MSCA variant) is the frame-wise ViT
plus one primitive: some slices of an activation take their value from frame
t+1 or t-1 instead of frame t. Which slices move is a static integer pattern,
so the shift is pure data movement with no gather.

When the pattern is a few contiguous runs along one axis (MSCA's head folds),
only the moving runs are read, shifted (a roll over time, masked at a zero
boundary) and written back into the activation in place (dynamic_update_slice),
with a VJP of the same form in the other direction: the heads that stay are
neither copied nor concatenated, forward or backward. Slicing every run and
concatenating them back made XLA:TPU copy K and V whole several times per block
(docs/tpu_compile.md has the compiler's estimates). A roll and a select of the
whole activation per direction, the general form for patterns of many runs
(the patch-axis interleave in the image's token order), writes two full rolled
copies. Every form gives bitwise the same values and gradients.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Boundary = Literal["zero", "circular"]
BOUNDARIES = ("zero", "circular")

# Offsets: +1 means "take frame t+1", -1 means "take frame t-1", 0 means "stay".
FROM_NEXT = 1
FROM_PREVIOUS = -1


# Above this many runs of equal offset (the patch-axis interleave), roll and select instead.
MAX_RUNS = 8


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
  if not offsets.any():
    return x
  runs = _runs(x, offsets)
  if runs is None:
    return roll_and_select(x, offsets, boundary)
  axis, pieces = runs
  moving = tuple((start, stop, step) for start, stop, step in pieces if step)
  return _shift_runs(x, axis, moving, boundary)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _shift_runs(x, axis: int, runs: tuple, boundary: Boundary):
  """x with each (start, stop, step) run along `axis` replaced by its frames t + step."""
  return _write_runs(x, axis, runs, boundary)


def _write_runs(x, axis: int, runs: tuple, boundary: Boundary):
  out = x
  for start, stop, step in runs:
    moved = _shift_frames(lax.slice_in_dim(x, start, stop, axis=axis), step, boundary)
    out = lax.dynamic_update_slice_in_dim(out, moved, start, axis)
  return out


def _shift_runs_fwd(x, axis, runs, boundary):
  return _write_runs(x, axis, runs, boundary), None


def _shift_runs_bwd(axis, runs, boundary, _, cotangent):
  # y[t] = x[t + s] (zero or wrapped outside the clip) is transposed by x[t] = y[t - s], alike.
  return (_write_runs(cotangent, axis, tuple((a, b, -s) for a, b, s in runs), boundary),)


_shift_runs.defvjp(_shift_runs_fwd, _shift_runs_bwd)


def _runs(x: jnp.ndarray, offsets: np.ndarray):
  """(axis of x, [(start, stop, offset)]) when the pattern varies along one axis in <= MAX_RUNS runs."""
  varying = [i for i, n in enumerate(offsets.shape) if n > 1]
  if len(varying) != 1:
    return None
  axis = x.ndim - offsets.ndim + varying[0]
  line = offsets.reshape(-1)
  if line.shape[0] != x.shape[axis]:
    return None
  starts = [0] + [i for i in range(1, len(line)) if line[i] != line[i - 1]]
  if len(starts) > MAX_RUNS:
    return None
  stops = starts[1:] + [len(line)]
  return axis, [(start, stop, int(line[start])) for start, stop in zip(starts, stops)]


def _shift_frames(y: jnp.ndarray, step: int, boundary: Boundary) -> jnp.ndarray:
  """y[:, t] <- y[:, t + step] for every slice of y: a roll over time, masked at a zero boundary."""
  moved = jnp.roll(y, -step, axis=1)  # moved[:, t] = y[:, t + step]
  if boundary == "zero":
    num_frames = y.shape[1]
    inside = reads_inside(num_frames, np.asarray(step))
    moved = jnp.where(inside.reshape((num_frames,) + (1,) * (y.ndim - 2)), moved, 0)
  return moved


def reads_inside(num_frames: int, offsets: np.ndarray) -> np.ndarray:
  """(num_frames, *offsets.shape) bool: frame t + offset lies inside the clip."""
  source = np.arange(num_frames).reshape((num_frames,) + (1,) * offsets.ndim) + offsets
  return (source >= 0) & (source < num_frames)


def roll_and_select(x: jnp.ndarray, offsets: np.ndarray, boundary: Boundary) -> jnp.ndarray:
  """The general form: per direction, roll the whole activation and select the moving slices."""
  out = x
  for step in (FROM_NEXT, FROM_PREVIOUS):
    selected = offsets == step
    if not selected.any():
      continue
    out = jnp.where(selected, _shift_frames(x, step, boundary), out)
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
  """Patch-axis pattern (our interpretation, docs/interpretations.md).

  Token 0 is the CLS token and never moves; patch p = token p + 1 reads from
  t+1 when p % shift_div == 0 and from t-1 when p % shift_div == 1.
  """
  offsets = np.zeros(num_tokens, np.int8)
  patch = np.arange(num_tokens - 1)
  offsets[1:][patch % shift_div == 0] = FROM_NEXT
  offsets[1:][patch % shift_div == 1] = FROM_PREVIOUS
  return offsets
