r"""Turns a video collection into frame folders (the default) or DMVR TFRecord shards.

    python -m msca_jax.tools.prepare_videos --videos kinetics400/train.csv \
        --video_root kinetics400/train --classes kinetics400/classes.txt \
        --output /data/k400 --split train

An official dataset, every split in one command (msca_jax/data/datasets.py, docs/datasets.md):

    python -m msca_jax.tools.prepare_videos --dataset=ucf101 --annotations ucfTrainTestlist \
        --video_root UCF-101 --output /data/ucf101

writes SSv2's 'train' and 'validation', or UCF101's / HMDB51's videos once (split 'videos') and
the official lists train1, test1, ..., test3 of them.

--videos is one of
  * a Kinetics annotation CSV (label, youtube_id, time_start, time_end, split): each row's video is
    the downloader's file `{youtube_id}_{start:06d}_{end:06d}.*` anywhere under --video_root
    (default: the CSV's directory);
  * a TokShift frame-folder list (.txt lines 'frame_folder num_frames label'): the folders hold
    frames already extracted as images, taken in file-name order;
  * a directory laid out ROOT/class_name/video.mp4. Each video file is listed once, labelled by
    the class folder it really lies in: a symlink into the tree (such as a loop 'walk/loop -> ..')
    is not followed, a link to a folder or file outside the tree is (labelled by the class folder
    holding the link), and a folder or file reached twice is taken once. Each path not taken is a
    line of the log and of the summary (annotations.walk_videos).

Text lists (--classes, frame-folder lists) may have a byte-order mark, CRLF line ends, blank lines
and trailing blanks; a class named twice is an error naming the line. A video whose frames are
more than 8 times as long as wide (video.MAX_ASPECT_RATIO) is skipped and listed with its reason.

Videos are resampled to --fps and resized to --short_side, so that the recipe's stride (32 frames
at 25 fps) means the same time span for every video. With --format=frames (docs/data.md) the
output directory gets
  SPLIT/<video>/img_00001.jpg ...   one JPEG per frame: a clip reads only its own frames
  SPLIT.txt                         'folder num_frames label' per video (the reference's list),
                                    written once every chunk is done
  SPLIT.parts/NNNNN-of-NNNNN.txt    each finished chunk's lines (the unit of resumption)
and with --format=dmvr
  SPLIT-00000-of-000NN ...          the shards; each video's shard is fixed by --seed
and in both cases
  labels.txt                        the class names in label order
  SPLIT.manifest.json               inputs, settings and each chunk's keys (checked on a rerun)
  ...failures.json                  per chunk or shard: its counts and failed videos
  SPLIT.failures.tsv                every video that was skipped, and why

A rerun with the same arguments resumes: finished chunks and shards are kept (to retry the failed
videos of one, delete it, or its part, and rerun). A video that cannot be used is reported and
skipped; the run fails only when nothing at all could be written (exit status 2 and one line,
as for any input that cannot be used; 1 when chunks failed, which a rerun retries). DMVR shards or a TFDS dataset
made earlier convert to frame folders without decoding: msca_jax.tools.convert_to_frames.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import queue as queue_lib
import re
import sys
import time
from typing import Callable, Sequence

if __name__ == "__main__":
  # Run as a program, this process and its workers (which inherit the environment) would each
  # print TensorFlow's start-up notices over the progress line. oneDNN's custom ops only change
  # float kernels, which this tool does not use (it only reads and writes JPEGs and TFRecords).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import av
import numpy as np
import tensorflow as tf

from msca_jax import cli
from msca_jax.data import annotations, datasets, dmvr, frames, preparation, video
from msca_jax.progress import Progress
from msca_jax.data.errors import DataError
from msca_jax.data.decode import DecodeSettings

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
_JPEG_MAGIC = b"\xff\xd8\xff"
_MANIFEST_VERSION = 1
# TFRecord framing per record: 8-byte length, 4-byte length CRC, 4-byte data CRC.
_RECORD_OVERHEAD = 16


# Everything, besides the inputs, that changes the frames written; its defaults are the project's.
FORMATS = ("frames", "dmvr")


@dataclasses.dataclass(frozen=True)
class _Item:
  key: str
  path: str
  label: int
  text: str
  frame_folder: bool


@dataclasses.dataclass(frozen=True)
class _ShardTask:
  index: int
  path: str                  # the DMVR shard, or the frame layout's list part of this chunk
  items: tuple[_Item, ...]
  settings: DecodeSettings
  output: str = ""
  split: str = ""
  folders: tuple[str, ...] = ()   # frame layout: each item's folder under the output


# ---------------------------------------------------------------------------------------------
# Inputs: which videos, which labels.


def _is_kinetics_csv(path: str) -> bool:
  if path.lower().endswith(".csv"):
    return True
  with open(path, errors="replace") as f:
    first = f.readline()
  return "youtube_id" in first


def read_entries(videos: str, video_root: str | None = None,
                 notes: list[str] | None = None) -> tuple[str, list[annotations.Entry]]:
  """('csv' | 'frame_list' | 'class_folders', entries) for the --videos argument; the paths a
  walk of a video tree did not take go to `notes` (`annotations.walk_videos`)."""
  if not os.path.exists(videos):
    raise DataError(f"--videos {videos} does not exist (expected a Kinetics CSV, a frame-folder "
                    "list or a directory of class folders)")
  if os.path.isdir(videos):
    return "class_folders", annotations.read_class_folders(videos, notes)
  if video_root is not None and not os.path.isdir(video_root):
    raise DataError(f"--video_root {video_root} is not a directory")
  if _is_kinetics_csv(videos):
    entries = annotations.read_kinetics_csv(videos, video_root, notes=notes)
    # An unlabelled CSV (or one whose header starts with a byte-order mark) would otherwise turn
    # into one "label -1" failure per row.
    if entries and all(e.label_name is None for e in entries):
      raise DataError(f"{videos}: no row has a label (is the 'label' column missing?)")
    kind = "csv"
  else:
    entries = annotations.read_frame_list(videos, video_root)
    kind = "frame_list"
  if not entries:
    raise DataError(f"--videos {videos} lists no videos")
  return kind, entries


def class_names_for(kind: str, entries: Sequence[annotations.Entry], classes: str | None) -> list[str]:
  """The class list: the --classes file, else derived from the entries (with a warning)."""
  if classes:
    return dmvr.read_class_list(classes)
  if kind == "frame_list":
    labels = [e.label for e in entries]
    if max(labels) < 0:
      raise DataError("the frame-folder list has no non-negative label; pass --classes")
    logging.warning("no --classes: the list's integer labels are used, named '0'..'%d'; pass the "
                    "class list file to store real class names", max(labels))
    return [str(i) for i in range(max(labels) + 1)]
  names = annotations.sorted_class_names(entries)
  if not names:
    raise DataError("no labelled videos found; pass --classes")
  logging.warning("no --classes: using the sorted set of the %d label names found. Pass the "
                  "official class list so that label indices match other splits and runs.",
                  len(names))
  return names


def _drop_duplicates(entries: Sequence[annotations.Entry]) -> list[annotations.Entry]:
  seen = set()
  for e in entries:
    if e.key in seen and not e.error:
      e.error = "listed more than once (only the first is used)"
    seen.add(e.key)
  return list(entries)


def assign_to_shards(keys: Sequence[str], num_shards: int, seed: int) -> list[list[str]]:
  """Sorted, then shuffled with `seed` (so every shard mixes classes), then cut into even runs."""
  ordered = sorted(keys)
  shuffled = [ordered[i] for i in np.random.RandomState(seed).permutation(len(ordered))]
  bounds = [len(keys) * i // num_shards for i in range(num_shards + 1)]
  return [shuffled[bounds[i]:bounds[i + 1]] for i in range(num_shards)]


# ---------------------------------------------------------------------------------------------
# Workers: one shard per task.


def _encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
  return tf.io.encode_jpeg(frame, quality=quality).numpy()


def _resize(image: np.ndarray, short_side: int) -> np.ndarray:
  """Bicubic resize with the same scaler (swscale) that video.iter_frames uses."""
  height, width = video.scaled_size(image.shape[0], image.shape[1], short_side)
  if (height, width) == image.shape[:2]:
    return image
  frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
  return frame.reformat(width=width, height=height, format="rgb24",
                        interpolation="BICUBIC").to_ndarray()


def _video_frames(path: str, settings: DecodeSettings) -> list[bytes]:
  return video.jpeg_frames(path, settings.fps, settings.short_side, settings.jpeg_quality,
                           settings.max_frames, max_aspect=video.MAX_ASPECT_RATIO)


def _folder_frames(path: str, settings: DecodeSettings) -> list[bytes]:
  """A folder's images in name order; JPEGs already at the right size are copied byte for byte."""
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise video.VideoError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
  if settings.max_frames:
    names = names[:settings.max_frames]
  frames = []
  for i, name in enumerate(names):
    with open(os.path.join(path, name), "rb") as f:
      data = f.read()
    try:
      if data.startswith(_JPEG_MAGIC):
        height, width = tf.image.extract_jpeg_shape(data).numpy()[:2]
        if i == 0:
          _check_folder_aspect(path, height, width)
        if not settings.short_side or min(height, width) == settings.short_side:
          frames.append(data)
          continue
        image = tf.io.decode_jpeg(data, channels=3)
      else:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
        if i == 0:
          _check_folder_aspect(path, *image.shape[:2])
    except tf.errors.OpError as e:
      raise video.VideoError(f"{os.path.join(path, name)}: not a readable image "
                             f"({e.message.splitlines()[0]})") from e
    frames.append(_encode_jpeg(_resize(image.numpy(), settings.short_side), settings.jpeg_quality))
  return frames


