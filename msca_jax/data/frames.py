"""Frame folders: one JPEG file per frame and a list of videos, the random-access video layout.

This is the layout of the reference code (TokShift / MSCA) and the one `tools.prepare_videos`
writes (docs/data.md):

    ROOT/labels.txt                     class names in label order (ours; optional for the reference)
    ROOT/SPLIT.txt                      one line per video: 'folder num_frames label'
    ROOT/SPLIT.manifest.json            how the frames were made: fps, short side, JPEG quality (ours)
    ROOT/<folder>/img_00001.jpg ...     the frames, numbered from 1

A clip reads only its own frames (`tf.io.read_file`, local disk or gs://), so the bytes read follow
the clips used, not the videos stored. The list is the index: it is read once at start-up and held
as three arrays (about 100 bytes per video), so an epoch is a permutation of list positions
computed from (seed, epoch) and a stream can start at any position without reading anything before
it (`FrameSource.train_records`).

A bad list line (too few fields, a folder outside ROOT) is reported and skipped when the list is
read; a missing frame file, an empty folder or a folder whose frame count disagrees with its line
is found when a clip reads it, and is skipped and counted by the pipeline like any bad record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Sequence

import numpy as np
import tensorflow as tf

from msca_jax.data import errors, textlist
from msca_jax.data.errors import DataError

DEFAULT_PATTERN = "img_{:05d}.jpg"   # the reference's FRAME_FORMAT
DEFAULT_FIRST_INDEX = 1              # the reference reads frame (i % F) + 1
LABELS_FILE = "labels.txt"
_PATTERN_RE = re.compile(r"^(?P<prefix>[^{}]*)\{(?::(?P<fill>0?)(?P<width>\d*)d)?\}(?P<suffix>[^{}]*)$")
_GLOB_SPECIAL = re.compile(r"([*?\[])")
_SHUFFLE_SALT = 0x5EED  # keeps the epoch permutation's seed apart from the clip seeds


def list_path(root: str, split: str) -> str:
  return os.path.join(root, f"{split}.txt")


def manifest_path(root: str, split: str) -> str:
  return os.path.join(root, f"{split}.manifest.json")


@dataclasses.dataclass(frozen=True)
class FrameNames:
  """How frame i of a folder is named: a str.format pattern with one integer field."""
  pattern: str = DEFAULT_PATTERN
  first_index: int = DEFAULT_FIRST_INDEX

  def __post_init__(self):
    match = _PATTERN_RE.match(self.pattern)
    if not match or "/" in self.pattern:
      raise DataError(f"config.data.frame_pattern must be a file name with one integer field "
                      f"such as 'img_{{:05d}}.jpg' or '{{:06d}}.jpg', got {self.pattern!r}")
    if self.first_index not in (0, 1):
      raise DataError(f"config.data.frame_first_index must be 0 or 1, got {self.first_index}")

  def name(self, index: int) -> str:
    """The file name of frame `index` (0-based)."""
    return self.pattern.format(index + self.first_index)

  def tensor_names(self, indices: tf.Tensor) -> tf.Tensor:
    """Graph-side `name` for an int tensor of 0-based indices."""
    match = _PATTERN_RE.match(self.pattern)
    width = int(match["width"] or 0)
    numbers = tf.strings.as_string(tf.cast(indices, tf.int64) + self.first_index, width=width,
                                   fill="0" if match["fill"] else " ")
    return match["prefix"] + numbers + match["suffix"]

  def matches(self, file_name: str) -> bool:
    """Whether a file is named like a frame of this pattern (any number)."""
    match = _PATTERN_RE.match(self.pattern)
    return re.fullmatch(re.escape(match["prefix"]) + r"\d+" + re.escape(match["suffix"]),
                        file_name) is not None

  def glob(self) -> str:
    match = _PATTERN_RE.match(self.pattern)
    return _escape_glob(match["prefix"]) + "*" + _escape_glob(match["suffix"])


def _escape_glob(text: str) -> str:
  return _GLOB_SPECIAL.sub(r"[\1]", text)


@dataclasses.dataclass(frozen=True)
class VideoList:
  """A parsed list file: the videos' folders (relative to the root), frame counts and labels."""
  path: str
  folders: tuple[str, ...]
  num_frames: np.ndarray          # int32
  labels: np.ndarray              # int32
  problems: tuple[str, ...] = ()  # lines that were skipped, each naming the line and the reason

  def __len__(self) -> int:
    return len(self.folders)


