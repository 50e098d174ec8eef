"""Bad input never crashes the pipeline and never reaches the model: each case is skipped and counted."""

import itertools
import os

import numpy as np
import pytest

from msca_jax.data import dmvr, pipeline, sources
from msca_jax.data.errors import DataError
from tests.data import shards

REASON = {name: i + 1 for i, name in enumerate(pipeline.SKIP_REASONS)}


def _good(i, num_frames=12):
  return dmvr.make_example(shards.jpegs(shards.video(i, num_frames)), i % 3, shards.CLASSES[i % 3], f"v{i}")


def _eval(directory, num_shards_expected=None):
  data = shards.data_config(directory)
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(
      sources.dmvr_source(directory, "validation"), data, batch_size=4, num_clips=1, num_crops=1)))
  cat = lambda k: np.concatenate([b[k] for b in batches])
  return cat("key")[cat("mask") == 1], pipeline.skip_summary(cat("error")), batches


def _train(directory, n_batches=6, batch_size=4, dtype="uint8"):
  data = shards.data_config(directory, dtype=dtype)
  batches = list(itertools.islice(pipeline.as_numpy(pipeline.train_dataset(
      sources.dmvr_source(directory, "validation"), data, batch_size=batch_size, seed=0)), n_batches))
  return batches, pipeline.StreamState.after(batches[-1])


def _assert_clean(batches, dtype="uint8"):
  for b in batches:
    shards.assert_pixels(b["video"], dtype)  # uint8, or finite floats in [-1, 1]
    # Real frames, not a zero placeholder, in every clip of the batch.
    assert (shards.pixels(b["video"]).reshape(len(b["video"]), -1).std(axis=1) > 0).all()


