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


# --- 'reference' clip positions (TokShift-Transformer data/dataset.py, inherited by MSCA) ---

CONFIGS = [(8, 32), (8, 8), (16, 4)]  # (T, s)
LENGTHS = range(1, 601)
SCALAR_INT = tf.TensorSpec([], tf.int32)


def ref_train_starts(frame_cnt, t_size, t_step):
  """Every start read_random_clip can draw (`np.random.randint(lo, hi)` draws from [lo, hi))."""
  max_bound = max(frame_cnt - t_size * t_step + 1, 1)
  return [0] if max_bound == 1 else list(range(0, max_bound - 1))


def ref_clip(frame_cnt, t_step, t_size, st_idx):
  return tuple((idx * t_step + st_idx) % frame_cnt for idx in range(t_size))  # without the +1


def ref_read_clip(frame_cnt, t_size, t_step, sample_times):
  """read_clip's frame indices (0-based), transcribed literally, float `tick` included."""
  max_bound = max(frame_cnt - t_size * t_step + 1, 1)
  tick = 1.0 * frame_cnt / sample_times
  st_idxs = np.clip(np.array([int(x * tick) for x in range(sample_times)]), 0, max_bound)
  return [ref_clip(frame_cnt, t_step, t_size, 0 if max_bound == 1 else int(st)) for st in st_idxs]


@pytest.mark.parametrize("t,stride", CONFIGS)
def test_reference_train_start_range_and_reachable_clips_match_the_reference(t, stride):
  lengths = np.array(LENGTHS)
  low, high = (x.numpy() for x in sampling.reference_train_start_range(tf.constant(lengths), t, stride))
  expected = [ref_train_starts(f, t, stride) for f in lengths]
  np.testing.assert_array_equal(low, [e[0] for e in expected])
  np.testing.assert_array_equal(high, [e[-1] + 1 for e in expected])

  @tf.function(input_signature=[SCALAR_INT])
  def clips_in_range(length):
    low, high = sampling.reference_train_start_range(length, t, stride)
    return sampling.dense_indices(length, t, stride, tf.range(low, high)[:, None])

  for f in LENGTHS:
    # One row per start, in order; the starts are distinct, so equal arrays mean equal sets.
    starts = np.array(ref_train_starts(f, t, stride))
    expected = (starts[:, None] + np.arange(t)[None] * stride) % f
    np.testing.assert_array_equal(clips_in_range(tf.constant(f)).numpy(), expected, err_msg=str(f))
  assert clips_in_range.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("t,stride", CONFIGS)
def test_reference_train_draws_stay_in_range_and_cover_small_ranges(t, stride):
  span = t * stride
  lengths = sorted({1, span - 1, span, span + 1, span + 2, span + 3, span + 5, span + 10, 600})
  seeds = tf.stack([tf.range(300), tf.fill([300], 7)], axis=1)

  @tf.function(input_signature=[SCALAR_INT, tf.TensorSpec([None, 2], tf.int32)])
  def draw(length, seeds):
    return tf.map_fn(lambda seed: sampling.train_indices("dense", length, t, stride, seed, "reference"),
                     seeds, fn_output_signature=tf.TensorSpec([t], tf.int32))

  for f in lengths:
    idx = draw(tf.constant(f), seeds).numpy()
    starts = idx[:, 0]
    allowed = ref_train_starts(f, t, stride)
    np.testing.assert_array_equal(idx, (starts[:, None] + np.arange(t)[None] * stride) % f)
    assert set(starts) <= set(allowed), f
    if len(allowed) <= 16:
      assert set(starts) == set(allowed), f
    else:
      assert len(set(starts)) > min(len(allowed), 300) // 2, f
  assert draw.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("t,stride", CONFIGS)
def test_reference_eval_matches_the_reference(t, stride):
  clip_counts = (1, 3, 10)

  @tf.function(input_signature=[SCALAR_INT])
  def views(length):
    return [sampling.eval_indices("dense", length, t, stride, n, "reference") for n in clip_counts]

  for f in LENGTHS:
    for n, idx in zip(clip_counts, views(tf.constant(f))):
      assert idx.shape == (n, t) and idx.dtype == tf.int32
      assert [tuple(c) for c in idx.numpy()] == ref_read_clip(f, t, stride, n), (f, n)
  assert views.experimental_get_tracing_count() == 1


