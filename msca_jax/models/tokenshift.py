"""TokenShift (Zhang, Hao, Ngo; ACM MM 2021), the baseline MSCA improves on.

Before attention and again before the MLP of every block, a quarter (1 /
shift_div) of the CLS token's channels is replaced by the same channels of
frame t+1 and another quarter by frame t-1. Patch tokens never move. The shift
acts on the residual stream itself, so it also persists in the skip path.
"""

from __future__ import annotations

import jax.numpy as jnp

from msca_jax.models import shift


def shift_cls_token(x: jnp.ndarray, *, shift_div: int, boundary: shift.Boundary) -> jnp.ndarray:
  """x: (batch, time, tokens, channels) residual stream; token 0 is CLS."""
  pattern = shift.channel_fold_offsets(x.shape[-1], shift_div)
  # The CLS channels are small, (batch, time, channels): one roll and select over all of them
  # fuses with the write-back into one kernel, as in the frame-wise ViT's step. The run form of
  # temporal_shift (for large activations such as MSCA's K and V) made XLA emit a kernel per run
  # here: 95 more kernels in the ViT-B/16 train step.
  return x.at[:, :, 0].set(shift.roll_and_select(x[:, :, 0], pattern, boundary))
