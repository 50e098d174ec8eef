"""The last steps of the training augmentation, on the accelerator, inside the jitted train step.

Why: `augment.train_clip` (docs/data.md, "The recipe's views") spends most of a training clip's
host time after decoding: a bicubic resize of every frame and up to four colour changes, in float32
on the host's CPUs. Here the host only decodes the clip's square crop window
(`tf.io.decode_and_crop_jpeg`) and sends it as uint8, top-left aligned and zero-padded to a fixed
side P, with the clip's window side, flip and colour values; the device does the rest. The host's
share of a clip drops from decode + resize + colour to decode alone; the device's extra work is two
small matmuls per frame and a few elementwise passes.

What it reproduces, step for step (`augment.train_clip` after decoding, its colour step included):
1. `tf.image.resize(frames / 255, (S, S), "bicubic")` on the window. In TF2 without antialias that
   is `ResizeBicubic(half_pixel_centers=True)` (tensorflow/core/kernels/image/resize_bicubic_op.cc):
   source position (i + 0.5) * (window / S) - 0.5 in float32, Keys' cubic kernel with a = -0.5
   read from a 1024-step table (the fractional position is rounded to 1/1024, the table is computed
   in double and stored as float), taps outside the image weighted 0 and the remaining four weights
   renormalised to sum 1. `resize_weights` reproduces those weights bit for bit (same float32
   operations, same table); the rows are then applied as a matmul, so only the summation order
   differs from TF's four-tap loop. Using the exact Keys kernel instead of the table would move
   outputs by up to ~8e-4 (measured at 224 px); reproducing the table removes that.
2. Clip to [0, 1]; horizontal flip (folded into the width matrix: its rows reversed).
3. Colour, in the order brightness, saturation, gamma, hue, each applied or not:
   `clip(v * f, 0, 1)`; `clip(tf.image.adjust_saturation(v, f), 0, 1)`; `tf.image.adjust_gamma(v, g)`
   (= v ** g); `tf.image.adjust_hue(v, d)`. The two HSV ops follow TF's CPU float kernels
   (adjust_saturation_op.cc, adjust_hue_op.cc), which have their own RGB <-> HSV code, including a
   quirk of the saturation kernel: a colour whose hue rounds up to exactly 1.0 (red-most, blue a
   few ulps above green, e.g. (1, 0.5, 0.5 + 6e-8)) falls into no hue sector and comes out grey.
   `rgb_to_hsv` / `hsv_to_rgb` follow `tf.image.rgb_to_hsv` / `hsv_to_rgb` (colorspace_op.h).

Tolerance against the host chain (measured in tests/data/test_device_augment.py, float32 on CPU):
resize weights equal TF's exactly; resized pixels within ~1e-6 (summation order); the colour ops
within ~1e-6 of TF (a few ulps: XLA contracts a * b + c into FMAs, TF adds 2/6 and 4/6 in double,
the pow implementations differ); gamma < 1 magnifies the resize's ulps near 0, so the whole chain
is within ~1e-5. The source positions of the resize are kept out of FMA contraction
(`lax.optimization_barrier`), a cheap guard: a 1-ulp change there can move a weight by a table
step (~1.5e-3); the subtraction it protects is exact for all but the first positions, so without it
the weights on XLA:CPU still matched TF's for every window 1..256 -> 224.
The einsums run at `Precision.HIGHEST`: the default on TPU (bfloat16 passes) or on recent GPUs
(TF32) would round the weights to 8-10 bits.

Cost of the resize per clip of T frames, P-pixel padded windows, S-pixel output, C channels: the
height pass is 2 * S * P * (T * P * C) FLOPs and the width pass 2 * S * P * (T * S * C); for T = 8,
P = 256, S = 224, C = 3 that is 0.71 + 0.62 = 1.3 GFLOPs, under 0.5 % of ViT-B/16's forward pass
on an 8 x 224 clip and under 0.2 % of its training step (computed, not measured). The colour changes are a
few hundred elementwise operations per pixel, computed for the whole batch and selected per clip
with `jnp.where` (an untouched clip is bitwise unchanged).

Batch layout: video (B, T, P, P, C) uint8 (or float, taken as already in [0, 1]) with each clip's
window in [:window, :window] and zeros elsewhere (the padding must be finite: its weight is 0);
window (B,) int32 with 1 <= window <= P; flip (B,) bool/int; color (B, 4) float32 = (brightness
factor, saturation factor, gamma, hue delta), (1, 1, 1, 0) for a change not drawn.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_TABLE_SIZE = 1024           # resize_bicubic_op.cc: kTableSize
_KEYS_A = -0.5               # Keys' cubic kernel (half-pixel-centre mode)
_FLT_MIN = np.finfo(np.float32).tiny
IDENTITY = (1.0, 1.0, 1.0, 0.0)   # color values that mean "not applied"


def _keys_table() -> tuple[np.ndarray, np.ndarray]:
  """TF's table: near[i] = k(i / 1024), far[i] = k(1 + i / 1024), in double, stored as float32."""
  a = _KEYS_A
  x = (np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE).astype(np.float32).astype(np.float64)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  x = (x.astype(np.float32) + np.float32(1.0)).astype(np.float64)
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return near.astype(np.float32), far.astype(np.float32)