def read_list(path: str) -> VideoList:
  """Reads 'folder num_frames label' lines; bad lines are skipped and described, not fatal.

  The folder may contain spaces (the last two fields are the numbers). Folders are relative to
  the dataset root and must stay inside it: an absolute path or one that climbs out with '..' is
  a bad line, whatever directory the list file itself is in. The check is on the text ('a/../b'
  is read as 'b'), so it needs no file system access; a symlink the dataset itself holds is
  followed like any folder. A BOM, CRLF line ends and blank lines are tolerated (a line that is
  not UTF-8 is a bad line). A list with no usable line is an error.
  """
  if not tf.io.gfile.exists(path):
    raise DataError(f"video list {path} does not exist (expected 'folder num_frames label' lines)")
  folders, counts, labels, problems = [], [], [], []
  lines = textlist.read_lines(path, on_bad=lambda _, message: problems.append(message))
  for line_no, line in lines:
    parts = line.split()
    if len(parts) < 3 or not parts[-2].isdigit() or not parts[-1].lstrip("-").isdigit():
      problems.append(f"{path} line {line_no}: expected 'folder num_frames label', got {line!r}")
      continue
    folder = textlist.contained_path(" ".join(parts[:-2]))
    if folder is None:
      problems.append(f"{path} line {line_no}: folder {' '.join(parts[:-2])!r} is not a relative "
                      "path inside the dataset root")
      continue
    folders.append(folder)
    counts.append(int(parts[-2]))
    labels.append(int(parts[-1]))
  if not folders:
    detail = f" ({len(problems)} bad lines, first: {problems[0]})" if problems else ""
    raise DataError(f"video list {path} lists no videos{detail}")
  return VideoList(path=path, folders=tuple(folders), num_frames=np.asarray(counts, np.int32),
                   labels=np.asarray(labels, np.int32), problems=tuple(problems))


def write_list(path: str, rows: Sequence[tuple[str, int, int]]) -> None:
  """Writes 'folder num_frames label' lines atomically (the reference's format)."""
  for folder, _, _ in rows:
    if any(c.isspace() for c in folder):
      raise ValueError(f"frame folder {folder!r} contains whitespace, which list files cannot hold")
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write("".join(f"{folder} {count} {label}\n" for folder, count, label in rows))
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_frames(root: str, folder: str, jpegs: Sequence[bytes],
                 names: FrameNames = FrameNames()) -> None:
  """Writes one video's frames under ROOT/folder, atomically: a reader sees all of them or none.

  They go into a temporary sibling folder that is renamed when complete (a local or mounted
  file system; copy the finished dataset to a bucket afterwards). An existing folder is replaced.
  """
  final = os.path.join(root, folder)
  # One fixed name per video (chunks never share a video): a killed writer's leftover is
  # replaced by the next writer of the same video, without listing a directory of 240k videos.
  tmp = f"{final}.tmp"
  if os.path.exists(tmp):
    shutil.rmtree(tmp)
  os.makedirs(tmp)
  for i, data in enumerate(jpegs):
    with open(os.path.join(tmp, names.name(i)), "wb") as f:
      f.write(data)
  if os.path.exists(final):
    shutil.rmtree(final)
  os.rename(tmp, final)


MANIFEST_VERSION = 1


def write_manifest(root: str, split: str, settings: dict, names: FrameNames = FrameNames(), /,
                   **extra) -> None:
  """ROOT/SPLIT.manifest.json: how the frames were made, read back by the source and predict."""
  manifest = {"version": MANIFEST_VERSION, "layout": "frames", "settings": settings,
              "frame_pattern": names.pattern, "frame_first_index": names.first_index, **extra}
  path = manifest_path(root, split)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def read_manifest(root: str, split: str) -> dict | None:
  """The preparation manifest of a split, or None when there is none (e.g. reference folders)."""
  path = manifest_path(root, split)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      return json.load(f)
  except (ValueError, tf.errors.OpError) as e:
    raise DataError(f"{path} is not a readable manifest ({e})") from e