def _check_folder_aspect(path: str, height: int, width: int) -> None:
  """A frame folder's first image bounds its shape as a video's first frame does."""
  try:
    video.check_aspect(int(height), int(width))
  except video.VideoError as e:
    raise video.VideoError(f"{path}: {e}") from None


_progress_queue = None  # in worker processes: gets the shard index once per video done


def _init_worker(progress_queue) -> None:
  global _progress_queue
  _progress_queue = progress_queue


def _item_frames(item: _Item, settings: DecodeSettings) -> list[bytes]:
  read = _folder_frames if item.frame_folder else _video_frames
  jpegs = read(item.path, settings)
  if not jpegs:
    raise video.VideoError(f"{item.path}: no frames")
  return jpegs


def write_shard(task: _ShardTask, on_video: Callable[[int], None] | None = None) -> preparation.ShardStats:
  """Writes one DMVR shard, or one chunk of frame folders; a video that fails is recorded and
  skipped, never raised."""
  if task.folders:
    return _write_frame_chunk(task, on_video)
  stats = preparation.ShardStats()
  with dmvr.ShardWriter(task.path) as writer:
    for item in task.items:
      try:
        jpegs = _item_frames(item, task.settings)
        record = dmvr.make_example(jpegs, item.label, item.text, item.key)
      except Exception as e:  # pylint: disable=broad-except  # one bad video must not stop the run
        stats.failures.append(preparation.Failure(item.key, item.path, preparation.reason(e, item.path)))
      else:
        writer.write(record)
        stats.videos += 1
        stats.frames += len(jpegs)
        stats.bytes += len(record) + _RECORD_OVERHEAD
      _report_progress(task, on_video)
    # Written before the shard is renamed into place, so a finished shard always has its report.
    preparation.write_json(preparation.failures_path(task.path), preparation.shard_stats_json(stats))
  return stats


