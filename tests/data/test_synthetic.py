"""The synthetic dataset: exact time-reversed class pairs, deterministic, with real motion."""

import numpy as np
import pytest

from msca_jax.data import synthetic


def _shape_mask(frames):
  # Shapes have every channel >= 0.55 * 255; the background stays below 0.5 * 255.
  return frames.min(axis=-1) > 130


def _centroids(frames):
  mask = _shape_mask(frames)
  ys, xs = np.meshgrid(np.arange(frames.shape[1]), np.arange(frames.shape[2]), indexing="ij")
  return np.stack([(ys * m).sum() / m.sum() for m in mask]), np.stack([(xs * m).sum() / m.sum() for m in mask])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("label", [0, 2, 4, 6])
def test_each_class_is_its_partner_played_backwards(seed, label):
  params = synthetic.sample_params(np.random.default_rng(seed))
  forward = synthetic.render(params, label, num_frames=9)
  backward = synthetic.render(params, synthetic.partner(label), num_frames=9)
  np.testing.assert_array_equal(forward[::-1], backward)
  # So the frames of the two classes are the same set: nothing frame-wise tells them apart.
  assert not np.array_equal(forward, backward)


def test_clips_are_deterministic_and_balanced():
  a, label_a = synthetic.clip(seed=3, index=5)
  b, label_b = synthetic.clip(seed=3, index=5)
  np.testing.assert_array_equal(a, b)
  assert label_a == label_b == 5
  assert a.shape == (16, 32, 32, 3) and a.dtype == np.uint8
  assert not np.array_equal(synthetic.clip(seed=4, index=5)[0], a)
  labels = [synthetic.clip(seed=0, index=i, num_frames=2, size=8)[1] for i in range(16)]
  assert np.bincount(labels).tolist() == [2] * len(synthetic.CLASSES)


@pytest.mark.parametrize("seed", range(4))
def test_motion_goes_the_way_the_class_says(seed):
  params = synthetic.sample_params(np.random.default_rng(seed))
  render = lambda name: synthetic.render(params, synthetic.CLASSES.index(name), num_frames=8, size=48)
  _, x = _centroids(render("move_left"))
  assert x[-1] < x[0] - 2
  _, x = _centroids(render("move_right"))
  assert x[-1] > x[0] + 2
  y, _ = _centroids(render("move_up"))
  assert y[-1] < y[0] - 2
  y, _ = _centroids(render("move_down"))
  assert y[-1] > y[0] + 2
  area = _shape_mask(render("grow")).sum(axis=(1, 2))
  assert area[-1] > 1.5 * area[0]
  area = _shape_mask(render("shrink")).sum(axis=(1, 2))
  assert area[-1] < area[0] / 1.5


def test_rotation_direction_on_screen():
  # An arrow pointing up (angle 0: its tip is at -y) turns right under clockwise rotation.
  params = synthetic.ClipParams(shape="arrow", color=(1.0, 1.0, 1.0), background=(0.0, 0.0, 0.0),
                                center=(0.5, 0.5), size=0.3, angle=0.0, speed=1.0, noise_seed=0)
  frames = synthetic.render(params, synthetic.CLASSES.index("rotate_clockwise"), num_frames=3, size=64)
  before, _, after = _shape_mask(frames)
  top_half = slice(0, 28)
  right = lambda m: m[top_half, 32:].sum() - m[top_half, :32].sum()
  assert right(after) > right(before) + 20


def test_bad_label():
  params = synthetic.sample_params(np.random.default_rng(0))
  with pytest.raises(ValueError, match="label must be in"):
    synthetic.render(params, 8)


def _synthetic_config(directory, **overrides):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(seed=1, train_size=24, eval_size=10, video_frames=6, size=16,
                                       num_shards=3, dir=str(directory)))
  cfg.update(overrides)
  return cfg


def test_shards_are_written_once_deterministically_and_read_by_the_pipeline(tmp_path):
  import os
  from msca_jax.data import dmvr, pipeline, sources
  from tests.data import shards
  first = synthetic.ensure_shards(_synthetic_config(tmp_path / "a"))
  again = synthetic.ensure_shards(_synthetic_config(tmp_path / "b"))
  files = sorted(f for f in os.listdir(first))
  assert files == sorted(os.listdir(again))
  for name in files:   # same seed, same bytes
    assert open(os.path.join(first, name), "rb").read() == open(os.path.join(again, name), "rb").read()
  stamp = os.path.getmtime(os.path.join(first, "train-00000-of-00003"))
  assert synthetic.ensure_shards(_synthetic_config(tmp_path / "a")) == first   # cached, not rewritten
  assert os.path.getmtime(os.path.join(first, "train-00000-of-00003")) == stamp
  assert synthetic.ensure_shards(_synthetic_config(tmp_path / "a", seed=2)) != first
  assert dmvr.read_labels(first) == list(synthetic.CLASSES)
  assert not [f for f in os.listdir(tmp_path / "a") if ".tmp" in f]

  data = shards.data_config("", source="synthetic", num_frames=4, image_size=16,
                            train_short_side_range=(16, 20), eval_short_side=16)
  data.synthetic = _synthetic_config(tmp_path / "a")
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(
      sources.make_source(data, "validation"), data, batch_size=4, num_clips=1, num_crops=1)))
  labels = np.concatenate([b["label"] for b in batches])[np.concatenate([b["mask"] for b in batches]) == 1]
  assert sorted(labels) == sorted(i % 8 for i in range(10))
  # The stored frames are the rendered clip (up to JPEG), so the pipeline sees the real motion.
  frames, label = synthetic.clip(1, synthetic.EVAL_INDEX_OFFSET, 6, 16)
  key = f"synthetic/1/{synthetic.EVAL_INDEX_OFFSET}".encode()
  (clip, read_label), = [(v, l) for b in batches for v, l, k in zip(b["video"], b["label"], b["key"]) if k == key]
  assert clip.shape == (1, 4, 16, 16, 3) and read_label == label == 0
  # One centred clip of 4 of the 6 frames starts at frame 1: the stored JPEGs of those frames.
  import tensorflow as tf
  stored = np.stack([tf.io.decode_jpeg(tf.io.encode_jpeg(f, quality=95)).numpy() for f in frames])
  np.testing.assert_allclose((clip[0] + 1) / 2 * 255, stored[1:5], atol=0.01)


def test_bad_synthetic_config_names_the_field(tmp_path):
  from msca_jax.data import dmvr
  with pytest.raises(dmvr.DataError, match="config.data.synthetic.train_size"):
    synthetic.ensure_shards(_synthetic_config(tmp_path, train_size=0))