def _bad_jpeg_record():
  # As long as the clip, so that every clip needs the truncated frame (only used frames are decoded).
  frames = shards.jpegs(shards.video(99, num_frames=4))
  frames[2] = frames[2][: len(frames[2]) // 2]
  return dmvr.make_example(frames, 0, "a", "bad_jpeg")


CASES = {
    "undecodable": lambda: _bad_jpeg_record(),
    "not_a_jpeg": lambda: dmvr.make_example([b"not a jpeg"] * 12, 0, "a", "not_a_jpeg"),
    "not_a_sequence_example": lambda: b"\x08\x96\x01garbage that is no protocol buffer",
    "label_out_of_range": lambda: dmvr.make_example(shards.jpegs(shards.video(98)), 7, "zzz", "label7"),
    "negative_label": lambda: dmvr.make_example(shards.jpegs(shards.video(97)), -1, "", "label-1"),
    "no_frames": lambda: dmvr.make_example([], 1, "b", "empty"),
}
EXPECTED_REASON = {"undecodable": "undecodable", "not_a_jpeg": "undecodable",
                   "not_a_sequence_example": "undecodable", "label_out_of_range": "label_out_of_range",
                   "negative_label": "label_out_of_range", "no_frames": "no_frames"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_record_is_skipped_and_counted(tmp_path, case):
  records = [_good(i) for i in range(5)] + [CASES[case]()] + [_good(i) for i in range(5, 9)]
  shards.write(str(tmp_path), "validation", records=records, num_shards=2)
  keys, skipped, _ = _eval(str(tmp_path))
  assert sorted(keys) == sorted(f"v{i}".encode() for i in range(9))
  assert skipped == {r: int(r == EXPECTED_REASON[case]) for r in pipeline.SKIP_REASONS}
  batches, state = _train(str(tmp_path), n_batches=15)
  _assert_clean(batches)
  # 60 clips drawn from 10 records per epoch: the bad one came by several times, and was counted.
  assert state.skipped_by_reason()[EXPECTED_REASON[case]] >= 2
  assert sum(state.skipped) == state.skipped_by_reason()[EXPECTED_REASON[case]]
  labels = np.concatenate([b["label"] for b in batches])
  assert set(labels) <= {0, 1, 2}


@pytest.mark.parametrize("damage,dtype", [("truncated", "uint8"), ("flipped_byte", "float32")])
def test_corrupt_shard_keeps_the_readable_records_and_counts_the_loss(tmp_path, damage, dtype):
  paths = shards.write(str(tmp_path), "validation", records=[_good(i) for i in range(12)], num_shards=2)
  data = open(paths[1], "rb").read()
  middle = len(data) // 2
  if damage == "truncated":
    data = data[:middle]
  else:
    data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
  with open(paths[1], "wb") as f:
    f.write(data)
  keys, skipped, _ = _eval(str(tmp_path))
  # Shard 0 holds v0, v2, ...; shard 1 (v1, v3, ...) lost its second half.
  assert {f"v{i}".encode() for i in range(0, 12, 2)} <= set(keys)
  assert 6 < len(keys) < 12
  assert skipped["corrupt_shard"] == 1 and sum(skipped.values()) == 1
  batches, state = _train(str(tmp_path), n_batches=8, dtype=dtype)
  _assert_clean(batches, dtype)
  assert state.skipped_by_reason()["corrupt_shard"] >= 2   # once per epoch
  assert sum(state.skipped) == state.skipped_by_reason()["corrupt_shard"]


def test_a_video_shorter_than_the_clip_is_used_not_skipped(tmp_path):
  shards.write(str(tmp_path), "validation", records=[_good(0, num_frames=2), _good(1)], num_shards=1)
  keys, skipped, batches = _eval(str(tmp_path))
  assert sorted(keys) == [b"v0", b"v1"] and not any(skipped.values())
  assert batches[0]["video"].shape[2] == 4   # 4 frames from a 2-frame video: indices wrap around


def test_missing_and_empty_inputs_fail_at_start_up(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    sources.dmvr_source(str(tmp_path / "nowhere"), "train")
  os.makedirs(tmp_path / "empty")
  with pytest.raises(DataError, match="no shards for split 'train'"):
    sources.dmvr_source(str(tmp_path / "empty"), "train")
  paths = shards.write(str(tmp_path / "d"), "train", num_videos=6, num_shards=3)
  os.remove(paths[1])
  with pytest.raises(DataError, match=r"1 of 3 shards missing \(first: train-00001-of-00003\)"):
    sources.dmvr_source(str(tmp_path / "d"), "train")
  # Deleted after the listing: the pipeline says which file.
  paths = shards.write(str(tmp_path / "e"), "train", num_videos=6, num_shards=3)
  source = sources.dmvr_source(str(tmp_path / "e"), "train")
  os.remove(paths[2])
  with pytest.raises(DataError, match="train-00002-of-00003 does not exist"):
    pipeline.train_dataset(source, shards.data_config(str(tmp_path / "e")), batch_size=2, seed=0)
  shards.write(str(tmp_path / "f"), "train", num_videos=2, num_shards=1)
  os.remove(tmp_path / "f" / dmvr.LABELS_FILE)
  with pytest.raises(DataError, match="no label map"):
    sources.dmvr_source(str(tmp_path / "f"), "train")


def test_mixed_shard_counts_are_refused(tmp_path):
  shards.write(str(tmp_path), "train", num_videos=4, num_shards=2)
  shards.write(str(tmp_path), "train", num_videos=4, num_shards=4)
  with pytest.raises(DataError, match="mixes shard counts"):
    sources.dmvr_source(str(tmp_path), "train")


@pytest.mark.parametrize("field,value,message", [
    ("sampling", "random", "config.data.sampling"),
    ("eval_crops", 2, "config.data.eval_crops"),
    ("dtype", "float16", "config.data.dtype"),
    ("train_short_side_range", (10, 20), "train_short_side_range"),
    ("eval_short_side", 8, "config.data.eval_short_side"),
    ("stride", 0, "config.data.stride"),
])
def test_configuration_mistakes_fail_at_start_up(tmp_path, field, value, message):
  shards.write(str(tmp_path), "train", num_videos=2, num_shards=1)
  data = shards.data_config(str(tmp_path), **{field: value})
  with pytest.raises(DataError, match=message):
    pipeline.train_dataset(sources.dmvr_source(str(tmp_path), "train"), data, batch_size=2, seed=0)


def test_make_source_names_bad_fields(tmp_path):
  data = shards.data_config("")
  with pytest.raises(DataError, match="config.data.path"):
    sources.make_source(data, "train")
  data.source = "frames"
  with pytest.raises(DataError, match="config.data.path must name the frame-folder root"):
    sources.make_source(data, "train")
  data.path = str(tmp_path)
  with pytest.raises(DataError, match=f"video list {tmp_path}/train.txt does not exist"):
    sources.make_source(data, "train")
  data.source = "imagenet"
  with pytest.raises(DataError, match="config.data.source"):
    sources.make_source(data, "train")