def _report_progress(task: _ShardTask, on_video: Callable[[int], None] | None) -> None:
  if on_video is not None:
    on_video(task.index)
  elif _progress_queue is not None:
    _progress_queue.put(task.index)


def _write_frame_chunk(task: _ShardTask, on_video: Callable[[int], None] | None) -> preparation.ShardStats:
  """Each video's frames into its own folder (atomically), then the chunk's list part."""
  stats = preparation.ShardStats()
  rows = []
  for item, folder in zip(task.items, task.folders):
    try:
      jpegs = _item_frames(item, task.settings)
      frames.write_frames(task.output, folder, jpegs)
    except Exception as e:  # pylint: disable=broad-except  # one bad video must not stop the run
      stats.failures.append(preparation.Failure(item.key, item.path, preparation.reason(e, item.path)))
    else:
      rows.append((folder, len(jpegs), item.label))
      stats.videos += 1
      stats.frames += len(jpegs)
      stats.bytes += sum(map(len, jpegs))
    _report_progress(task, on_video)
  preparation.write_json(preparation.failures_path(task.path), preparation.shard_stats_json(stats))
  # The part is the chunk's completion marker: written last.
  frames.write_list(task.path, rows)
  return stats


# ---------------------------------------------------------------------------------------------
# The run.


