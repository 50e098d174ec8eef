"""Clip-consistent decoding and augmentation (docs/data.md), in TensorFlow graph code.

Every random choice is drawn once per clip from a stateless seed and applied to all of its frames:
a flip, a crop or a colour change that differed between frames would itself be a motion signal,
which a temporal model would learn and a frame-wise one could not.

Training follows the reference recipe: horizontal flip (p = 0.5); short side resized (bicubic) to
a random integer in [lo, hi), then a random square crop; brightness, saturation, gamma and hue,
each with its own probability. Views come out in [0, 1]; the pipeline turns them into what the
batch carries (uint8 pixels by default, which the model maps to [-1, 1] on the device). The resize-then-crop is computed as crop-then-resize:
only the window that survives the crop is decoded (tf.io.decode_and_crop_jpeg) and resized, which
is the same distribution of views up to sub-pixel rounding of the crop offset, at a fraction of
the decoding and resizing cost.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

CROP_POSITIONS = {1: (0.5,), 3: (0.0, 0.5, 1.0)}   # fractions along the long side: left, centre, right


@dataclasses.dataclass(frozen=True)
class TrainAugment:
  """The recipe's training augmentation; the defaults are the reference's (docs/data.md)."""
  image_size: int = 224
  short_side_range: tuple[int, int] = (224, 330)   # [lo, hi) like the reference's randint
  flip_prob: float = 0.5
  color_prob: float = 0.1                          # each colour change on its own
  brightness: tuple[float, float] = (0.5, 2.0)     # multiplicative factor
  saturation: tuple[float, float] = (0.5, 3.0)
  gamma: tuple[float, float] = (0.8, 1.2)
  hue: tuple[float, float] = (-0.5, 0.5)           # fraction of the hue circle
  randaugment_layers: int = 0                      # RandAugment hook: 0 keeps it off
  randaugment_magnitude: float = 9.0

  def __post_init__(self):
    lo, hi = self.short_side_range
    if not 0 < lo < hi:
      raise ValueError(f"config.data.train_short_side_range must be [lo, hi) with 0 < lo < hi, "
                       f"got {self.short_side_range}")
    if lo < self.image_size:
      raise ValueError(f"config.data.train_short_side_range starts at {lo}, below the crop size "
                       f"{self.image_size}: the crop would not fit")


def decode_frames(jpegs: tf.Tensor) -> tf.Tensor:
  """uint8 (T, H, W, 3) from T JPEG strings."""
  return tf.map_fn(lambda b: tf.io.decode_jpeg(b, channels=3), jpegs,
                   fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def _uniform(seed, shape=(), lo=0.0, hi=1.0):
  return tf.random.stateless_uniform(shape, seed, lo, hi)


def _seeds(seed: tf.Tensor, n: int) -> list[tf.Tensor]:
  return tf.unstack(tf.random.experimental.stateless_split(seed, n))


# The colour changes in the order they apply, with the value that leaves a clip unchanged.
COLOR_CHANGES = ("brightness", "saturation", "gamma", "hue")
COLOR_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def train_view(jpegs: tf.Tensor, seed: tf.Tensor, aug: TrainAugment) -> dict[str, tf.Tensor]:
  """One clip's random view, drawn once for all its frames.

  {'crop': [y0, x0, window, window] of the source frames, 'flip': bool, 'color': (4,) values of
  COLOR_CHANGES, the identity where a change is not applied}. `train_clip` applies it on the
  host; the device path (device_augment.py) applies the same values in the train step.
  """
  s_size, s_crop, s_flip, s_color, _ = _seeds(seed, 5)
  shape = tf.io.extract_jpeg_shape(jpegs[0])
  height, width = shape[0], shape[1]
  lo, hi = aug.short_side_range
  short = tf.random.stateless_uniform([], s_size, lo, hi, dtype=tf.int32)
  scale = tf.cast(short, tf.float32) / tf.cast(tf.minimum(height, width), tf.float32)
  # The source window that becomes the S x S crop of the frame resized by `scale`.
  window = tf.cast(tf.round(aug.image_size / scale), tf.int32)
  window = tf.minimum(window, tf.minimum(height, width))
  oy, ox = tf.unstack(_uniform(s_crop, [2]))
  y0 = tf.cast(tf.floor(oy * tf.cast(height - window + 1, tf.float32)), tf.int32)
  x0 = tf.cast(tf.floor(ox * tf.cast(width - window + 1, tf.float32)), tf.int32)
  ranges = (aug.brightness, aug.saturation, aug.gamma, aug.hue)
  color = []
  for s, (lo_c, hi_c), identity in zip(_seeds(s_color, len(ranges)), ranges, COLOR_IDENTITY):
    s_apply, s_value = _seeds(s, 2)
    value = _uniform(s_value, (), lo_c, hi_c)
    color.append(tf.where(_uniform(s_apply) < aug.color_prob, value, identity))
  return {"crop": tf.stack([y0, x0, window, window]), "flip": _uniform(s_flip) < aug.flip_prob,
          "color": tf.stack(color)}


def decode_window(jpegs: tf.Tensor, crop: tf.Tensor) -> tf.Tensor:
  """uint8 (T, window, window, 3): only the crop window of each frame is decoded."""
  return tf.map_fn(lambda b: tf.io.decode_and_crop_jpeg(b, crop, channels=3), jpegs,
                   fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))


def train_clip(jpegs: tf.Tensor, seed: tf.Tensor, aug: TrainAugment) -> tf.Tensor:
  """T JPEG frames -> float32 (T, S, S, 3) in [0, 1], one random view for all frames."""
  view = train_view(jpegs, seed, aug)
  frames = decode_window(jpegs, view["crop"])
  video = tf.image.resize(tf.cast(frames, tf.float32) / 255.0, (aug.image_size, aug.image_size),
                          method="bicubic")
  video = tf.clip_by_value(video, 0.0, 1.0)
  video = tf.cond(view["flip"], lambda: tf.reverse(video, [2]), lambda: video)
  video = apply_color(video, view["color"])
  if aug.randaugment_layers:
    s_rand = _seeds(seed, 5)[4]
    video = randaugment(video, s_rand, aug.randaugment_layers, aug.randaugment_magnitude)
  return video


def apply_color(video: tf.Tensor, color: tf.Tensor) -> tf.Tensor:
  """Brightness, saturation, gamma, hue in that order; a change at its identity value is skipped."""
  changes = (
      lambda v, f: tf.clip_by_value(v * f, 0.0, 1.0),
      lambda v, f: tf.clip_by_value(tf.image.adjust_saturation(v, f), 0.0, 1.0),
      lambda v, f: tf.image.adjust_gamma(v, f),
      lambda v, f: tf.image.adjust_hue(v, f),
  )
  for value, identity, change in zip(tf.unstack(color), COLOR_IDENTITY, changes):
    video = tf.cond(tf.equal(value, identity), lambda v=video: v,
                    lambda v=video, f=value, c=change: c(v, f))
  return video


def eval_views(jpegs: tf.Tensor, indices: tf.Tensor, image_size: int, short_side: int,
               num_crops: int) -> tf.Tensor:
  """(clips, T) indices into `jpegs` -> float32 (clips * crops, T, S, S, 3) in [0, 1], clip-major.

  Frames are resized so the short side is `short_side`, then `num_crops` squares are taken along
  the long side (1: centre; 3: left/top, centre, right/bottom), all frames at the same place. A
  frame used by several clips (short videos, where the clips overlap) is decoded once.
  """
  if num_crops not in CROP_POSITIONS:
    raise ValueError(f"config.data eval crops must be 1 or 3, got {num_crops}")
  if short_side < image_size:
    raise ValueError(f"config.data.eval_short_side {short_side} is below the crop size {image_size}")
  num_clips, num_frames = indices.shape
  unique, position = tf.unique(tf.reshape(indices, [-1]))
  frames = decode_frames(tf.gather(jpegs, unique))
  height, width = tf.shape(frames)[1], tf.shape(frames)[2]
  scale = short_side / tf.cast(tf.minimum(height, width), tf.float32)
  new_h = tf.maximum(tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32), image_size)
  new_w = tf.maximum(tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32), image_size)
  frames = tf.image.resize(tf.cast(frames, tf.float32) / 255.0, tf.stack([new_h, new_w]),
                           method="bicubic")
  frames = tf.clip_by_value(frames, 0.0, 1.0)
  clips = tf.reshape(tf.gather(frames, position), [num_clips, num_frames, new_h, new_w, 3])
  views = []
  for clip in tf.unstack(clips):
    for crop in CROP_POSITIONS[num_crops]:
      # The crop moves along the long side; the short side is centred.
      long_is_width = new_w >= new_h
      y_room, x_room = new_h - image_size, new_w - image_size
      y0 = tf.where(long_is_width, y_room // 2, tf.cast(crop * tf.cast(y_room, tf.float32), tf.int32))
      x0 = tf.where(long_is_width, tf.cast(crop * tf.cast(x_room, tf.float32), tf.int32), x_room // 2)
      views.append(clip[:, y0:y0 + image_size, x0:x0 + image_size, :])
  video = tf.stack(views)
  return tf.ensure_shape(video, [num_clips * num_crops, num_frames, image_size, image_size, 3])


# ---------------------------------------------------------------------------------------------
# RandAugment hook (off by default): the same ops and magnitude for every frame of a clip.

def _affine(video: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Applies a 3x3 output->input pixel transform to every frame, zero fill outside."""
  t = tf.shape(video)[0]
  flat = tf.reshape(matrix, [9])[:8] / matrix[2, 2]
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=video, transforms=tf.tile(flat[None], [t, 1]), output_shape=tf.shape(video)[1:3],
      fill_value=0.5, interpolation="BILINEAR", fill_mode="CONSTANT")


