"""Which frames of a video make a clip: dense (the paper's) and uniform (TSN) sampling.

All functions are TensorFlow graph code on frame counts; they return int32 frame indices.

Dense sampling takes T frames at a fixed stride. In training the start is uniform over every
position where the clip fits; a video shorter than the clip's span starts at 0 and its indices
wrap around modulo the video length, as the reference does (so a 3-frame video still gives a
T-frame clip). Evaluation takes N clips whose starts are the centres of N equal segments of the
valid range, so the views cover the video evenly and symmetrically.

Uniform sampling splits the video into T equal segments and takes one frame from each: a random
one in training, and in evaluation clip k of N takes the frame at fraction (k + 0.5) / N of
every segment.
"""

from __future__ import annotations

import tensorflow as tf

SAMPLINGS = ("dense", "uniform")


def clip_span(num_frames: int, stride: int) -> int:
  """Frames covered by a dense clip, first to last inclusive."""
  return (num_frames - 1) * stride + 1


def dense_indices(video_length: tf.Tensor, num_frames: int, stride: int, start: tf.Tensor) -> tf.Tensor:
  return (start + tf.range(num_frames) * stride) % tf.maximum(video_length, 1)


def dense_train(video_length: tf.Tensor, num_frames: int, stride: int, seed: tf.Tensor) -> tf.Tensor:
  """One random clip: start uniform in [0, max(L - span, 0)]."""
  video_length = tf.cast(video_length, tf.int32)
  room = tf.maximum(video_length - clip_span(num_frames, stride), 0)
  start = tf.random.stateless_uniform([], seed, 0, room + 1, dtype=tf.int32)
  return dense_indices(video_length, num_frames, stride, start)


def dense_eval(video_length: tf.Tensor, num_frames: int, stride: int, num_clips: int) -> tf.Tensor:
  """(num_clips, num_frames) indices: starts at the centres of num_clips equal segments."""
  video_length = tf.cast(video_length, tf.int32)
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


def train_indices(sampling: str, video_length, num_frames: int, stride: int, seed) -> tf.Tensor:
  if sampling == "dense":
    return dense_train(video_length, num_frames, stride, seed)
  if sampling == "uniform":
    return uniform_train(video_length, num_frames, seed)
  raise ValueError(f"config.data.sampling must be one of {SAMPLINGS}, got {sampling!r}")


def eval_indices(sampling: str, video_length, num_frames: int, stride: int, num_clips: int) -> tf.Tensor:
  if sampling == "dense":
    return dense_eval(video_length, num_frames, stride, num_clips)
  if sampling == "uniform":
    return uniform_eval(video_length, num_frames, num_clips)
  raise ValueError(f"config.data.sampling must be one of {SAMPLINGS}, got {sampling!r}")