def _run_tasks(tasks: Sequence[_ShardTask], workers: int, progress: Progress,
               on_result: Callable[[_ShardTask, preparation.ShardStats | None, str], None]) -> None:
  """Runs the shard tasks inline (workers <= 1) or in spawned processes, reporting progress."""
  if workers <= 1:
    for task in tasks:
      try:
        stats = write_shard(task, on_video=lambda _: progress.update(1))
      except Exception as e:  # pylint: disable=broad-except  # e.g. a full disk: keep other shards
        progress.update(len(task.items))
        on_result(task, None, preparation.reason(e))
      else:
        on_result(task, stats, "")
    return

  # TensorFlow's runtime does not survive fork(); spawned workers import it afresh.
  context = multiprocessing.get_context("spawn")
  progress_queue = context.Queue()
  counted = {task.index: 0 for task in tasks}

  def count(index: int, n: int = 1) -> None:
    n = min(n, len(by_index[index].items) - counted[index])
    counted[index] += n
    progress.update(n)

  def drain() -> None:
    while True:
      try:
        index = progress_queue.get_nowait()
      except queue_lib.Empty:
        return
      count(index)

  by_index = {task.index: task for task in tasks}
  with concurrent.futures.ProcessPoolExecutor(
      max_workers=workers, mp_context=context, initializer=_init_worker,
      initargs=(progress_queue,)) as pool:
    futures = {pool.submit(write_shard, task): task for task in tasks}
    pending = set(futures)
    try:
      while pending:
        done, pending = concurrent.futures.wait(pending, timeout=0.2)
        drain()
        for future in done:
          task = futures[future]
          # Messages of a finished shard may still be in flight: count the rest now.
          count(task.index, len(task.items))
          try:
            on_result(task, future.result(), "")
          except Exception as e:  # pylint: disable=broad-except  # a crashed worker: keep the others
            on_result(task, None, preparation.reason(e))
    except BaseException:
      pool.shutdown(wait=False, cancel_futures=True)
      raise