def _about_centre(video: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  h, w = tf.cast(tf.shape(video)[1], tf.float32), tf.cast(tf.shape(video)[2], tf.float32)
  to_centre = tf.convert_to_tensor([[1.0, 0.0, w / 2], [0.0, 1.0, h / 2], [0.0, 0.0, 1.0]])
  from_centre = tf.convert_to_tensor([[1.0, 0.0, -w / 2], [0.0, 1.0, -h / 2], [0.0, 0.0, 1.0]])
  return _affine(video, to_centre @ matrix @ from_centre)


def _rand_ops(video: tf.Tensor, level: tf.Tensor) -> list:
  """(name, fn) pairs; `level` in [-1, 1] is the signed, scaled magnitude."""
  size = tf.cast(tf.shape(video)[1:3], tf.float32)
  angle = level * math.radians(30.0)
  rotation = tf.stack([[tf.cos(angle), -tf.sin(angle), 0.0], [tf.sin(angle), tf.cos(angle), 0.0],
                       [0.0, 0.0, 1.0]])
  shear, shift = level * 0.3, level * 0.45
  mean = tf.reduce_mean(video)
  low = tf.reduce_min(video, axis=[0, 1, 2])
  high = tf.reduce_max(video, axis=[0, 1, 2])
  bits = 8 - tf.cast(tf.abs(level) * 4, tf.int32)
  one, zero = tf.constant(1.0), tf.constant(0.0)
  return [
      lambda: video,
      lambda: tf.clip_by_value(video * (1 + level * 0.9), 0.0, 1.0),                 # brightness
      lambda: tf.clip_by_value((video - mean) * (1 + level * 0.9) + mean, 0.0, 1.0),  # contrast
      lambda: tf.clip_by_value(tf.image.adjust_saturation(video, 1 + level * 0.9), 0.0, 1.0),
      lambda: tf.where(video < 1 - tf.abs(level), video, 1 - video),                  # solarize
      lambda: tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(
          tf.cast(video * 255, tf.int32), 8 - bits), 8 - bits), tf.float32) / 255,     # posterize
      lambda: tf.clip_by_value((video - low) / tf.maximum(high - low, 1e-3), 0.0, 1.0),  # autocontrast
      lambda: _about_centre(video, rotation),
      lambda: _about_centre(video, tf.stack([[one, shear, zero], [zero, one, zero], [zero, zero, one]])),
      lambda: _about_centre(video, tf.stack([[one, zero, zero], [shear, one, zero], [zero, zero, one]])),
      lambda: _affine(video, tf.stack([[one, zero, shift * size[1]], [zero, one, zero], [zero, zero, one]])),
      lambda: _affine(video, tf.stack([[one, zero, zero], [zero, one, shift * size[0]], [zero, zero, one]])),
  ]


