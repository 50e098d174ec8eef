"""The DMVR / Scenic on-disk format: SequenceExample TFRecord shards of JPEG frames.

One record is one video:
  context        'clip/label/index' int64, 'clip/label/text' bytes, 'video/filename' bytes
  feature_lists  'image/encoded': one bytes Feature per frame (a single Feature holding every
                 frame is the classic mistake; it fails to parse with "Number of values != expected")

Shards are named NAME-00000-of-00128 and sit in one directory with `labels.txt`, the class names
in label order (one per line), built from a sorted class list so that every run agrees.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import tensorflow as tf

from msca_jax.data import textlist
from msca_jax.data.errors import DataError

FRAMES_KEY = "image/encoded"
LABEL_KEY = "clip/label/index"
TEXT_KEY = "clip/label/text"
FILENAME_KEY = "video/filename"
LABELS_FILE = "labels.txt"

_SHARD_RE = re.compile(r"^(?P<name>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$")


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}"


def make_example(frames: Sequence[bytes], label: int, text: str = "", filename: str = "") -> bytes:
  """Serialises one video (a list of encoded JPEG frames) as a DMVR SequenceExample."""
  example = tf.train.SequenceExample()
  context = example.context.feature
  context[LABEL_KEY].int64_list.value.append(int(label))
  context[TEXT_KEY].bytes_list.value.append(text.encode())
  context[FILENAME_KEY].bytes_list.value.append(filename.encode())
  frame_list = example.feature_lists.feature_list[FRAMES_KEY]
  for frame in frames:
    frame_list.feature.add().bytes_list.value.append(frame)
  # Deterministic map order: the same video gives the same bytes in every process (resumable shards).
  return example.SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Graph-side parse: {'frames': string[T], 'label': int64, 'text': string, 'filename': string}."""
  context, sequence = tf.io.parse_single_sequence_example(
      serialized,
      context_features={
          LABEL_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
          TEXT_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
          FILENAME_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
      },
      sequence_features={FRAMES_KEY: tf.io.FixedLenSequenceFeature([], tf.string)})
  return {"frames": sequence[FRAMES_KEY], "label": context[LABEL_KEY],
          "text": context[TEXT_KEY], "filename": context[FILENAME_KEY]}


def write_labels(directory: str, class_names: Sequence[str]) -> None:
  """Writes labels.txt, or checks that an existing one holds the same classes."""
  path = os.path.join(directory, LABELS_FILE)
  if tf.io.gfile.exists(path):
    existing = read_labels(directory)
    if existing != list(class_names):
      raise DataError(f"{path} already holds a different class list ({len(existing)} classes, "
                      f"first {existing[:3]}) than this run ({len(class_names)} classes, first "
                      f"{list(class_names)[:3]}); write to another directory")
    return
  tf.io.gfile.makedirs(directory)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write("".join(f"{name}\n" for name in class_names))
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def read_labels(directory: str) -> list[str]:
  """labels.txt: one class name per line (a BOM, CRLF, surrounding blanks and blank lines are
  tolerated; a repeated name is an error naming its line)."""
  path = os.path.join(directory, LABELS_FILE)
  if not tf.io.gfile.exists(path):
    raise DataError(f"no label map: {path} is missing (it is written by msca_jax.tools.prepare_videos)")
  lines = textlist.read_lines(path)
  textlist.check_unique(path, lines)
  return [name for _, name in lines]


_HEADER_FIELDS = {"index", "id", "name", "label", "class", "class_name"}


def read_class_list(path: str) -> list[str]:
  """A user's class file: one name per line, or 'index,name' / 'name,index' CSV rows (read as
  `textlist.read_lines` does; a repeated name is an error naming its line)."""
  if not tf.io.gfile.exists(path):
    raise DataError(f"--classes file {path} does not exist")
  rows = []
  for line_no, row in textlist.read_lines(path):
    parts = [p.strip().strip('"') for p in row.split(",")]
    if not rows and {p.lower() for p in parts} <= _HEADER_FIELDS:
      continue  # a header such as 'name' or 'index,name'
    if len(parts) == 2 and parts[0].isdigit():
      parts = [parts[1]]
    elif len(parts) == 2 and parts[1].isdigit():
      parts = [parts[0]]
    rows.append((line_no, ",".join(parts)))
  if not rows:
    raise DataError(f"--classes file {path} holds no class names")
  textlist.check_unique(path, rows)
  return [name for _, name in rows]


def list_shards(directory: str, split: str) -> list[str]:
  """The complete set of shard files of a split, checked: none missing, one shard count."""
  if not tf.io.gfile.isdir(directory):
    raise DataError(f"data directory {directory} does not exist")
  found: dict[int, set[int]] = {}
  for entry in tf.io.gfile.listdir(directory):
    match = _SHARD_RE.match(entry.rstrip("/"))
    if match and match["name"] == split:
      found.setdefault(int(match["count"]), set()).add(int(match["index"]))
  if not found:
    raise DataError(f"no shards for split {split!r} in {directory}: expected files named "
                    f"{shard_name(split, 0, 1)}, ... (written by msca_jax.tools.prepare_videos)")
  if len(found) > 1:
    raise DataError(f"{directory} mixes shard counts {sorted(found)} for split {split!r}; "
                    "remove the stale shards")
  (count, indices), = found.items()
  missing = sorted(set(range(count)) - indices)
  if missing:
    raise DataError(f"{directory}: split {split!r} is incomplete, {len(missing)} of {count} shards "
                    f"missing (first: {shard_name(split, missing[0], count)}); finish the "
                    "preparation (a rerun resumes) or point at a complete directory")
  return [os.path.join(directory, shard_name(split, i, count)) for i in range(count)]


def files_for_process(files: Sequence[str], process_index: int, process_count: int) -> list[str]:
  """This host's disjoint share of the shard files (every host gets at least one)."""
  if len(files) < process_count:
    raise DataError(f"{len(files)} shard files cannot be split over {process_count} processes: "
                    "write at least one shard per process (prepare_videos --num_shards)")
  return list(files[process_index::process_count])


class ShardWriter:
  """Writes one shard atomically: NAME.tmp while open, renamed when closed without error."""

  def __init__(self, path: str):
    self.path = path
    self._writer = tf.io.TFRecordWriter(path + ".tmp")
    self.count = 0

  def write(self, record: bytes) -> None:
    self._writer.write(record)
    self.count += 1

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.close()
    if exc_type is None:
      tf.io.gfile.rename(self.path + ".tmp", self.path, overwrite=True)
    else:
      tf.io.gfile.remove(self.path + ".tmp")


def write_shards(directory: str, split: str, records: Iterable[bytes], num_shards: int) -> list[str]:
  """Round-robins serialised records over `num_shards` shards; returns their paths."""
  tf.io.gfile.makedirs(directory)
  paths = [os.path.join(directory, shard_name(split, i, num_shards)) for i in range(num_shards)]
  writers = [ShardWriter(p) for p in paths]
  try:
    for i, record in enumerate(records):
      writers[i % num_shards].write(record)
  except BaseException as e:
    for w in writers:
      w.__exit__(type(e), e, None)
    raise
  for w in writers:
    w.__exit__(None, None, None)
  return paths