def prepare(videos: str, output: str, split: str, *, classes: str | None = None,
            video_root: str | None = None, fps: float = DecodeSettings.fps,
            short_side: int = DecodeSettings.short_side, jpeg_quality: int = DecodeSettings.jpeg_quality,
            num_shards: int = 0, videos_per_shard: int = 128,
            workers: int = 0, seed: int = 0, max_frames: int = 0,
            output_format: str = "frames", progress_stream=None,
            listing: Listing | None = None) -> preparation.Summary:
  """Writes (or resumes writing) one split as frame folders or DMVR shards; see the module docstring.

  `listing` gives the entries and classes read already (an official dataset's files,
  `prepare_dataset`); `videos` then only names them in the manifest and the messages.
  `workers` <= 1 runs in this process. Raises DataError for configuration errors and when no
  video at all can be used; single videos that fail are listed in the returned summary instead.
  """
  start = time.monotonic()
  for name, value, low in (("fps", fps, 0), ("short_side", short_side, 0),
                           ("max_frames", max_frames, 0), ("num_shards", num_shards, 0),
                           ("videos_per_shard", videos_per_shard, 1), ("jpeg_quality", jpeg_quality, 1)):
    if value < low:
      raise DataError(f"--{name} must be at least {low}, got {value}")
  if jpeg_quality > 100:
    raise DataError(f"--jpeg_quality must be at most 100, got {jpeg_quality}")
  if output_format not in FORMATS:
    raise DataError(f"--format must be one of {FORMATS}, got {output_format!r}")
  if not split or os.sep in split or not re.fullmatch(r"[\w.\-]+", split):
    raise DataError(f"--split {split!r} must be a plain name such as 'train' or 'validation'")
  settings = DecodeSettings(fps=float(fps), short_side=int(short_side), jpeg_quality=int(jpeg_quality),
                      max_frames=int(max_frames))

  walk_notes: list[str] = []
  if listing is not None:
    kind, entries, names = listing.kind, listing.entries, listing.classes
  else:
    kind, entries = read_entries(videos, video_root, walk_notes)
    for note in walk_notes:
      logging.warning("video tree: %s", note)
    names = class_names_for(kind, entries, classes)
  entries = _drop_duplicates(annotations.assign_labels(entries, names))
  if kind == "frame_list":
    logging.warning("frame folders are copied at the frame rate they were extracted at: --fps "
                    "applies to video files only (the recipe's frame stride assumes 25 fps)")
  usable = {e.key: e for e in entries if not e.error}
  early_failures = [preparation.Failure(e.key, e.path or "", e.error) for e in entries if e.error]

  summary = preparation.Summary(split=split, output=output, videos_total=len(entries), walk_notes=walk_notes,
                    unit="chunks" if output_format == "frames" else "shards")
  failures_tsv = os.path.join(output, f"{split}.failures.tsv")
  if not usable:
    os.makedirs(output, exist_ok=True)
    preparation.write_failures_tsv(failures_tsv, early_failures)
    reasons = "; ".join(f"{f.key}: {f.reason}" for f in early_failures[:3])
    raise DataError(f"none of the {len(entries)} videos listed by {videos} can be used (e.g. "
                    f"{reasons}); all are listed in {failures_tsv}")

  num_shards = num_shards or math.ceil(len(usable) / videos_per_shard)
  if num_shards > len(usable):
    logging.warning("%d shards for %d videos: %d shards will be empty", num_shards, len(usable),
                    num_shards - len(usable))
  shard_keys = assign_to_shards(list(usable), num_shards, seed)
  manifest = {
      "version": _MANIFEST_VERSION,
      "split": split,
      "inputs": {"videos": os.path.abspath(videos), "kind": kind,
                 "video_root": os.path.abspath(video_root) if video_root else None,
                 "classes": os.path.abspath(classes) if classes else None},
      "settings": dict(settings.as_json(), seed=seed, num_shards=num_shards),
      "classes": names,
      "shards": shard_keys,
  }
  if output_format == "frames":
    names_ = frames.FrameNames()
    manifest.update(layout="frames", frame_pattern=names_.pattern,
                    frame_first_index=names_.first_index)
    folders = preparation.unique_folders(split, list(usable))
  if os.path.exists(output) and not os.path.isdir(output):
    raise DataError(f"--output {output} exists and is not a directory")
  manifest_path = os.path.join(output, f"{split}.manifest.json")
  preparation.check_output(output, split, manifest_path, manifest)
  dmvr.write_labels(output, names)
  if not os.path.exists(manifest_path):
    preparation.write_json(manifest_path, manifest)

  summary.num_shards = num_shards
  summary.failures_path = failures_tsv
  shard_failures: dict[int, list[preparation.Failure]] = {}
  tasks = []
  if output_format == "frames":
    os.makedirs(preparation.parts_dir(output, split), exist_ok=True)
  for index, keys in enumerate(shard_keys):
    path = (preparation.part_path(output, split, index, num_shards) if output_format == "frames"
            else os.path.join(output, dmvr.shard_name(split, index, num_shards)))
    if os.path.exists(path):
      stats = preparation.read_shard_stats(path)
      if stats is None:
        logging.warning("%s exists but its report %s is missing or unreadable: its failed videos "
                        "are not known", path, preparation.failures_path(path))
        stats = preparation.ShardStats(videos=len(keys))
      summary.shards_done_before += 1
      summary.videos_done_before += stats.videos
      shard_failures[index] = stats.failures
      continue
    items = tuple(_Item(key=k, path=usable[k].path, label=usable[k].label,
                        text=usable[k].label_name or "", frame_folder=kind == "frame_list")
                  for k in keys)
    tasks.append(_ShardTask(index=index, path=path, items=items, settings=settings, output=output,
                            split=split, folders=tuple(folders[k] for k in keys)
                            if output_format == "frames" else ()))

  if summary.shards_done_before:
    logging.info("resuming: %d of %d shards are already written", summary.shards_done_before,
                 num_shards)

  def on_result(task: _ShardTask, stats: preparation.ShardStats | None, error: str) -> None:
    if stats is None:
      summary.shards_failed += 1
      shard_failures[task.index] = [
          preparation.Failure(i.key, i.path, f"shard {os.path.basename(task.path)} failed: {error}")
          for i in task.items]
      return
    summary.shards_written += 1
    summary.videos_written += stats.videos
    summary.frames += stats.frames
    summary.bytes += stats.bytes
    shard_failures[task.index] = stats.failures
    progress.fields["failed"] = len(early_failures) + sum(map(len, shard_failures.values()))

  if tasks:
    total = sum(len(t.items) for t in tasks)
    workers = min(workers, len(tasks))
    with Progress(total, unit="videos", desc=split, stream=progress_stream) as progress:
      progress.update(0, failed=len(early_failures) + sum(map(len, shard_failures.values())))
      _run_tasks(tasks, workers, progress, on_result)

  summary.failures = early_failures + [f for i in sorted(shard_failures) for f in shard_failures[i]]
  preparation.write_failures_tsv(failures_tsv, summary.failures)
  if output_format == "frames" and not summary.shards_failed:
    preparation.assemble_list(output, split, num_shards)
  summary.seconds = time.monotonic() - start
  return summary


