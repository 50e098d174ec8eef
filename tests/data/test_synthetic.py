"""The synthetic dataset: exact time-reversed class pairs, deterministic, with real motion."""

import numpy as np
import pytest

from msca_jax.data import synthetic
from msca_jax.data.errors import DataError


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
                                       dir=str(directory)))
  cfg.update(overrides)
  return cfg


def _files(root):
  """Every file under root, as paths relative to it."""
  import os
  return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  """The tiny dataset written twice (same config, other directories) and once with another seed."""
  base = tmp_path_factory.mktemp("synthetic")
  return (base, synthetic.ensure_dataset(_synthetic_config(base / "a")),
          synthetic.ensure_dataset(_synthetic_config(base / "b")),
          synthetic.ensure_dataset(_synthetic_config(base / "a", seed=2)))


def test_dataset_is_written_once_deterministically_as_frame_folders(written):
  import os
  from msca_jax.data import dmvr, frames
  base, first, again, other = written
  files = _files(first)
  assert files == _files(again)
  for name in files:   # same seed, same bytes
    assert open(os.path.join(first, name), "rb").read() == open(os.path.join(again, name), "rb").read()
  # The frame-folder layout: labels, a list and a manifest per split, one JPEG per frame.
  assert dmvr.read_labels(first) == list(synthetic.CLASSES)
  for split, count, offset in (("train", 24, 0), ("validation", 10, synthetic.EVAL_INDEX_OFFSET)):
    videos = frames.read_list(frames.list_path(first, split))
    assert videos.folders == tuple(f"{split}/{offset + i:010d}" for i in range(count))
    np.testing.assert_array_equal(videos.labels, [(offset + i) % 8 for i in range(count)])
    np.testing.assert_array_equal(videos.num_frames, [6] * count)
    assert not videos.problems
    manifest = frames.read_manifest(first, split)
    assert manifest["layout"] == "frames" and manifest["settings"]["short_side"] == 16
    assert manifest["settings"]["jpeg_quality"] == synthetic.JPEG_QUALITY
    assert sorted(os.listdir(os.path.join(first, videos.folders[0]))) == [
        frames.FrameNames().name(t) for t in range(6)]
  # Cached, not rewritten; another seed is another dataset; nothing temporary is left behind.
  stamp = os.path.getmtime(os.path.join(first, "train", "0000000000", "img_00001.jpg"))
  assert synthetic.ensure_dataset(_synthetic_config(base / "a")) == first
  assert os.path.getmtime(os.path.join(first, "train", "0000000000", "img_00001.jpg")) == stamp
  assert other != first and os.path.dirname(other) == os.path.dirname(first)
  a0 = open(os.path.join(first, "train", "0000000000", "img_00001.jpg"), "rb").read()
  assert open(os.path.join(other, "train", "0000000000", "img_00001.jpg"), "rb").read() != a0
  assert not [f for f in os.listdir(base / "a") if ".tmp" in f]
  assert not [f for f in _files(first) if ".tmp" in f]


@pytest.mark.parametrize("positions,dtype", [("reference", "uint8"), ("centred", "float32")])
def test_dataset_is_read_by_the_pipeline(written, positions, dtype):
  import tensorflow as tf
  from msca_jax.data import pipeline, sources
  from tests.data import shards
  base, first, _, _ = written
  data = shards.data_config("", source="synthetic", num_frames=4, image_size=16,
                            train_short_side_range=(16, 20), eval_short_side=16,
                            clip_positions=positions, dtype=dtype)
  data.synthetic = _synthetic_config(base / "a")
  source = sources.make_source(data, "validation")
  assert source.root == first and source.class_names == synthetic.CLASSES
  assert source.decode.short_side == 16 and source.decode.jpeg_quality == synthetic.JPEG_QUALITY
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(
      source, data, batch_size=4, num_clips=1, num_crops=1)))
  mask = np.concatenate([b["mask"] for b in batches]) == 1
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert mask.sum() == 10 and sorted(labels) == sorted(i % 8 for i in range(10))
  # The stored frames are the rendered clip (up to JPEG), so the pipeline sees the real motion.
  frames, label = synthetic.clip(1, synthetic.EVAL_INDEX_OFFSET, 6, 16)
  key = f"validation/{synthetic.EVAL_INDEX_OFFSET:010d}".encode()
  (clip, read_label), = [(v, l) for b in batches for v, l, k in zip(b["video"], b["label"], b["key"]) if k == key]
  assert clip.shape == (1, 4, 16, 16, 3) and read_label == label == 0
  shards.assert_pixels(clip, dtype)
  stored = np.stack([tf.io.decode_jpeg(tf.io.encode_jpeg(f, quality=synthetic.JPEG_QUALITY)).numpy()
                     for f in frames])
  # One clip of 4 of the 6 frames: the reference's starts at 0 (x * F // N with x = 0), the
  # centred one at the centre of the 6 - 4 + 1 = 3 valid starts, frame 1.
  start = 0 if positions == "reference" else 1
  np.testing.assert_allclose(shards.pixels(clip[0]), stored[start:start + 4],
                             atol=0.5 + 1e-3 if dtype == "uint8" else 0.01)
  # Training reads it too (the source is frame folders: random access).
  source = sources.make_source(data, "train")
  b = next(pipeline.as_numpy(pipeline.train_dataset(source, data, batch_size=4, seed=0)))
  assert b["video"].shape == (4, 4, 16, 16, 3) and set(b["label"]) <= set(range(8))
  shards.assert_pixels(b["video"], dtype)


def test_bad_synthetic_config_names_the_field(tmp_path):
  with pytest.raises(DataError, match="config.data.synthetic.train_size"):
    synthetic.ensure_dataset(_synthetic_config(tmp_path, train_size=0))
  assert not (tmp_path / "synthetic").exists() and not list(tmp_path.iterdir())
