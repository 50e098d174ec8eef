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
interleaved on the patch index move (CLS never does). Two forms bring its cost near the head
axis's (docs/tpu_compile.md#the-patch-axis): the encoder holds the tokens grouped by
p % shift_div (`group_tokens`, once, before the position embedding), so the moving patches are
two contiguous runs, and since all heads of a moving patch move, its Q, K or V from frame t+s is
the projection of frame t+s's token: the input of those projections is shifted (one tensor for
K and V together). Every block is token-wise or attention, which is indifferent to the order of
its tokens, and CLS stays at position 0, so the logits are the same.

On the head axis, a head of frame t whose Q, K and V come from frames t+a, t+b, t+c with a, b, c
in {0, s} is the frame-wise attention of frame t+s once the inputs that stay in frame t are moved
back by -s: the attention runs within each frame and its output moves by +s. At a zero boundary
the moved output reads what the direct form's head computes there: a zero head where V lies
outside the clip, and where only Q and K do, zero logits, uniform weights, the mean of frame t's
V over its tokens (a small tensor, written into the two boundary frames); the frames whose
moved-back inputs came from outside are dropped by the last move. MSCA-QKV moves one tensor
instead of three; MSCA-KV, -QV and -QK move the staying input and the output instead of their two
targets, two for two, cheaper by the TPU compiler's estimate
(docs/tpu_compile.md#msca-at-vits-cost). MSCA-Q, -K and -V would move three tensors for one and
keep the direct form.

MSCA-KV, the paper's best variant, lets a few heads of frame t query the tokens
of the neighbouring frames: temporal cross-attention at the cost of ViT.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from msca_jax.models import shift

TARGETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
AXES = ("head", "patch")


def offsets(axis: str, *, num_tokens: int, num_heads: int, shift_div: int,
            grouped: bool = False) -> np.ndarray:
  """Where each (token, head, channel) slice of Q/K/V reads from, as {-1, 0, +1}; with
  `grouped`, the tokens are in `token_order`."""
  if axis == "head":
    return shift.head_fold_offsets(num_heads, shift_div)[None, :, None]
  if axis == "patch":
    pattern = shift.patch_interleave_offsets(num_tokens, shift_div)
    if grouped:
      pattern = pattern[token_order(num_tokens, shift_div)]
    return pattern[:, None, None]
  raise ValueError(f"msca_axis must be one of {AXES}, got {axis!r}")


def groups_tokens(axis: str) -> bool:
  """Whether the encoder holds its tokens in `token_order` rather than the image's."""
  return axis == "patch"


def token_order(num_tokens: int, shift_div: int) -> np.ndarray:
  """The image's token index at each grouped position: CLS, then patches by (p % shift_div, p)."""
  patch = np.arange(num_tokens - 1)
  return np.concatenate([[0], 1 + np.argsort(patch % shift_div, kind="stable")])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def group_tokens(x: jnp.ndarray, shift_div: int) -> jnp.ndarray:
  """x: (..., tokens, channels) in the image's order -> in `token_order`."""
  return jnp.concatenate([x[..., :1, :]] + [x[..., 1 + r::shift_div, :] for r in range(shift_div)],
                         axis=-2)


def ungroup_tokens(y: jnp.ndarray, shift_div: int) -> jnp.ndarray:
  """The inverse of `group_tokens`: y (..., tokens, channels) in `token_order` -> the image's."""
  patches = y.shape[-2] - 1
  sizes = [len(range(r, patches, shift_div)) for r in range(shift_div)]
  longest, starts = sizes[0], np.cumsum([1] + sizes)
  # Class r holds patches r, r + shift_div, ...: padded to one length, the classes are the
  # columns of the (longest, shift_div) grid of patches, read back row by row.
  leading = [(0, 0)] * (y.ndim - 2)
  columns = [jnp.pad(y[..., a:a + n, :], leading + [(0, longest - n), (0, 0)])
             for a, n in zip(starts, sizes)]
  grid = jnp.stack(columns, axis=-2)  # (..., longest, shift_div, channels)
  rows = grid.reshape(y.shape[:-2] + (longest * shift_div, y.shape[-1]))[..., :patches, :]
  return jnp.concatenate([y[..., :1, :], rows], axis=-2)


# The transpose of strided slices is a sum of strided pads, which XLA:TPU runs slowly, once per
# step but on the whole activation; the inverse permutation is a pad and a transpose.
group_tokens.defvjp(lambda x, shift_div: (group_tokens(x, shift_div), None),
                    lambda shift_div, _, cotangent: (ungroup_tokens(cotangent, shift_div),))


def projects_shifted_tokens(axis: str) -> bool:
  """Whether the variant moves the tokens before the projections rather than Q, K, V after."""
  return axis == "patch"


def cross_frame_tokens(x: jnp.ndarray, *, shift_div: int, boundary: shift.Boundary,
                       grouped: bool = False):
  """Patch axis: (x moved, where the moved tokens came from inside the clip, or None).

  Every head of a moving patch moves, so its Q, K or V from frame t+s is the projection of
  frame t+s's token: the projections named in the targets read the moved x (one tensor moved
  for K and V together, in x's layout rather than the attention's) and are zeroed where the
  token came from outside the clip (a projection of zeros would be the bias).
  x: (batch, time, tokens, width).
  """
  pattern = offsets("patch", num_tokens=x.shape[2], num_heads=1, shift_div=shift_div,
                    grouped=grouped)[:, :, 0]
  moved = shift.temporal_shift(x, pattern, boundary)
  if boundary == "circular":
    return moved, None
  return moved, shift.reads_inside(x.shape[1], pattern[:, 0])[:, :, None, None]


def cross_frame_qkv(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, targets: str, axis: str,
                    shift_div: int, boundary: shift.Boundary, output_form: bool = False):
  """Takes the projections named in `targets` from the neighbouring frames; with `output_form`,
  moves what the output form moves before the attention instead (`shifts_output`): the inputs
  that stay, from the frames on the other side.

  q, k, v: (batch, time, tokens, heads, head_dim), projected (bias included), tokens in the
  image's order. The model moves patch-axis inputs instead (`cross_frame_tokens`).
  """
  pattern = offsets(axis, num_tokens=q.shape[2], num_heads=q.shape[3], shift_div=shift_div)
  if output_form:
    targets, pattern = staying_inputs(targets), -pattern
  return tuple(
      shift.temporal_shift(x, pattern, boundary) if name in targets else x
      for name, x in zip("qkv", (q, k, v)))


def shifts_output(targets: str, axis: str) -> bool:
  """Whether the variant is computed by shifting the attention output of whole heads: head axis,
  and no more tensors moved that way (the output and the staying inputs) than the direct form
  moves."""
  return axis == "head" and 1 + len(staying_inputs(targets)) <= len(targets)


def staying_inputs(targets: str) -> str:
  """The output form's inputs moved backwards: those of Q, K and V that stay in the direct form."""
  return "".join(name for name in "qkv" if name not in targets)


def cross_frame_output(out: jnp.ndarray, v: jnp.ndarray, *, targets: str, shift_div: int,
                       boundary: shift.Boundary) -> jnp.ndarray:
  """The output form's last step, on frame-wise attention output out and the unmoved values v:
  (batch, time, tokens, heads, head_dim)."""
  pattern = offsets("head", num_tokens=out.shape[2], num_heads=out.shape[3], shift_div=shift_div)
  out = shift.temporal_shift(out, pattern, boundary)
  if boundary == "circular" or "v" in targets:
    return out
  # A moved head whose Q and K lie outside the clip attends uniformly to its own frame's tokens:
  # the frame t with t + s outside, of each (contiguous) run of heads moved by s.
  for step in (shift.FROM_NEXT, shift.FROM_PREVIOUS):
    heads = np.flatnonzero(pattern.reshape(-1) == step)
    if not heads.size:
      continue
    frame = int(np.flatnonzero(~shift.reads_inside(out.shape[1], np.asarray(step)))[0])
    values = v[:, frame:frame + 1, :, heads[0]:heads[-1] + 1]
    mean = jnp.mean(values, axis=2, keepdims=True, dtype=jnp.float32).astype(out.dtype)
    out = lax.dynamic_update_slice(out, jnp.broadcast_to(mean, values.shape),
                                   (0, frame, 0, int(heads[0]), 0))
  return out
