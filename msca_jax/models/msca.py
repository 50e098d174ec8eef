"""MSCA: multi-head self/cross-attention across neighbouring frames.

The frame-wise ViT attends within each frame. MSCA keeps every weight and every
FLOP of that attention and changes only where some heads look: for a chosen
subset X of {Q, K, V}, a shifted head of frame t uses the projections in X from
frame t+1 or t-1 instead of frame t (zeros outside the clip):

    head_t^h = softmax(Q_{t+a}^h K_{t+b}^h^T / sqrt(d)) V_{t+c}^h,
    a, b, c = s_h for the projections in X and 0 for the others.

Head axis (the paper, official MSCA-KV code): with fold = num_heads // shift_div,
heads [0, fold) have s_h = +1 and the last fold heads s_h = -1.
Patch axis (our interpretation, docs/interpretations.md): every head, but patch tokens
interleaved on the patch index move (CLS never does).

When Q, K and V of a head all come from frame t+s (MSCA-QKV, head axis), the head is
frame t+s's own attention output: that output is shifted instead of Q, K and V, one tensor
moved instead of three, the same values (zero frames attend to zero values: a zero head).

MSCA-KV, the paper's best variant, lets a few heads of frame t query the tokens
of the neighbouring frames: temporal cross-attention at the cost of ViT.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from msca_jax.models import shift

TARGETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
AXES = ("head", "patch")


def offsets(axis: str, *, num_tokens: int, num_heads: int, shift_div: int) -> np.ndarray:
  """Where each (token, head, channel) slice of Q/K/V reads from, as {-1, 0, +1}."""
  if axis == "head":
    return shift.head_fold_offsets(num_heads, shift_div)[None, :, None]
  if axis == "patch":
    return shift.patch_interleave_offsets(num_tokens, shift_div)[:, None, None]
  raise ValueError(f"msca_axis must be one of {AXES}, got {axis!r}")


def cross_frame_qkv(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, targets: str, axis: str,
                    shift_div: int, boundary: shift.Boundary):
  """Takes the projections named in `targets` from the neighbouring frames.

  q, k, v: (batch, time, tokens, heads, head_dim), projected (bias included).
  """
  pattern = offsets(axis, num_tokens=q.shape[2], num_heads=q.shape[3], shift_div=shift_div)
  return tuple(
      shift.temporal_shift(x, pattern, boundary) if name in targets else x
      for name, x in zip("qkv", (q, k, v)))


def shifts_output(targets: str, axis: str) -> bool:
  """Whether the variant is computed by shifting the attention output of whole heads."""
  return targets == "qkv" and axis == "head"


def cross_frame_output(out: jnp.ndarray, *, shift_div: int, boundary: shift.Boundary) -> jnp.ndarray:
  """MSCA-QKV (head axis) from frame-wise attention output out: (batch, time, tokens, heads, head_dim)."""
  pattern = offsets("head", num_tokens=out.shape[2], num_heads=out.shape[3], shift_div=shift_div)
  return shift.temporal_shift(out, pattern, boundary)