_NEAR, _FAR = _keys_table()


def resize_weights(window, padded: int, size: int) -> jax.Array:
  """(size, padded) float32: row i holds the weights of output pixel i over the padded axis.

  Reproduces ResizeBicubic(half_pixel_centers=True) of a `window`-long axis to `size`: the
  columns >= window are 0. `window` may be a traced int32 scalar.
  """
  window = jnp.asarray(window, jnp.int32)
  scale = window.astype(jnp.float32) / jnp.float32(size)            # CalculateResizeScale
  centre = (jnp.arange(size, dtype=jnp.float32) + 0.5) * scale
  centre = jax.lax.optimization_barrier(centre)                    # no FMA with the next line
  in_loc_f = centre - 0.5                                           # HalfPixelScaler
  in_loc_fl = jnp.floor(in_loc_f)
  offset = jnp.round((in_loc_f - in_loc_fl) * _TABLE_SIZE).astype(jnp.int32)   # lrintf
  near, far = jnp.asarray(_NEAR), jnp.asarray(_FAR)
  weights = jnp.stack([far[offset], near[offset], near[_TABLE_SIZE - offset],
                       far[_TABLE_SIZE - offset]], axis=-1)         # taps in_loc - 1 .. in_loc + 2
  taps = in_loc_fl.astype(jnp.int32)[:, None] + jnp.arange(-1, 3, dtype=jnp.int32)
  inside = (taps >= 0) & (taps < window)
  weights = jnp.where(inside, weights, 0.0)
  total = ((weights[:, 0] + weights[:, 1]) + weights[:, 2]) + weights[:, 3]
  renorm = jnp.abs(total) >= 1000.0 * _FLT_MIN
  inverse = 1.0 / jnp.where(renorm, total, 1.0)
  weights = jnp.where(renorm[:, None], weights * inverse[:, None], weights)
  columns = jnp.arange(padded, dtype=jnp.int32)
  # The in-range taps are distinct, so each entry is one weight plus exact zeros.
  onehot = taps[:, :, None] == columns
  return jnp.sum(jnp.where(onehot, weights[:, :, None], 0.0), axis=1)


def resize(frames, window, size: int, flip=None) -> jax.Array:
  """(B, T, P, P, C) windows, zero-padded -> float32 (B, T, size, size, C).

  uint8 input is divided by 255 first (as the host did), so the result is in [0, 1] up to the
  bicubic overshoot (not clipped here). `flip` (B,), optional, mirrors the width of a clip by
  reversing its width matrix, at no cost.
  """
  frames = jnp.asarray(frames)
  if frames.ndim != 5 or frames.shape[2] != frames.shape[3]:
    raise ValueError(f"frames must be (B, T, P, P, C) with square padded windows, got {frames.shape}")
  padded = frames.shape[2]
  x = frames.astype(jnp.float32)
  if frames.dtype == jnp.uint8:
    x = x / 255.0
  window = jnp.asarray(window, jnp.int32)
  w_rows = jax.vmap(resize_weights, in_axes=(0, None, None))(window, padded, size)   # (B, S, P)
  w_cols = w_rows
  if flip is not None:
    flip = jnp.asarray(flip).astype(bool)
    w_cols = jnp.where(flip[:, None, None], w_rows[:, ::-1, :], w_rows)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("bsp,btpqc->btsqc", w_rows, x, precision=hi)      # height: P -> S
  return jnp.einsum("brq,btsqc->btsrc", w_cols, x, precision=hi)   # width: P -> S


