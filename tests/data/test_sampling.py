"""Frame indices of dense and uniform sampling, against direct NumPy statements of the rules."""

import numpy as np
import pytest
import tensorflow as tf

from msca_jax.data import sampling


@pytest.mark.parametrize("length", [1, 3, 50, 256, 300])
def test_dense_train_start_is_uniform_over_the_valid_range_and_wraps(length):
  t, stride = 8, 32
  span = sampling.clip_span(t, stride)
  starts = set()
  for s in range(200):
    idx = sampling.dense_train(tf.constant(length), t, stride, tf.constant([s, 1])).numpy()
    start = idx[0]
    starts.add(start)
    # T frames at the stride from the start, modulo the video length (the reference's wrap-around).
    np.testing.assert_array_equal(idx, (start + np.arange(t) * stride) % length)
    assert 0 <= start <= max(length - span, 0)
  room = max(length - span, 0)
  if room == 0:
    assert starts == {0}
  else:
    assert len(starts) > min(room, 100) // 2 and max(starts) <= room


def test_dense_train_is_deterministic_per_seed():
  a = sampling.dense_train(tf.constant(1000), 8, 4, tf.constant([3, 4])).numpy()
  b = sampling.dense_train(tf.constant(1000), 8, 4, tf.constant([3, 4])).numpy()
  c = sampling.dense_train(tf.constant(1000), 8, 4, tf.constant([3, 5])).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("length,clips", [(300, 10), (300, 1), (100, 3), (20, 4)])
def test_dense_eval_starts_are_segment_centres(length, clips):
  t, stride = 8, 4
  idx = sampling.dense_eval(tf.constant(length), t, stride, clips).numpy()
  room = max(length - sampling.clip_span(t, stride), 0)
  starts = np.round((np.arange(clips) + 0.5) / clips * room).astype(int)
  expected = (starts[:, None] + np.arange(t)[None] * stride) % length
  np.testing.assert_array_equal(idx, expected)
  assert idx.shape == (clips, t)


def test_uniform_sampling_takes_one_frame_per_segment():
  length, t = 100, 8
  seg = length / t
  for s in range(20):
    idx = sampling.uniform_train(tf.constant(length), t, tf.constant([s, 0])).numpy()
    # Frame i * seg .. (i + 1) * seg is segment i; a frame straddling a boundary may serve either.
    assert np.all(idx >= np.floor(np.arange(t) * seg)) and np.all(idx < np.ceil((np.arange(t) + 1) * seg))
  idx = sampling.uniform_eval(tf.constant(length), t, 2).numpy()
  np.testing.assert_array_equal(idx, np.floor((np.arange(t)[None] + np.array([[0.25], [0.75]])) * seg))
  # Shorter than T: frames repeat, never out of range.
  idx = sampling.uniform_eval(tf.constant(3), t, 1).numpy()
  assert idx.min() >= 0 and idx.max() <= 2 and np.all(np.diff(idx) >= 0)


def test_unknown_sampling_names_the_field():
  with pytest.raises(ValueError, match="config.data.sampling"):
    sampling.train_indices("random", tf.constant(10), 8, 1, tf.constant([0, 0]))
