"""Which frames of a video make a clip: dense (the paper's) and uniform (TSN) sampling.

All functions are TensorFlow graph code on frame counts; they return int32 frame indices. They
work inside tf.function and tf.data map with a scalar int tensor for the video length.

Dense sampling takes T frames at a fixed stride s; indices past the end wrap around modulo the
video length, as the reference does (so a 3-frame video still gives a T-frame clip). Where the
clips start is chosen by `positions` (config.data.clip_positions):

- 'centred' (the default): in training the start is uniform over every position where the clip
  fits, [0, max(L - span, 0)] with span = (T - 1) * s + 1; evaluation takes N clips whose starts
  are the centres of N equal segments of that range, so the views cover the video evenly.
- 'reference': the rules of the reference code (TokShift-Transformer data/dataset.py, which the
  MSCA code inherits). Training starts uniformly in [0, L - T*s) (just 0 when that is empty or
  a single position); evaluation clip x of N starts at x * L // N, clipped to L - T*s + 1, and
  at 0 when the video has at most T*s frames (so all N clips of a short video are the same).

Uniform sampling splits the video into T equal segments and takes one frame from each: a random
one in training, and in evaluation clip k of N takes the frame at fraction (k + 0.5) / N of
every segment. It has no position rule.

docs/sampling.md compares the rules with worked examples.
"""

from __future__ import annotations

import tensorflow as tf

SAMPLINGS = ("dense", "uniform")
CLIP_POSITIONS = ("centred", "reference")


def check_positions(positions: str) -> None:
  if positions not in CLIP_POSITIONS:
    raise ValueError(f"config.data.clip_positions must be one of {CLIP_POSITIONS}, got {positions!r}")


def clip_span(num_frames: int, stride: int) -> int:
  """Frames covered by a dense clip, first to last inclusive."""
  return (num_frames - 1) * stride + 1


def dense_indices(video_length: tf.Tensor, num_frames: int, stride: int, start: tf.Tensor) -> tf.Tensor:
  return (start + tf.range(num_frames) * stride) % tf.maximum(video_length, 1)


def _reference_max_bound(video_length: tf.Tensor, num_frames: int, stride: int) -> tf.Tensor:
  """The reference's `max_bound = max(F - T*s + 1, 1)`."""
  return tf.maximum(tf.cast(video_length, tf.int32) - num_frames * stride + 1, 1)


def reference_train_start_range(video_length: tf.Tensor, num_frames: int,
                                stride: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(low, high_exclusive) of the reference's random training start; elementwise over lengths.

  The reference draws `randint(0, max_bound - 1)` and uses 0 when max_bound == 1; max_bound == 2
  gives randint(0, 1), also always 0. So the range is [0, max(max_bound - 1, 1)), never empty.
  """
  max_bound = _reference_max_bound(video_length, num_frames, stride)
  return tf.zeros_like(max_bound), tf.maximum(max_bound - 1, 1)


def reference_eval_starts(video_length: tf.Tensor, num_frames: int, stride: int,
                          num_clips: int) -> tf.Tensor:
  """(num_clips,) reference test starts: int(x * (F / N)) clipped to [0, max_bound], 0 if max_bound == 1."""
  video_length = tf.cast(video_length, tf.int32)
  max_bound = _reference_max_bound(video_length, num_frames, stride)
  # In float64, as the reference does (tick = 1.0 * F / N; int(x * tick)): for some N >= 14 that
  # lands one below x * F // N (docs/sampling.md), and the reference's value is the one we want.
  tick = tf.cast(video_length, tf.float64) / num_clips
  starts = tf.cast(tf.floor(tf.range(num_clips, dtype=tf.float64) * tick), tf.int64)
  starts = tf.cast(tf.clip_by_value(starts, 0, tf.cast(max_bound, tf.int64)), tf.int32)
  return tf.where(max_bound == 1, tf.zeros_like(starts), starts)


def dense_train(video_length: tf.Tensor, num_frames: int, stride: int, seed: tf.Tensor,
                positions: str = "centred") -> tf.Tensor:
  """One random clip. 'centred': start uniform in [0, max(L - span, 0)]; 'reference': see
  reference_train_start_range."""
  check_positions(positions)
  video_length = tf.cast(video_length, tf.int32)
  if positions == "reference":
    low, high = reference_train_start_range(video_length, num_frames, stride)
    start = tf.random.stateless_uniform([], seed, low, high, dtype=tf.int32)
  else:
    room = tf.maximum(video_length - clip_span(num_frames, stride), 0)
    start = tf.random.stateless_uniform([], seed, 0, room + 1, dtype=tf.int32)
  return dense_indices(video_length, num_frames, stride, start)


def dense_eval(video_length: tf.Tensor, num_frames: int, stride: int, num_clips: int,
               positions: str = "centred") -> tf.Tensor:
  """(num_clips, num_frames) indices. 'centred': starts at the centres of num_clips equal
  segments of the valid range; 'reference': see reference_eval_starts."""
  check_positions(positions)
  video_length = tf.cast(video_length, tf.int32)
  if positions == "reference":
    starts = reference_eval_starts(video_length, num_frames, stride, num_clips)
  else:
    room = tf.cast(tf.maximum(video_length - clip_span(num_frames, stride), 0), tf.float32)
    fractions = (tf.range(num_clips, dtype=tf.float32) + 0.5) / num_clips
    starts = tf.cast(tf.round(fractions * room), tf.int32)
  return tf.stack([dense_indices(video_length, num_frames, stride, s) for s in tf.unstack(starts)])


def _segment_positions(video_length: tf.Tensor, num_frames: int, offsets: tf.Tensor) -> tf.Tensor:
  """Frame at fraction `offsets` (in [0, 1)) of each of num_frames equal segments."""
  length = tf.cast(tf.maximum(video_length, 1), tf.float32)
  segment = length / num_frames
  positions = (tf.range(num_frames, dtype=tf.float32) + offsets) * segment
  return tf.minimum(tf.cast(tf.floor(positions), tf.int32), tf.cast(length, tf.int32) - 1)


def uniform_train(video_length: tf.Tensor, num_frames: int, seed: tf.Tensor) -> tf.Tensor:
  offsets = tf.random.stateless_uniform([num_frames], seed, 0.0, 1.0)
  return _segment_positions(video_length, num_frames, offsets)


def uniform_eval(video_length: tf.Tensor, num_frames: int, num_clips: int) -> tf.Tensor:
  return tf.stack([_segment_positions(video_length, num_frames, (k + 0.5) / num_clips)
                   for k in range(num_clips)])


def train_indices(sampling: str, video_length, num_frames: int, stride: int, seed,
                  positions: str = "centred") -> tf.Tensor:
  """`positions` (one of CLIP_POSITIONS) applies to dense sampling; uniform has no such rule."""
  check_positions(positions)
  if sampling == "dense":
    return dense_train(video_length, num_frames, stride, seed, positions)
  if sampling == "uniform":
    return uniform_train(video_length, num_frames, seed)
  raise ValueError(f"config.data.sampling must be one of {SAMPLINGS}, got {sampling!r}")


def eval_indices(sampling: str, video_length, num_frames: int, stride: int, num_clips: int,
                 positions: str = "centred") -> tf.Tensor:
  """`positions` (one of CLIP_POSITIONS) applies to dense sampling; uniform has no such rule."""
  check_positions(positions)
  if sampling == "dense":
    return dense_eval(video_length, num_frames, stride, num_clips, positions)
  if sampling == "uniform":
    return uniform_eval(video_length, num_frames, num_clips)
  raise ValueError(f"config.data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