def _per_example(value, ndim: int) -> jax.Array:
  """A scalar, or a (B,) value broadcast against an array of rank `ndim` whose axis 0 is B."""
  value = jnp.asarray(value, jnp.float32)
  return value.reshape(value.shape + (1,) * (ndim - value.ndim)) if value.ndim else value


def _hue_and_value(r, g, b, norm_fn):
  """The hue in [0, 1] (exactly 1.0 possible, as in TF), saturation and value of TF's kernels."""
  vmax = jnp.maximum(r, jnp.maximum(g, b))
  span = vmax - jnp.minimum(r, jnp.minimum(g, b))
  sat = jnp.where(vmax > 0, span / jnp.where(vmax > 0, vmax, 1.0), 0.0)
  norm = norm_fn(jnp.where(span > 0, span, 1.0))
  hue = jnp.where(r == vmax, norm * (g - b),
                  jnp.where(g == vmax, norm * (b - r) + np.float32(2 / 6),
                            norm * (r - g) + np.float32(4 / 6)))
  hue = jnp.where(span > 0, hue, 0.0)
  hue = jnp.where(hue < 0, hue + 1.0, hue)
  return hue, sat, vmax


def rgb_to_hsv(rgb) -> jax.Array:
  """tf.image.rgb_to_hsv for float input (colorspace_op.h): (..., 3) -> (..., 3), h in [0, 1]."""
  rgb = jnp.asarray(rgb, jnp.float32)
  hue, sat, val = _hue_and_value(rgb[..., 0], rgb[..., 1], rgb[..., 2],
                                 lambda span: (1.0 / span) * np.float32(1 / 6))
  return jnp.stack([hue, sat, val], axis=-1)


def hsv_to_rgb(hsv) -> jax.Array:
  """tf.image.hsv_to_rgb for float input (colorspace_op.h)."""
  hsv = jnp.asarray(hsv, jnp.float32)
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  dh = h * 6.0
  dr = jnp.clip(jnp.abs(dh - 3.0) - 1.0, 0.0, 1.0)
  dg = jnp.clip(-jnp.abs(dh - 2.0) + 2.0, 0.0, 1.0)
  db = jnp.clip(-jnp.abs(dh - 4.0) + 2.0, 0.0, 1.0)
  one_s = -s + 1.0
  return jnp.stack([v * (one_s + s * dr), v * (one_s + s * dg), v * (one_s + s * db)], axis=-1)


def adjust_saturation(video, factor) -> jax.Array:
  """tf.image.adjust_saturation on float RGB (CPU kernel); `factor` a scalar or one per example."""
  video = jnp.asarray(video, jnp.float32)
  r, g, b = video[..., 0], video[..., 1], video[..., 2]
  h, s, v = _hue_and_value(r, g, b, lambda span: 1.0 / (6.0 * span))
  s = jnp.minimum(1.0, jnp.maximum(0.0, s * _per_example(factor, r.ndim)))
  # The kernel's sector form: hue 1.0 (sector 6) matches no sector and leaves (0, 0, 0) + m.
  c = s * v
  m = v - c
  dh = h * 6.0
  sector = jnp.floor(dh)
  fmodu = dh - 2.0 * jnp.floor(dh * 0.5)                  # the kernel's loops, exact
  x = c * (1.0 - jnp.abs(fmodu - 1.0))

  def channel(with_c, with_x):
    on_c = (sector == with_c[0]) | (sector == with_c[1])
    on_x = (sector == with_x[0]) | (sector == with_x[1])
    return jnp.where(on_c, c, jnp.where(on_x, x, 0.0)) + m

  return jnp.stack([channel((0, 5), (1, 4)), channel((1, 2), (0, 3)), channel((3, 4), (2, 5))],
                   axis=-1)


