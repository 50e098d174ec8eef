"""The Kinetics TFDS builder on a tiny manual download made of PyAV-encoded videos."""

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from msca_jax.data import kinetics, video
from msca_jax.data.errors import DataError

HEADER = "label,youtube_id,time_start,time_end,split\n"
# Sorted, "abseiling" is class 0 although train.csv names "riding a bike" first.
CLASSES = ["abseiling", "riding a bike"]
SHORT_SIDE = 16  # the videos are 32x48, so frames come back 16x24
TINY = dict(name="tiny2", num_classes=2, fps=25.0, short_side=SHORT_SIDE)

# youtube_id -> (colour, frames, source fps, sub-folder); each video is one solid colour, so the
# colour read back says which video a record holds.
VIDEOS = {
    "aaa": ((200, 40, 40), 20, 25, "videos/riding a bike"),  # class-per-folder layout
    "bbb": ((40, 200, 40), 10, 10, ""),                       # 1 s at 10 fps: 25 frames at 25 fps
    "ccc": ((40, 40, 200), 12, 25, "videos"),
    "fff": ((200, 200, 40), 16, 25, "videos"),
    "ggg": ((40, 200, 200), 8, 25, "videos"),
}
EXPECTED = {  # video_id -> (label, frames after resampling to 25 fps)
    "aaa_000001_000011": (1, 20),
    "bbb_000002_000012": (0, 25),
    "ccc_000003_000013": (0, 12),
    "fff_000006_000016": (1, 16),
}


def _stem(youtube_id):
  start = ord(youtube_id[0]) - ord("a") + 1
  return f"{youtube_id}_{start:06d}_{start + 10:06d}"


def _row(label, youtube_id, split="train"):
  start = ord(youtube_id[0]) - ord("a") + 1
  return f"{label},{youtube_id},{start},{start + 10},{split}\n"


def _write_videos(manual, ids):
  for youtube_id in ids:
    colour, frames, fps, folder = VIDEOS[youtube_id]
    os.makedirs(os.path.join(manual, folder), exist_ok=True)
    clip = np.broadcast_to(np.array(colour, np.uint8), (frames, 32, 48, 3))
    video.write_video(os.path.join(manual, folder, _stem(youtube_id) + ".mp4"), clip, fps)


def _make_tiny_manual_dir(manual):
  """2 classes; the rows that must be skipped are all in place."""
  _write_videos(manual, VIDEOS)
  with open(os.path.join(manual, "videos", _stem("ddd") + ".mp4"), "wb") as f:
    f.write(os.urandom(2000))  # undecodable
  os.makedirs(os.path.join(manual, "annotations"))
  with open(os.path.join(manual, "annotations", "train.csv"), "w") as f:
    f.write(HEADER + _row("riding a bike", "aaa") + _row("abseiling", "bbb")
            + _row("abseiling", "ccc") + _row("abseiling", "ddd")  # garbage bytes
            + _row("riding a bike", "eee")                         # no video
            + _row("riding a bike", "aaa"))                        # repeated row
  with open(os.path.join(manual, "annotations", "validate.csv"), "w") as f:
    f.write(HEADER + _row("riding a bike", "fff", "val")
            + _row("juggling", "ggg", "val")                       # not a train class
            + _row("abseiling", "hhh", "val"))                     # no video
  with open(os.path.join(manual, "annotations", "test.csv"), "w") as f:
    f.write("youtube_id,time_start,time_end,split\nfff,6,16,test\n")  # no labels: no test split