def test_reference_short_videos_give_identical_eval_clips():
  # A 10 s Kinetics clip at 25 fps: 250 frames < 8 * 32, so all 10 clips start at frame 0.
  idx = sampling.dense_eval(tf.constant(250), 8, 32, 10, "reference").numpy()
  np.testing.assert_array_equal(idx, np.tile(np.arange(8) * 32, (10, 1)))
  # 300 frames: starts x * 30 clipped to max_bound = 300 - 256 + 1 = 45.
  idx = sampling.dense_eval(tf.constant(300), 8, 32, 10, "reference").numpy()
  np.testing.assert_array_equal(idx[:, 0], [0, 30, 45, 45, 45, 45, 45, 45, 45, 45])


def test_reference_eval_rounds_like_the_reference_float_tick():
  # The reference computes int(x * (F / N)) in floating point, which for some N >= 14 lands one
  # below x * F // N (here 7 * (122 / 14) = 60.999...): we reproduce the reference's value.
  idx = sampling.dense_eval(tf.constant(122), 1, 1, 14, "reference").numpy()
  assert idx[7, 0] == 60 == int(7 * (1.0 * 122 / 14)) and 7 * 122 // 14 == 61


def test_positions_work_inside_tf_data_map():
  lengths = tf.data.Dataset.from_tensor_slices(tf.constant([5, 250, 300, 600]))
  ds = lengths.map(lambda f: (sampling.train_indices("dense", f, 8, 32, tf.stack([f, 0]), "reference"),
                              sampling.eval_indices("dense", f, 8, 32, 3, "reference")))
  for f, (train, views) in zip([5, 250, 300, 600], ds):
    assert train.shape == (8,) and views.shape == (3, 8)
    assert int(train[0]) in ref_train_starts(f, 8, 32)
    assert [tuple(c) for c in views.numpy()] == ref_read_clip(f, 8, 32, 3)


def test_centred_is_the_default_and_unchanged():
  for f in (1, 250, 300):
    seed = tf.constant([5, 6])
    np.testing.assert_array_equal(sampling.dense_train(tf.constant(f), 8, 32, seed),
                                  sampling.train_indices("dense", tf.constant(f), 8, 32, seed, "centred"))
    np.testing.assert_array_equal(sampling.dense_eval(tf.constant(f), 8, 32, 10),
                                  sampling.eval_indices("dense", tf.constant(f), 8, 32, 10, "centred"))
  # Segment centres of the valid range [0, 300 - 225] (docs/sampling.md's table).
  idx = sampling.dense_eval(tf.constant(300), 8, 32, 10).numpy()
  np.testing.assert_array_equal(idx[:, 0], [4, 11, 19, 26, 34, 41, 49, 56, 64, 71])


def test_uniform_ignores_positions():
  seed = tf.constant([1, 2])
  np.testing.assert_array_equal(sampling.train_indices("uniform", tf.constant(100), 8, 4, seed, "reference"),
                                sampling.train_indices("uniform", tf.constant(100), 8, 4, seed))
  np.testing.assert_array_equal(sampling.eval_indices("uniform", tf.constant(100), 8, 4, 3, "reference"),
                                sampling.eval_indices("uniform", tf.constant(100), 8, 4, 3))


@pytest.mark.parametrize("call", [
    lambda: sampling.train_indices("dense", tf.constant(10), 8, 1, tf.constant([0, 0]), "center"),
    lambda: sampling.eval_indices("dense", tf.constant(10), 8, 1, 3, "tokshift"),
    lambda: sampling.dense_train(tf.constant(10), 8, 1, tf.constant([0, 0]), "Reference"),
    lambda: sampling.dense_eval(tf.constant(10), 8, 1, 3, "centered"),
])
def test_unknown_positions_names_the_field_and_the_choices(call):
  with pytest.raises(ValueError, match=r"config\.data\.clip_positions .*'centred', 'reference'"):
    call()