def adjust_hue(video, delta) -> jax.Array:
  """tf.image.adjust_hue on float RGB (CPU kernel); `delta` (fraction of the circle) per example."""
  video = jnp.asarray(video, jnp.float32)
  r, g, b = video[..., 0], video[..., 1], video[..., 2]
  # rgb_to_hv_range: the sector from the channels' order, then the position within it.
  r_lt_g = r < g
  sector = jnp.where(r_lt_g, jnp.where(b < r, 1, jnp.where(b > g, 3, 2)),
                     jnp.where(b < g, 0, jnp.where(b > r, 4, 5)))
  vmax = jnp.where(r_lt_g, jnp.where(b > g, b, g), jnp.where(b > r, b, r))
  vmin = jnp.where(r_lt_g, jnp.where(b < r, b, r), jnp.where(b < g, b, g))
  vmid = jnp.where(r_lt_g, jnp.where(b < r, r, jnp.where(b > g, g, b)),
                   jnp.where(b < g, g, jnp.where(b > r, r, b)))
  span = vmax - vmin
  ratio = (vmid - vmin) / jnp.where(span == 0, 1.0, span)
  even = sector % 2 == 0
  h = sector.astype(jnp.float32) + jnp.where(even, ratio, 1.0 - ratio)
  h = jnp.where(span == 0, 0.0, h)
  h = h + _per_example(delta, r.ndim) * 6.0
  for _ in range(2):                                      # |delta| <= 1: at most one turn each way
    h = jnp.where(h < 0, h + 6.0, h)
  for _ in range(2):
    h = jnp.where(h >= 6.0, h - 6.0, h)
  # hv_range_to_rgb
  sector = jnp.floor(h)
  ratio = h - sector
  ratio = jnp.where(jnp.fmod(sector, 2.0) == 0, ratio, 1.0 - ratio)
  vmid = vmin + ratio * span

  red = jnp.where((sector == 0) | (sector >= 5), vmax,
                  jnp.where((sector == 1) | (sector == 4), vmid, vmin))   # 5 and default: v_max
  green = jnp.where((sector == 1) | (sector == 2), vmax, jnp.where((sector == 0) | (sector == 3),
                                                                   vmid, vmin))
  blue = jnp.where((sector == 3) | (sector == 4), vmax,
                   jnp.where((sector == 2) | (sector >= 5), vmid, vmin))
  return jnp.stack([red, green, blue], axis=-1)


def color_jitter(video, color) -> jax.Array:
  """Brightness, saturation, gamma, hue in that order; `color` (B, 4), (1, 1, 1, 0) = untouched.

  A change whose value is its identity is not applied (a clip it skips is bitwise unchanged), as
  the host applied each change only when drawn.
  """
  video = jnp.asarray(video, jnp.float32)
  color = jnp.asarray(color, jnp.float32)
  brightness, saturation, gamma, hue = (color[:, i] for i in range(4))
  changes = (
      (brightness, 1.0, lambda v, f: jnp.clip(v * _per_example(f, v.ndim), 0.0, 1.0)),
      (saturation, 1.0, lambda v, f: jnp.clip(adjust_saturation(v, f), 0.0, 1.0)),
      (gamma, 1.0, lambda v, f: jnp.power(v, _per_example(f, v.ndim))),
      (hue, 0.0, adjust_hue),
  )
  for value, identity, change in changes:
    applied = _per_example(value != identity, video.ndim)
    video = jnp.where(applied, change(video, value), video)
  return video


def train_views(video_u8, window, flip, color, size: int) -> jax.Array:
  """The device half of `augment.train_clip`: float32 (B, T, size, size, 3) in [0, 1].

  video_u8 (B, T, P, P, 3): each clip's decoded crop window, top-left, zero-padded; window (B,)
  int32; flip (B,); color (B, 4) (see `color_jitter`). Resize, clip, flip, colour.
  """
  video = resize(video_u8, window, size, flip=flip)
  video = jnp.clip(video, 0.0, 1.0)
  return color_jitter(video, color)