class RandomAccessStreams:
  """Training and evaluation streams over N videos that can be read in any order.

  A subclass sets `num_records` and implements open / read / failure on {'video': list index}.
  """

  random_access = True
  num_records: int

  def train_records(self, *, seed: int, process_index: int, process_count: int, start: int,
                    num_epochs: int | None = None, **unused) -> tf.data.Dataset:
    """{'index': p, 'video', 'position'} for this process's stream positions p = start, start+1, ...

    Process i of P reads the global positions g = p * P + i: every epoch (N consecutive global
    positions) is split between the processes, disjoint and complete. Epoch e = g // N visits the
    list in the order of a bijection of [0, N) seeded by (seed, e), so position p is found
    without reading anything before it.
    """
    del unused
    n = self.num_records
    stop = None
    if num_epochs is not None:
      stop = max(0, -(-(num_epochs * n - process_index) // process_count))
    positions = tf.data.Dataset.range(start, stop if stop is not None else np.iinfo(np.int64).max)

    def locate(p):
      g = p * process_count + process_index
      epoch, k = g // n, g % n
      seed_pair = tf.stack([tf.constant(seed, tf.int64) * 7919 + _SHUFFLE_SALT, epoch])
      video = tf.random.experimental.index_shuffle(k, seed_pair, n - 1) if n > 1 else k
      return {"index": p, "video": video, "position": g}
    return positions.map(locate)

  def eval_records(self, *, process_index: int, process_count: int) -> tf.data.Dataset:
    """This process's videos i, i + P, ... in list order, {'index': local position, 'video'}."""
    videos = tf.data.Dataset.range(process_index, self.num_records, process_count)
    return videos.enumerate().map(lambda j, v: {"index": j, "video": v})

  def clip_seed(self, seed: int, element: dict) -> tf.Tensor:
    """A clip's randomness depends on its global position only, not on the process count."""
    position = element.get("position", element["index"])
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), position)

  def resume_position(self, positions: Sequence[int], process_index: int, process_count: int) -> int:
    """Where process i of P continues a stream that `len(positions)` processes left off.

    The global positions below min_j(p_j * P_old + j) were all read; the new processes start at
    the first of their positions at or after it (a few clips past it may be read twice).
    """
    old = len(positions)
    done = min(p * old + j for j, p in enumerate(positions))
    return max(0, -(-(done - process_index) // process_count))


class FrameSource(RandomAccessStreams):
  """Random access to the videos of one list: the pipeline's `Source` for frame folders."""

  def __init__(self, root: str, videos: VideoList, class_names: Sequence[str], *,
               names: FrameNames = FrameNames(), check_frame_counts: bool = True,
               decode=None, description: str = "", frame_short_side: int = 0):
    self.root = root.rstrip("/")
    self.videos = videos
    self.class_names = tuple(class_names)
    self.names = names
    self.check_frame_counts = check_frame_counts
    self.decode = decode
    self.frame_short_side = frame_short_side   # of the stored frames; 0: unknown
    self.description = description or f"frame folders under {root} listed in {videos.path}"
    self.num_records = len(videos)
    self._folders = tf.constant([f"{self.root}/{f}/" for f in videos.folders])
    self._lengths = tf.constant(videos.num_frames)
    self._labels = tf.constant(videos.labels, tf.int64)
    self._keys = tf.constant(list(videos.folders))

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  # One video ----------------------------------------------------------------------------------

  def open(self, element: dict) -> dict:
    """{'length', 'label', 'key', 'error', 'folder'}: the list's facts, checked cheaply."""
    video = element["video"]
    folder = tf.gather(self._folders, video)
    length = tf.gather(self._lengths, video)
    label = tf.gather(self._labels, video)
    error = tf.where(length < 1, errors.NO_FRAMES,
                     tf.where((label < 0) | (label >= self.num_classes), errors.LABEL, 0))
    if self.check_frame_counts:
      # The last listed frame exists and the one after it does not: one listing call, no data.
      last = folder + self.names.tensor_names(length - 1)
      after = folder + self.names.tensor_names(length)
      found = tf.io.matching_files(_escape_glob_tensor(tf.stack([last, after])))
      agrees = tf.equal(tf.size(found), 1) & tf.reduce_any(tf.equal(found, last))
      error = tf.where((error == 0) & tf.logical_not(agrees), errors.FRAME_COUNT, error)
    return {"length": length, "label": label, "key": tf.gather(self._keys, video),
            "error": tf.cast(error, tf.int32), "folder": folder}

  def read(self, opened: dict, indices: tf.Tensor) -> tf.Tensor:
    """The JPEG bytes of frames `indices` (0-based): one file read each, nothing else."""
    paths = opened["folder"] + self.names.tensor_names(indices)
    if indices.shape.rank == 1 and indices.shape[0] is not None:
      return tf.stack([tf.io.read_file(p) for p in tf.unstack(paths)])
    return tf.map_fn(tf.io.read_file, paths, fn_output_signature=tf.string)

  def key(self, element: dict) -> tf.Tensor:
    """The video's key without reading anything (a failed video still names itself)."""
    return tf.gather(self._keys, element["video"])

  def failure(self, element: dict) -> tf.Tensor:
    """Why reading this video failed: missing frame files, or else an undecodable one."""
    folder = tf.gather(self._folders, element["video"])
    length = tf.gather(self._lengths, element["video"])
    present = tf.size(tf.io.matching_files(_escape_glob_tensor(folder) + self.names.glob()))
    return tf.cast(tf.where(present < length, errors.MISSING_FRAMES,
                            tf.where(present > length, errors.FRAME_COUNT, errors.UNDECODABLE)),
                   tf.int32)


def _escape_glob_tensor(text: tf.Tensor) -> tf.Tensor:
  return tf.strings.regex_replace(text, r"([*?\[])", r"[\1]")