@dataclasses.dataclass
class Listing:
  """Entries and class names read by the caller (an official dataset's files)."""
  kind: str
  entries: list[annotations.Entry]
  classes: list[str]


@dataclasses.dataclass
class SplitCount:
  """One official split's list: videos listed, written into it, and left out (failed)."""
  split: str
  listed: int
  written: int

  def format(self) -> str:
    return (f"split {self.split!r}: {self.written} of {self.listed} videos listed"
            + (f" ({self.listed - self.written} failed, see videos.failures.tsv)"
               if self.written < self.listed else ""))


UNION_SPLIT = "videos"   # UCF101 / HMDB51: every video once; the official splits are lists of it


def prepare_dataset(dataset: str, annotations_dir: str, video_root: str, output: str,
                    **kwargs) -> tuple[list[preparation.Summary], list[SplitCount | datasets.VideoList]]:
  """Prepares a dataset from its official files (docs/datasets.md) into one frame-folder root.

  SSv2: splits 'train' and 'validation', and the test set's videos (unlabelled) listed in
  OUTPUT/test_videos.txt for predict. UCF101 and HMDB51: each video once, in split 'videos',
  then the lists 'train1', 'test1', ... 'test3' of it (each with a manifest), so every official
  split is there for config.data.train_split / eval_split. Resumable as `prepare` is; keyword
  arguments go to it (fps None or absent: every frame for SSv2, else 25).
  """
  if kwargs.get("output_format", "frames") != "frames":
    raise DataError("--dataset prepares frame folders: leave --format at 'frames'")
  if kwargs.get("fps") is None:
    # SSv2 is about 12 fps: resampling it to 25 would only store every frame twice.
    kwargs["fps"] = 0.0 if dataset == "ssv2" else DecodeSettings.fps
  classes, splits = datasets.read_official(dataset, annotations_dir, video_root)
  if dataset == "ssv2":
    files = datasets.ssv2_files(annotations_dir)
    summaries = [prepare(files[split], output, split,
                         video_root=video_root, listing=Listing(dataset, entries, classes), **kwargs)
                 for split, entries in splits.items()]
    test = datasets.write_ssv2_test_list(annotations_dir, video_root, output)
    return summaries, [test] if test else []
  union: dict[str, annotations.Entry] = {}
  for entries in splits.values():
    for e in entries:
      union.setdefault(e.key, dataclasses.replace(e))
  summary = prepare(annotations_dir, output, UNION_SPLIT, video_root=video_root,
                    listing=Listing(dataset, list(union.values()), classes), **kwargs)
  if summary.shards_failed:
    return [summary], []
  folders = preparation.unique_folders(UNION_SPLIT, [k for k, e in union.items() if not e.error])
  written = {folder: (n, label) for folder, n, label in preparation.read_rows(frames.list_path(output, UNION_SPLIT))}
  with open(frames.manifest_path(output, UNION_SPLIT)) as f:
    manifest = json.load(f)
  names = frames.FrameNames(manifest["frame_pattern"], manifest["frame_first_index"])
  counts = []
  for split, entries in splits.items():
    rows = [(folders[e.key], *written[folders[e.key]]) for e in entries
            if e.key in folders and folders[e.key] in written]
    frames.write_list(frames.list_path(output, split), rows)
    frames.write_manifest(output, split, manifest["settings"], names, dataset=dataset,
                          frames_of=UNION_SPLIT)
    counts.append(SplitCount(split, len(entries), len(rows)))
  return [summary], counts