class _Records(logging.Handler):

  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(manual dir, data dir, builder, log messages) of the 2-class dataset, prepared once."""
  root = tmp_path_factory.mktemp("kinetics")
  manual, data_dir = str(root / "manual"), str(root / "tfds")
  _make_tiny_manual_dir(manual)
  records = _Records()
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(records)
  try:
    builder = kinetics.prepare(manual, data_dir, kinetics.KineticsConfig(**TINY), workers=2)
  finally:
    absl_logger.removeHandler(records)
  return manual, data_dir, builder, records.messages


def _colour(jpeg):
  return tf.io.decode_jpeg(jpeg).numpy().reshape(-1, 3).mean(axis=0)


def _read(data_dir, name, split, **kwargs):
  ds = tfds.load(f"kinetics/{name}", split=split, data_dir=data_dir, download=False, **kwargs)
  return {ex["video_id"].decode(): ex for ex in tfds.as_numpy(ds)}


def test_splits_labels_and_class_names(tiny):
  _, _, builder, _ = tiny
  assert {k: s.num_examples for k, s in builder.info.splits.items()} == {"train": 3, "validation": 1}
  assert builder.info.features["label"].names == CLASSES
  assert builder.info.metadata["fps"] == 25.0 and builder.info.metadata["short_side"] == SHORT_SIDE


def test_skipped_rows_are_counted_and_logged(tiny):
  _, _, builder, messages = tiny
  assert builder.info.metadata["skipped"] == {
      "train": {"undecodable video": 1, "missing video": 1, "repeated row": 1},
      "validation": {"unknown label": 1, "missing video": 1},
  }
  train = next(m for m in messages if m.startswith("Kinetics train"))
  assert "3 of 6 rows written, 3 skipped" in train and _stem("ddd") in train
  assert _stem("eee") in train and "repeated row" in train
  val = next(m for m in messages if m.startswith("Kinetics validation"))
  assert "1 of 3 rows written" in val and "'juggling'" in val and _stem("hhh") in val


def test_skip_decoding_gives_one_jpeg_string_per_frame(tiny):
  _, data_dir, _, _ = tiny
  examples = {}
  for split in ("train", "validation"):
    ds = tfds.load("kinetics/tiny2", split=split, data_dir=data_dir, download=False,
                   decoders={"video": tfds.decode.SkipDecoding()})
    assert ds.element_spec["video"] == tf.TensorSpec((None,), tf.string)
    assert ds.element_spec["label"].dtype == tf.int64
    for ex in ds:
      examples[ex["video_id"].numpy().decode()] = ex
  assert sorted(examples) == sorted(EXPECTED)
  for video_id, ex in examples.items():
    label, num_frames = EXPECTED[video_id]
    assert int(ex["label"]) == label
    assert ex["video"].shape == (num_frames,)
    frame = tf.io.decode_jpeg(ex["video"][-1])
    assert frame.shape == (SHORT_SIDE, 24, 3)
    colour = VIDEOS[video_id[:3]][0]
    np.testing.assert_allclose(_colour(ex["video"][0]), colour, atol=12)


def test_decoded_videos(tiny):
  _, data_dir, _, _ = tiny
  examples = _read(data_dir, "tiny2", "train")
  for video_id, ex in examples.items():
    assert ex["video"].dtype == np.uint8
    assert ex["video"].shape == (EXPECTED[video_id][1], SHORT_SIDE, 24, 3)


def test_prepared_custom_config_loads_by_name(tiny):
  # 'tiny2' is not a registered config: TFDS reads the features and names back from the files.
  _, data_dir, _, _ = tiny
  builder = tfds.builder("kinetics/tiny2", data_dir=data_dir)
  assert builder.info.features["label"].names == CLASSES
  assert builder.info.features["label"].int2str(1) == "riding a bike"
  assert "16" in builder.info.config_description
  assert builder.info.metadata["skipped"]["validation"]["unknown label"] == 1


def test_registered_400_config_end_to_end(tmp_path):
  # 400 class names from train.csv; only two rows have a video, so decoding stays cheap.
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  _write_videos(manual, ["aaa", "bbb"])
  names = [f"class {i:03d}" for i in range(398)]
  with open(os.path.join(manual, "train.csv"), "w") as f:
    f.write(HEADER + _row("zumba", "aaa") + _row("abseiling", "bbb")
            + "".join(f"{n},missing{i},0,10,train\n" for i, n in enumerate(names)))
  with open(os.path.join(manual, "val.csv"), "w") as f:
    f.write(HEADER + _row("zumba", "bbb", "val"))
  with open(os.path.join(manual, "test.csv"), "w") as f:
    f.write(HEADER + _row("abseiling", "aaa", "test"))  # labelled: a test split
  kinetics.prepare(manual, data_dir, "400", workers=1)

  builder = tfds.builder("kinetics/400", data_dir=data_dir)
  assert builder.info.features["label"].names == sorted(names + ["zumba", "abseiling"])
  assert {k: s.num_examples for k, s in builder.info.splits.items()} == {
      "train": 2, "validation": 1, "test": 1}
  assert builder.info.metadata["skipped"]["train"] == {"missing video": 398}
  examples = _read(data_dir, "400", "train", decoders={"video": tfds.decode.SkipDecoding()})
  assert int(examples[_stem("aaa")]["label"]) == 399  # 'zumba' sorts last
  assert int(examples[_stem("bbb")]["label"]) == 0
  assert examples[_stem("aaa")]["video"].shape == (20,)
  # Short side 256 by default: the 32x48 video is upscaled.
  assert tf.io.decode_jpeg(examples[_stem("bbb")]["video"][0]).shape == (256, 384, 3)


def test_class_count_mismatch_names_the_csv_and_both_numbers(tiny, tmp_path):
  manual, _, _, _ = tiny
  builder = tfds.builder("kinetics/400", data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"train\.csv names 2 classes but config '400' expects 400"):
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual))


def test_missing_csv(tmp_path):
  manual = tmp_path / "manual"
  _write_videos(str(manual), ["aaa"])
  (manual / "train.csv").write_text(HEADER + _row("abseiling", "aaa"))
  with pytest.raises(DataError, match=r"no validation annotation CSV .*validate\.csv"):
    kinetics.prepare(str(manual), str(tmp_path / "tfds"), kinetics.KineticsConfig(**TINY))


def test_missing_manual_dir(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    kinetics.prepare(str(tmp_path / "nowhere"), str(tmp_path / "tfds"), "400")
  # Through TFDS itself, the registered config stops at its own manual-dir check.
  builder = tfds.builder("kinetics/400", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(AssertionError, match="nowhere does not exist"):
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(tmp_path / "nowhere")))


def test_no_usable_validation_row_fails_early(tmp_path):
  manual = tmp_path / "manual"
  _write_videos(str(manual), ["aaa", "bbb"])
  (manual / "train.csv").write_text(HEADER + _row("abseiling", "aaa") + _row("riding a bike", "bbb"))
  (manual / "validate.csv").write_text(HEADER + _row("abseiling", "hhh", "val"))
  with pytest.raises(DataError, match=r"no usable row in .*validate\.csv.*\n.*1 missing video"):
    kinetics.prepare(str(manual), str(tmp_path / "tfds"), kinetics.KineticsConfig(**TINY))


def test_find_csvs(tmp_path):
  (tmp_path / "annotations").mkdir()
  for name in ("annotations/train.csv", "val.csv", "annotations/validate.csv"):
    (tmp_path / name).write_text(HEADER)
  assert kinetics.find_csvs(str(tmp_path)) == {
      "train": str(tmp_path / "annotations" / "train.csv"),
      "validation": str(tmp_path / "annotations" / "validate.csv"),  # preferred over val.csv
  }
  (tmp_path / "annotations" / "validate.csv").unlink()
  (tmp_path / "test.csv").write_text(HEADER)
  assert kinetics.find_csvs(str(tmp_path))["validation"] == str(tmp_path / "val.csv")
  assert kinetics.find_csvs(str(tmp_path))["test"] == str(tmp_path / "test.csv")


def test_cli_builds_a_config_of_its_own(tmp_path):
  # The CLI takes the official configs only; 400 classes cost nothing when 399 have no video.
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  _write_videos(manual, ["ccc"])
  with open(os.path.join(manual, "train.csv"), "w") as f:
    f.write(HEADER + _row("class 000", "ccc")
            + "".join(f"class {i:03d},missing{i},0,10,train\n" for i in range(1, 400)))
  with open(os.path.join(manual, "validate.csv"), "w") as f:
    f.write(HEADER + _row("class 001", "ccc", "val"))
  env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
  result = subprocess.run(
      [sys.executable, "-m", "msca_jax.data.kinetics", f"--manual_dir={manual}",
       f"--data_dir={data_dir}", "--config=400", "--short_side=8", "--fps=5"],
      capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tfds.load('kinetics/400_fps5_short_side8'" in result.stdout
  examples = _read(data_dir, "400_fps5_short_side8", "validation",
                   decoders={"video": tfds.decode.SkipDecoding()})
  ex = examples[_stem("ccc")]
  assert int(ex["label"]) == 1
  assert ex["video"].shape == (3,)  # 12 frames at 25 fps = 0.48 s: instants 0, 0.2, 0.4
  assert tf.io.decode_jpeg(ex["video"][0]).shape == (8, 12, 3)


@pytest.mark.parametrize("field,value", [("jpeg_quality", 101), ("fps", -1), ("num_classes", 0)])
def test_bad_config_values_fail_at_once(field, value):
  with pytest.raises(DataError, match=field):
    kinetics.KineticsConfig(**dict(TINY, **{field: value}))


def test_training_pipeline_reads_the_tfds_dataset_like_dmvr_shards(tiny):
  """sources.tfds_source: the same pipeline stages, exact evaluation, class names from TFDS."""
  from msca_jax.data import pipeline, sources
  from tests.data import shards
  _, data_dir, _, _ = tiny
  data = shards.data_config(data_dir, source="tfds", tfds_name=f"kinetics/{TINY['name']}",
                            color_prob=0.0, num_frames=4, image_size=16, eval_short_side=16)
  source = sources.make_source(data, "train")
  assert source.class_names == tuple(CLASSES) and source.num_records == 3
  assert source.decode.short_side == SHORT_SIDE and source.decode.fps == 25.0
  batches = list(pipeline.as_numpy(pipeline.eval_dataset(source, data, batch_size=2, num_clips=2,
                                                         num_crops=3)))
  mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
  keys = [k.decode() for k in np.concatenate([b["key"] for b in batches])[mask]]
  assert sorted(keys) == sorted(k for k in EXPECTED if EXPECTED[k] and k != "fff_000006_000016")
  labels = np.concatenate([b["label"] for b in batches])[mask]
  videos = np.concatenate([b["video"] for b in batches])[mask]
  assert videos.dtype == np.uint8   # the default batch dtype
  for key, label, clip in zip(keys, labels, videos):
    assert label == EXPECTED[key][0]
    colour = shards.pixels(clip).reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(colour, VIDEOS[key[:3]][0], atol=12)
  # float32 batches carry the same views in [-1, 1].
  floats = list(pipeline.as_numpy(pipeline.eval_dataset(
      source, shards.data_config(data_dir, source="tfds", tfds_name=f"kinetics/{TINY['name']}",
                                 num_frames=4, image_size=16, eval_short_side=16, dtype="float32"),
      batch_size=2, num_clips=2, num_crops=3)))
  float_videos = np.concatenate([b["video"] for b in floats])[mask]
  shards.assert_pixels(float_videos, "float32")
  np.testing.assert_allclose(shards.pixels(float_videos), videos, atol=0.5 + 1e-3)
  b = next(pipeline.as_numpy(pipeline.train_dataset(source, data, batch_size=4, seed=0)))
  assert b["video"].shape == (4, 4, 16, 16, 3) and set(b["label"]) <= {0, 1}
  shards.assert_pixels(b["video"], "uint8")
  for clip, label in zip(b["video"], b["label"]):   # solid colours: the label's video's colour
    colour = shards.pixels(clip).reshape(-1, 3).mean(axis=0)
    assert min(np.abs(colour - VIDEOS[k[:3]][0]).max() for k in EXPECTED
               if EXPECTED[k][0] == label and k != "fff_000006_000016") < 12
  with pytest.raises(DataError, match="has no split 'test'"):
    sources.make_source(data, "test")