NUM_RAND_OPS = 12


def randaugment(video: tf.Tensor, seed: tf.Tensor, num_layers: int, magnitude: float) -> tf.Tensor:
  """`num_layers` random ops at `magnitude` (of 10) with random signs, on [0, 1] video."""
  for s in _seeds(seed, num_layers):
    s_op, s_sign = _seeds(s, 2)
    op = tf.random.stateless_uniform([], s_op, 0, NUM_RAND_OPS, dtype=tf.int32)
    sign = tf.where(_uniform(s_sign) < 0.5, -1.0, 1.0)
    video = tf.switch_case(op, _rand_ops(video, sign * magnitude / 10.0))
  return video


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix hook (off by default), on batches: each clip is mixed with the batch reversed.

def _beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  s1, s2 = _seeds(seed, 2)
  a = tf.random.stateless_gamma([], s1, alpha)
  b = tf.random.stateless_gamma([], s2, alpha)
  return a / (a + b)


def mix_batch(batch: dict, seed: tf.Tensor, mixup_alpha: float, cutmix_alpha: float) -> dict:
  """Adds 'label_mix' and 'mix_weight' (weight of 'label'); the loss mixes the two labels."""
  video = batch["video"]
  s_choice, s_lambda, s_box = _seeds(seed, 3)
  partner = tf.reverse(video, [0])
  use_cutmix = tf.logical_and(tf.constant(cutmix_alpha > 0),
                              tf.logical_or(tf.constant(mixup_alpha <= 0), _uniform(s_choice) < 0.5))
  lam = _beta(s_lambda, mixup_alpha if mixup_alpha > 0 else 1.0)

  def cutmix():
    h, w = tf.shape(video)[2], tf.shape(video)[3]
    lam_cut = _beta(s_lambda, cutmix_alpha if cutmix_alpha > 0 else 1.0)
    cut = tf.sqrt(1.0 - lam_cut)
    ch = tf.cast(cut * tf.cast(h, tf.float32), tf.int32)
    cw = tf.cast(cut * tf.cast(w, tf.float32), tf.int32)
    cy, cx = tf.unstack(tf.cast(_uniform(s_box, [2]) * tf.cast(tf.stack([h, w]), tf.float32), tf.int32))
    y0, y1 = tf.maximum(cy - ch // 2, 0), tf.minimum(cy + ch // 2, h)
    x0, x1 = tf.maximum(cx - cw // 2, 0), tf.minimum(cx + cw // 2, w)
    rows = tf.logical_and(tf.range(h) >= y0, tf.range(h) < y1)
    cols = tf.logical_and(tf.range(w) >= x0, tf.range(w) < x1)
    box = tf.logical_and(rows[:, None], cols[None, :])[None, None, :, :, None]
    kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
    return tf.where(box, partner, video), kept

  def mixup():
    # In float32 whatever the clips' dtype (uint8 or bfloat16 batches), then back.
    mixed = lam * tf.cast(video, tf.float32) + (1.0 - lam) * tf.cast(partner, tf.float32)
    if video.dtype == tf.uint8:
      mixed = tf.round(mixed)
    return tf.cast(mixed, video.dtype), lam

  mixed, weight = tf.cond(use_cutmix, cutmix, mixup)
  out = dict(batch)
  out["video"] = mixed
  out["label_mix"] = tf.reverse(batch["label"], [0])
  out["mix_weight"] = tf.fill(tf.shape(batch["label"]), weight)
  return out