# ---------------------------------------------------------------------------------------------
# The command line.


def _define_flags() -> None:
  # Defined only when run as a program: importing this module (tests, spawned workers) must not
  # clash with flags of the same name in other tools, e.g. convert_torch's --output.
  flags.DEFINE_string("videos", None, "Kinetics annotation CSV, TokShift frame-folder list (.txt), "
                      "or a directory of class folders (ROOT/class_name/video.mp4).")
  flags.DEFINE_enum("dataset", None, list(datasets.DATASETS), "Prepare an official dataset from "
                    "--annotations and --video_root, every split at once (docs/datasets.md); "
                    "replaces --videos, --split and --classes.")
  flags.DEFINE_string("annotations", None, "With --dataset: the folder of the official files (SSv2: "
                      "the labels/train/validation JSONs; UCF101: ucfTrainTestlist/; HMDB51: the "
                      "*_test_split{1,2,3}.txt files).")
  flags.DEFINE_string("output", None, "Directory for the frame folders (or shards), labels.txt, "
                      "SPLIT.txt and reports.", required=True)
  flags.DEFINE_enum("format", "frames", FORMATS, "frames: one JPEG file per frame and a list "
                    "(random access: a clip reads only its frames; the default); dmvr: "
                    "SequenceExample TFRecord shards of whole videos (Scenic / DMVR).")
  flags.DEFINE_string("split", None, "Shard name prefix, e.g. train or validation.")
  flags.DEFINE_string("classes", None, "Official class list (one name per line, or 'index,name' "
                      "rows). Default: the sorted label names found, with a warning.")
  flags.DEFINE_string("video_root", None, "Where the CSV's videos / the list's frame folders are "
                      "(searched recursively for CSVs). Default: the list file's directory.")
  flags.DEFINE_float("fps", DecodeSettings.fps, "Resample videos to this frame rate (0 keeps every frame; "
                     "--dataset=ssv2 keeps every frame unless --fps is given).")
  flags.DEFINE_integer("short_side", DecodeSettings.short_side, "Resize so the shorter side has this "
                       "many pixels (0 keeps the size).")
  flags.DEFINE_integer("jpeg_quality", DecodeSettings.jpeg_quality, "JPEG quality of the stored frames (1-100).")
  flags.DEFINE_integer("num_shards", 0, "Number of shards, or of chunks of frame folders (the "
                       "unit of resumption; default: from --videos_per_shard).")
  flags.DEFINE_integer("videos_per_shard", 128, "Videos per shard or chunk when --num_shards is "
                       "not given.")
  flags.DEFINE_integer("workers", None, "Worker processes (default: min(CPU count, 8); 0 or 1 "
                       "runs in this process).")
  flags.DEFINE_integer("seed", 0, "Seed of the video-to-shard shuffle.")
  flags.DEFINE_integer("max_frames", 0, "Keep at most this many frames per video (0: all).")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.num_shards and f["videos_per_shard"].present:
    raise app.UsageError("pass either --num_shards or --videos_per_shard, not both")
  workers = f.workers if f.workers is not None else min(os.cpu_count() or 1, 8)
  if f.dataset:
    return _main_dataset(f, workers)
  for name in ("videos", "split"):
    if not f[name].value:
      raise app.UsageError(f"--{name} is required (or --dataset with --annotations)")
  # Configuration errors raise DataError naming the file or flag: one line and exit 2 (cli.run).
  summary = prepare(f.videos, f.output, f.split, classes=f.classes, video_root=f.video_root,
                    fps=f.fps, short_side=f.short_side, jpeg_quality=f.jpeg_quality,
                    num_shards=f.num_shards, videos_per_shard=f.videos_per_shard,
                    workers=workers, seed=f.seed, max_frames=f.max_frames,
                    output_format=f.format)
  print(summary.format())
  if summary.videos_written + summary.videos_done_before == 0:
    # Nothing usable in the input: a user error, exit status 2 as every program gives one.
    where = f" (each with its reason in {summary.failures_path})" if summary.failures_path else ""
    print(f"prepare_videos: error: no video could be written: {summary.videos_failed} of "
          f"{summary.videos_total} failed{where}", file=sys.stderr)
    return 2
  return 0


def _main_dataset(f, workers: int) -> int:
  for name in ("annotations", "video_root"):
    if not f[name].value:
      raise app.UsageError(f"--dataset needs --{name}")
  for name in ("videos", "split", "classes"):
    if f[name].present:
      raise app.UsageError(f"--{name} does not go with --dataset (its official files name them)")
  fps = f.fps if f["fps"].present else None   # None: the dataset's default (prepare_dataset)
  summaries, counts = prepare_dataset(
      f.dataset, f.annotations, f.video_root, f.output, fps=fps, short_side=f.short_side,
      jpeg_quality=f.jpeg_quality, num_shards=f.num_shards, videos_per_shard=f.videos_per_shard,
      workers=workers, seed=f.seed, max_frames=f.max_frames, output_format=f.format)
  for summary in summaries:
    print(summary.format())
  for count in counts:
    print(count.format())
  if any(s.shards_failed for s in summaries):
    print("prepare_videos: error: some chunks failed; rerun the same command to retry them",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
