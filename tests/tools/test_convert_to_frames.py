"""convert_to_frames: DMVR shards to frame folders, JPEG bytes copied; bad records, resume, the CLI,
and the same evaluation batches as the shards they came from."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from msca_jax.data import dmvr, frames, pipeline, preparation, sources
from msca_jax.tools import convert_to_frames, prepare_videos
from msca_jax.data.errors import DataError
from tests.data import shards
from tests.data.test_prepare_videos import make_clip

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DECODE = {"fps": 12.5, "short_side": 36, "jpeg_quality": 95, "max_frames": 0}
NUM_SHARDS = 4


def _video(i, num_frames=8):
  return shards.jpegs(shards.video(i, num_frames=num_frames))


# Per shard, (key, label, frames) or raw bytes. Shard 3 is truncated inside its last record.
SHARD_RECORDS = [
    [("v0", 0, 0), b"not a SequenceExample", ("v8", 2, 8), ("clip 12.mp4", 0, 12), ("clip_12", 1, 16)],
    [("v1", 1, 1), ("", 2, 5), ("v9", 0, None), ("v13", 1, 13)],      # None: no frames
    [("v2", 2, 2), ("v6", 5, 6), ("v10", 1, 10), ("v14", 2, 14)],     # label 5: not a class
    [("v3", 0, 3), ("v7", 1, 7), ("v11", 2, 11), ("v15", 0, 15)],
]
# DMVR key -> (folder, label, video index) of every record that converts.
EXPECTED = {
    "v0": ("train/v0", 0, 0), "v8": ("train/v8", 2, 8),
    "clip 12.mp4": ("train/clip_12", 0, 12), "clip_12": ("train/clip_12~2", 1, 16),
    "v1": ("train/v1", 1, 1), "": ("train/train-00001-of-00004-1", 2, 5), "v13": ("train/v13", 1, 13),
    "v2": ("train/v2", 2, 2), "v10": ("train/v10", 1, 10), "v14": ("train/v14", 2, 14),
    "v3": ("train/v3", 0, 3), "v7": ("train/v7", 1, 7), "v11": ("train/v11", 2, 11),
}
FAILED = {  # key -> a piece of the reason
    "train-00000-of-00004-1": "record 1 cannot be parsed: InvalidArgumentError",
    "v9": "the video has no frames",
    "v6": "label 5 is outside the class list [0, 3)",
    "train-00003-of-00004-3": "corrupt or truncated after record 3",
}


def write_dataset(directory):
  """The shards above, labels.txt and a manifest with decode settings; returns the shard paths."""
  os.makedirs(directory)
  dmvr.write_labels(directory, shards.CLASSES)
  with open(os.path.join(directory, "train.manifest.json"), "w") as f:
    json.dump({"settings": DECODE}, f)
  paths = []
  for index, records in enumerate(SHARD_RECORDS):
    path = os.path.join(directory, dmvr.shard_name("train", index, NUM_SHARDS))
    with dmvr.ShardWriter(path) as writer:
      for record in records:
        if isinstance(record, tuple):
          key, label, video = record
          record = dmvr.make_example([] if video is None else _video(video), label,
                                     shards.CLASSES[label % 3], key)
        writer.write(record)
    paths.append(path)
  with open(paths[3], "rb") as f:
    data = f.read()
  with open(paths[3], "wb") as f:
    f.write(data[:-200])
  return paths


def convert(path, output, **kwargs):
  kwargs.setdefault("progress_stream", io.StringIO())
  return convert_to_frames.convert("dmvr", str(path), "train", str(output), **kwargs)


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def frame_files(output):
  out = {}
  for directory, _, names in os.walk(os.path.join(output, "train")):
    for name in names:
      out[os.path.relpath(os.path.join(directory, name), output)] = _read(os.path.join(directory, name))
  return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("convert")
  write_dataset(str(root / "dmvr"))
  progress = io.StringIO()
  summary = convert(root / "dmvr", root / "frames", workers=1, progress_stream=progress)
  return dict(root=root, input=root / "dmvr", output=root / "frames", summary=summary,
              progress=progress.getvalue())


def test_frames_are_the_records_jpegs_byte_for_byte(converted):
  output = converted["output"]
  files = frame_files(output)
  expected = {}
  for folder, _, video in EXPECTED.values():
    for t, jpeg in enumerate(_video(video)):
      expected[f"{folder}/img_{t + 1:05d}.jpg"] = jpeg
  assert files == expected   # every frame, nothing else (no temporary folders)


def test_labels_keys_and_lists(converted):
  output, summary = converted["output"], converted["summary"]
  assert _read(output / "labels.txt") == _read(converted["input"] / "labels.txt")
  listed = frames.read_list(str(output / "train.txt"))
  assert not listed.problems
  # Input file order, then record order; a record without a key is named by its shard and index.
  order = [r[0] for records in SHARD_RECORDS for r in records
           if isinstance(r, tuple) and r[0] in EXPECTED]
  assert list(listed.folders) == [EXPECTED[k][0] for k in order]
  assert list(listed.labels) == [EXPECTED[k][1] for k in order]
  assert set(listed.num_frames) == {8}
  counts = [len(_read(preparation.part_path(str(output), "train", i, NUM_SHARDS)).splitlines())
            for i in range(NUM_SHARDS)]
  assert counts == [4, 3, 3, 3]
  assert _read(output / "train.txt") == b"".join(
      _read(preparation.part_path(str(output), "train", i, NUM_SHARDS)) for i in range(NUM_SHARDS))
  assert (summary.videos_written, summary.frames, summary.shards_written) == (13, 13 * 8, 4)
  assert summary.bytes == sum(map(len, frame_files(output).values()))
  # The progress counts records read: all but the truncated tail's.
  assert converted["progress"].splitlines()[-1].startswith("train: 16/16 videos (100%)")
  manifest = json.loads(_read(output / "train.manifest.json"))
  assert manifest["settings"] == DECODE and manifest["layout"] == "frames"
  assert manifest["converted_from"]["source"] == "dmvr" and manifest["converted_from"]["files"] == 4
  source = sources.make_source(shards.data_config(str(output), source="frames"), "train")
  assert (source.decode.fps, source.decode.short_side, source.decode.jpeg_quality) == (12.5, 36, 95)
  assert source.class_names == shards.CLASSES


def test_bad_records_and_a_truncated_shard_are_reported_and_skipped(converted):
  output, summary = converted["output"], converted["summary"]
  reasons = {f.key: f.reason for f in summary.failures}
  assert sorted(reasons) == sorted(FAILED)
  for key, piece in FAILED.items():
    assert piece in reasons[key], reasons[key]
  assert (summary.videos_total, summary.videos_failed) == (17, 4)
  with open(output / "train.failures.tsv") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  assert rows[0] == ["key", "path", "reason"] and {r[0]: r[2] for r in rows[1:]} == reasons
  assert {r[0]: os.path.basename(r[1]) for r in rows[1:]}["v6"] == "train-00002-of-00004"
  text = summary.format()
  assert "13 videos in 4 chunks: 104 frames" in text and "failed        4 of 17 videos" in text


def test_resume_redoes_only_a_deleted_part_in_the_same_folders(converted, tmp_path):
  output = tmp_path / "frames"
  shutil.copytree(converted["output"], output)
  part = preparation.part_path(str(output), "train", 1, NUM_SHARDS)
  redone = [line.split()[0] for line in _read(part).decode().splitlines()]
  stats = {p: os.stat(output / p) for p in frame_files(output)}
  listing = _read(output / "train.txt")
  os.remove(part)
  os.remove(output / "train.txt")

  summary = convert(converted["input"], output, workers=2)
  assert (summary.shards_written, summary.shards_done_before, summary.videos_written) == (1, 3, 3)
  assert summary.videos_done_before == 10
  assert sorted(f.key for f in summary.failures) == sorted(FAILED)   # earlier reports are kept
  assert _read(output / "train.txt") == listing
  files = frame_files(output)
  assert files == frame_files(converted["output"])   # same folders: none got a ~N copy
  for path, before in stats.items():
    after = os.stat(output / path)
    if path.rsplit("/", 1)[0] in redone:
      assert after.st_ino != before.st_ino       # rewritten
    else:
      assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

  again = convert(converted["input"], output)
  assert (again.shards_written, again.shards_done_before, again.videos_failed) == (0, 4, 4)
  # Another source into the same output is refused; so is an output without its manifest.
  other = tmp_path / "other"
  shards.write(str(other), "train", num_videos=3, num_shards=1)
  with pytest.raises(DataError, match=r"different inputs or settings.*converted_from"):
    convert(other, output)
  os.remove(output / "train.manifest.json")
  with pytest.raises(DataError, match=r"files of split 'train' .* no train\.manifest\.json"):
    convert(converted["input"], output)


def test_an_interrupted_file_is_redone_and_the_list_is_complete(converted, tmp_path):
  output = tmp_path / "frames"
  shutil.copytree(converted["output"], output)
  listing = _read(output / "train.txt")
  # Converting shard 0 stopped after its first video: no part, no report, no list yet.
  part = preparation.part_path(str(output), "train", 0, NUM_SHARDS)
  folders = [line.split()[0] for line in _read(part).decode().splitlines()]
  for p in (part, preparation.failures_path(part), output / "train.txt"):
    os.remove(p)
  for folder in folders[1:]:
    shutil.rmtree(output / folder)
  journal = convert_to_frames.journal_path(part)
  with open(journal) as f:
    first_line = f.readline()
  with open(journal, "w") as f:
    f.write(first_line + "2\ttrain/cl")   # and the journal's last line was torn

  summary = convert(converted["input"], output)
  assert (summary.shards_written, summary.videos_written) == (1, 4)
  assert _read(output / "train.txt") == listing
  assert frame_files(output) == frame_files(converted["output"])


def test_an_interruption_stops_the_threads_and_a_rerun_completes(converted, tmp_path, monkeypatch):
  write_frames = frames.write_frames
  calls = []

  def interrupted(*args, **kwargs):
    calls.append(args[1])
    if len(calls) == 6:
      raise KeyboardInterrupt
    return write_frames(*args, **kwargs)

  monkeypatch.setattr(frames, "write_frames", interrupted)
  output = tmp_path / "frames"
  with pytest.raises(KeyboardInterrupt):
    convert(converted["input"], output, workers=2)
  assert not os.path.exists(output / "train.txt")
  finished = [n for n in os.listdir(output / "train.parts") if n.endswith("-of-00004.txt")]
  assert len(finished) < NUM_SHARDS
  monkeypatch.setattr(frames, "write_frames", write_frames)
  summary = convert(converted["input"], output, workers=2)
  assert summary.shards_written == NUM_SHARDS - len(finished)
  assert _read(output / "train.txt") == _read(converted["output"] / "train.txt")
  assert frame_files(output) == frame_files(converted["output"])


def test_same_eval_batches_as_the_dmvr_source(converted):
  """pipeline.eval_dataset on the shards and on their conversion: the same videos, matched by key."""
  settings = dict(clip_positions="reference", num_frames=4, stride=2, eval_short_side=16)
  dmvr_data = shards.data_config(str(converted["input"]), **settings)
  frames_data = shards.data_config(str(converted["output"]), source="frames", **settings)

  def evaluate(data):
    source = sources.make_source(data, "train")
    batches = list(pipeline.as_numpy(pipeline.eval_dataset(source, data, batch_size=4, num_clips=2,
                                                           num_crops=3)))
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    keys = [k.decode() for k in np.concatenate([b["key"] for b in batches])[mask]]
    labels = np.concatenate([b["label"] for b in batches])[mask]
    videos = np.concatenate([b["video"] for b in batches])[mask]
    errors = pipeline.skip_summary(np.concatenate([b["error"] for b in batches]))
    return {k: (l, v) for k, l, v in zip(keys, labels, videos)}, errors

  from_dmvr, dmvr_errors = evaluate(dmvr_data)
  from_frames, frames_errors = evaluate(frames_data)
  # The shards' bad records are evaluated as skips; the conversion left them out.
  assert dmvr_errors["corrupt_shard"] == 1 and dmvr_errors["no_frames"] == 1
  assert dmvr_errors["label_out_of_range"] == 1 and dmvr_errors["undecodable"] == 1
  assert not any(frames_errors.values())
  assert sorted(from_dmvr) == sorted(EXPECTED)
  assert sorted(from_frames) == sorted(folder for folder, _, _ in EXPECTED.values())
  for key, (folder, label, _) in EXPECTED.items():
    assert from_dmvr[key][0] == from_frames[folder][0] == label
    assert from_frames[folder][1].shape == (6, 4, 16, 16, 3)
    np.testing.assert_array_equal(from_dmvr[key][1], from_frames[folder][1])


def test_prepare_videos_shards_convert_to_what_its_frame_format_writes(tmp_path):
  for i in range(5):
    make_clip(tmp_path / "v" / f"class {i % 2}" / f"clip {i}.mp4", num_frames=4 + i, fps=25,
              height=16, width=16, step=20 + i)
  settings = dict(split="train", short_side=0, num_shards=2, progress_stream=io.StringIO())
  prepare_videos.prepare(str(tmp_path / "v"), str(tmp_path / "dmvr"), output_format="dmvr", **settings)
  prepare_videos.prepare(str(tmp_path / "v"), str(tmp_path / "frames"), **settings)
  summary = convert(tmp_path / "dmvr", tmp_path / "converted")
  assert summary.videos_written == 5 and not summary.failures
  assert frame_files(tmp_path / "converted") == frame_files(tmp_path / "frames")
  for name in ("train.txt", "labels.txt"):
    assert _read(tmp_path / "converted" / name) == _read(tmp_path / "frames" / name)
  ours = json.loads(_read(tmp_path / "converted" / "train.manifest.json"))
  theirs = json.loads(_read(tmp_path / "frames" / "train.manifest.json"))
  for field in ("layout", "frame_pattern", "frame_first_index", "classes"):
    assert ours[field] == theirs[field]
  assert {k: theirs["settings"][k] for k in ours["settings"]} == ours["settings"]


def test_a_tfds_dataset_converts_with_its_video_ids_and_settings(tmp_path):
  from msca_jax.data import kinetics
  from tests.data import test_kinetics_tfds as tiny
  import tensorflow as tf
  manual, data_dir = str(tmp_path / "manual"), str(tmp_path / "tfds")
  tiny._make_tiny_manual_dir(manual)
  kinetics.prepare(manual, data_dir, kinetics.KineticsConfig(**tiny.TINY), workers=1)
  name = f"kinetics/{tiny.TINY['name']}"
  output = tmp_path / "out"
  summary = convert_to_frames.convert("tfds", data_dir, "train", str(output), tfds_name=name,
                                      progress_stream=io.StringIO())
  assert (summary.videos_written, summary.videos_failed) == (3, 0)
  source = sources.tfds_source(name, data_dir, "train")
  expected = {}
  for record in tf.data.TFRecordDataset(list(source.files)):
    parsed = source.parse(record)
    expected[f"train/{parsed['key'].numpy().decode()}"] = (int(parsed["label"]),
                                                          list(parsed["frames"].numpy()))
  assert sorted(expected) == ["train/aaa_000001_000011", "train/bbb_000002_000012",
                              "train/ccc_000003_000013"]
  listed = frames.read_list(str(output / "train.txt"))
  assert {f: (int(l), int(n)) for f, n, l in zip(listed.folders, listed.num_frames, listed.labels)} == {
      f: (label, len(jpegs)) for f, (label, jpegs) in expected.items()}
  files = frame_files(output)
  assert files == {f"{folder}/img_{t + 1:05d}.jpg": jpeg
                   for folder, (_, jpegs) in expected.items() for t, jpeg in enumerate(jpegs)}
  assert dmvr.read_labels(str(output)) == tiny.CLASSES
  manifest = json.loads(_read(output / "train.manifest.json"))
  assert manifest["settings"]["short_side"] == tiny.SHORT_SIDE
  assert manifest["converted_from"]["tfds_name"] == name
  with pytest.raises(DataError, match=r"has no split 'test'"):
    convert_to_frames.convert("tfds", data_dir, "test", str(tmp_path / "out2"), tfds_name=name)


# --- The command line ------------------------------------------------------------------------------


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "msca_jax.tools.convert_to_frames", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_cli_with_two_workers_matches_the_inline_conversion(converted, tmp_path):
  result = _cli("--source=dmvr", f"--path={converted['input']}", "--split=train",
                f"--output={tmp_path / 'cli'}", "--workers=2")
  assert result.returncode == 0, result.stderr
  assert "written       13 videos in 4 chunks: 104 frames" in result.stdout
  assert "failed        4 of 17 videos" in result.stdout
  assert "train: 16/16 videos (100%)" in result.stderr
  assert frame_files(tmp_path / "cli") == frame_files(converted["output"])
  for name in ["train.txt", "labels.txt", "train.failures.tsv", "train.manifest.json"] + [
      f"train.parts/{i:05d}-of-{NUM_SHARDS:05d}.txt" for i in range(NUM_SHARDS)]:
    assert _read(tmp_path / "cli" / name) == _read(converted["output"] / name), name


def test_bad_path_or_split_is_one_clear_line(converted, tmp_path):
  result = _cli("--source=dmvr", f"--path={tmp_path / 'nowhere'}", "--split=train",
                f"--output={tmp_path / 'out'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: data directory {tmp_path / 'nowhere'} does not exist")
  assert "Traceback" not in result.stderr
  with pytest.raises(DataError, match=r"no shards for split 'validation'"):
    convert_to_frames.convert("dmvr", str(converted["input"]), "validation", str(tmp_path / "out"))
  with pytest.raises(DataError, match=r"--split 'a b' must be a plain name"):
    convert_to_frames.convert("dmvr", str(converted["input"]), "a b", str(tmp_path / "out"))
  with pytest.raises(DataError, match=r"is the --path directory"):
    convert_to_frames.convert("dmvr", str(converted["input"]), "train", str(converted["input"]))
  assert not os.path.exists(tmp_path / "out")


def test_no_convertible_video_is_one_line_and_exit_2(tmp_path):
  """Every record bad (unparseable, no frames): a user error, as prepare_videos gives it."""
  directory = tmp_path / "bad"
  os.makedirs(directory)
  dmvr.write_labels(str(directory), shards.CLASSES)
  with dmvr.ShardWriter(str(directory / dmvr.shard_name("train", 0, 1))) as writer:
    writer.write(b"not a SequenceExample")
    writer.write(dmvr.make_example([], 0, shards.CLASSES[0], "empty"))
  result = _cli("--source=dmvr", f"--path={directory}", "--split=train",
                f"--output={tmp_path / 'out'}", "--workers=0")
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("convert_to_frames: error: no video could be converted: 2 of 2 failed")
  assert "train.failures.tsv" in last and "Traceback" not in result.stderr
