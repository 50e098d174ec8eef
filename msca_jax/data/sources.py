"""Where videos come from: frame folders, DMVR shards, TFDS datasets and the synthetic set, behind
one interface the pipeline reads.

Two kinds of source (docs/data.md compares their costs):
  * random access, `frames.FrameSource`: one JPEG file per frame and a list of videos. A clip
    reads only its own frames, an epoch is a permutation of the list computed from (seed, epoch),
    and a stream resumes at any position in constant time and bytes. What `prepare_videos`
    writes, the reference code's frame folders, and the synthetic dataset.
  * sequential, `RecordSource`: TFRecord files holding whole videos (DMVR / Scenic shards, a TFDS
    dataset). A clip reads its whole video; an epoch shuffles the file order and a buffer of
    records; resuming re-reads the current epoch up to the saved position.

Every source gives the pipeline the same graph-side operations on one element of its streams:
  open(element)         -> {'length', 'label', 'key', 'error', ...}: cheap facts and checks
  read(opened, indices) -> string[n]: the JPEG bytes of the frames at `indices`
  failure(element)      -> the skip reason of an element whose processing raised
and host-side ones: train_records / eval_records (the streams), clip_seed and resume_position.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from msca_jax.data import dmvr, errors, frames, synthetic
from msca_jax.data.decode import DecodeSettings
from msca_jax.data.errors import DataError

SOURCES = ("frames", "synthetic", "dmvr", "tfds")
# A sequential stream's element index is epoch * EPOCH_STRIDE + record-in-epoch, so a saved
# position says which epoch to start and how far into it, with no count of the files needed.
EPOCH_STRIDE = 1 << 32


@dataclasses.dataclass(frozen=True, eq=False)
class RecordSource:
  """TFRecord files of whole videos, plus a parser from a record to frames / label / key."""
  description: str                          # for logs: what was read from where
  files: tuple[str, ...]
  parse: Callable[[tf.Tensor], dict]        # serialised record -> {'frames', 'label', 'key'}
  class_names: tuple[str, ...]
  recorded_count: int | None = None         # when the writer recorded it
  decode: DecodeSettings = DecodeSettings()
  frame_short_side: int = 0                 # of the stored frames (recorded, or measured); 0: unknown

  random_access = False

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @functools.cached_property
  def num_records(self) -> int:
    """Videos in the files: the writer's count, or the record headers counted once."""
    if self.recorded_count is not None:
      return self.recorded_count
    return sum(count_records(self.files))

  def files_for_process(self, process_index: int, process_count: int) -> list[str]:
    return dmvr.files_for_process(self.files, process_index, process_count)

  # Streams ------------------------------------------------------------------------------------

  def train_records(self, *, seed: int, process_index: int, process_count: int, start: int,
                    shuffle_buffer: int, deterministic: bool, num_epochs: int | None = None
                    ) -> tf.data.Dataset:
    """{'record', 'corrupt', 'index'}: epochs of this process's files, from position `start`.

    Epoch e reads the files in an order seeded by (seed, process, e), interleaved, through a
    shuffle buffer seeded the same way; its records are indexed e * EPOCH_STRIDE + j. Starting at
    a position re-reads that epoch up to it, never an earlier epoch.
    """
    files = self.files_for_process(process_index, process_count)
    sizes = tf.constant(file_sizes(files), tf.int64)
    paths = tf.constant(files)
    first_epoch, offset = divmod(start, EPOCH_STRIDE)

    def epoch(e):
      epoch_seed = tf.stack([tf.constant(seed * 1000 + process_index, tf.int64), e])
      order = (tf.random.experimental.index_shuffle(tf.range(len(files), dtype=tf.int64),
                                                    epoch_seed, len(files) - 1)
               if len(files) > 1 else tf.zeros([1], tf.int64))
      records = tf.data.Dataset.from_tensor_slices((tf.gather(paths, order), tf.gather(sizes, order)))
      records = records.interleave(read_records, cycle_length=min(len(files), 16), block_length=1,
                                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
      records = records.shuffle(shuffle_buffer, seed=epoch_seed[0] * 1000003 + e)
      return records.enumerate().map(lambda j, r: dict(r, index=e * EPOCH_STRIDE + j))

    last = first_epoch + num_epochs if num_epochs is not None else np.iinfo(np.int64).max
    return tf.data.Dataset.range(first_epoch, last).flat_map(epoch).skip(offset)

  def eval_records(self, *, process_index: int, process_count: int) -> tf.data.Dataset:
    """{'record', 'corrupt', 'index'}: this process's files once, in order."""
    files = self.files_for_process(process_index, process_count)
    records = tf.data.Dataset.from_tensor_slices((files, tf.constant(file_sizes(files), tf.int64)))
    records = records.interleave(read_records, cycle_length=min(len(files), 16), block_length=1,
                                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return records.enumerate().map(lambda j, r: dict(r, index=j))

  def clip_seed(self, seed: int, element: dict) -> tf.Tensor:
    return tf.random.experimental.stateless_fold_in(tf.constant([seed, 1], tf.int64),
                                                    element["index"])

  def resume_position(self, positions: Sequence[int], process_index: int, process_count: int) -> int:
    """Another process count reads other files: the earliest saved epoch, at the same fraction."""
    del process_index
    epochs = [p // EPOCH_STRIDE for p in positions]
    epoch = min(epochs)
    offsets = [p % EPOCH_STRIDE for p, e in zip(positions, epochs) if e == epoch]
    return epoch * EPOCH_STRIDE + sum(offsets) // process_count

  # One video ----------------------------------------------------------------------------------

  def open(self, element: dict) -> dict:
    def parsed():
      record = self.parse(element["record"])
      frames_, label = record["frames"], record["label"]
      error = tf.where(tf.size(frames_) == 0, errors.NO_FRAMES,
                       tf.where((label < 0) | (label >= self.num_classes), errors.LABEL, 0))
      return {"frames": frames_, "label": tf.cast(label, tf.int64), "key": record["key"],
              "error": tf.cast(error, tf.int32)}

    def corrupt():
      return {"frames": tf.zeros([0], tf.string), "label": tf.constant(0, tf.int64),
              "key": tf.constant(""), "error": tf.constant(errors.CORRUPT, tf.int32)}
    opened = tf.cond(element["corrupt"], corrupt, parsed)
    opened["length"] = tf.size(opened["frames"])
    return opened

  def read(self, opened: dict, indices: tf.Tensor) -> tf.Tensor:
    return tf.gather(opened["frames"], indices)

  def key(self, element: dict) -> tf.Tensor:
    """Unknown without parsing the record, which is what failed."""
    del element
    return tf.constant("")

  def failure(self, element: dict) -> tf.Tensor:
    del element
    return tf.constant(errors.UNDECODABLE, tf.int32)


class MemorySource(frames.RandomAccessStreams):
  """Videos already in memory as lists of JPEG frames: what `predict` feeds the eval stream."""

  def __init__(self, videos: Sequence[Sequence[bytes]], class_names: Sequence[str], *,
               keys: Sequence[str] | None = None, labels: Sequence[int] | None = None,
               decode: DecodeSettings = DecodeSettings(), description: str = "videos in memory"):
    if not videos:
      raise DataError("no videos given")
    self.class_names = tuple(class_names)
    self.decode = decode
    self.description = description
    self.num_records = len(videos)
    lengths = [len(v) for v in videos]
    flat = [frame for v in videos for frame in v]
    self._frames = tf.RaggedTensor.from_row_lengths(tf.constant(flat or [b""], tf.string)[:len(flat)],
                                                    tf.constant(lengths, tf.int64))
    self._keys = tf.constant(list(keys) if keys is not None else [str(i) for i in range(len(videos))])
    self._labels = tf.constant(list(labels) if labels is not None else [0] * len(videos), tf.int64)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def open(self, element: dict) -> dict:
    video = element["video"]
    frames_ = self._frames[video]
    label = tf.gather(self._labels, video)
    error = tf.where(tf.size(frames_) == 0, errors.NO_FRAMES,
                     tf.where((label < 0) | (label >= self.num_classes), errors.LABEL, 0))
    return {"frames": frames_, "length": tf.size(frames_), "label": label,
            "key": tf.gather(self._keys, video), "error": tf.cast(error, tf.int32)}

  def read(self, opened: dict, indices: tf.Tensor) -> tf.Tensor:
    return tf.gather(opened["frames"], indices)

  def key(self, element: dict) -> tf.Tensor:
    return tf.gather(self._keys, element["video"])

  def failure(self, element: dict) -> tf.Tensor:
    del element
    return tf.constant(errors.UNDECODABLE, tf.int32)


Source = RecordSource | frames.FrameSource | MemorySource


def _parse_dmvr(serialized: tf.Tensor) -> dict:
  parsed = dmvr.parse_example(serialized)
  return {"frames": parsed["frames"], "label": parsed["label"], "key": parsed["filename"]}


def _manifest_decode(path: str) -> DecodeSettings | None:
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      return DecodeSettings.from_json(json.load(f)["settings"], origin=f"from {path}")
  except (ValueError, KeyError, TypeError, tf.errors.OpError):
    return None


def dmvr_source(directory: str, split: str) -> RecordSource:
  files = dmvr.list_shards(directory, split)
  names = dmvr.read_labels(directory)
  manifest = os.path.join(directory, f"{split}.manifest.json")
  decode = _manifest_decode(manifest) or DecodeSettings(origin=f"defaults: no readable {manifest}")
  found = _manifest_decode(manifest) is not None
  return RecordSource(description=f"DMVR shards {directory}/{split}-*-of-{len(files):05d}",
                      files=tuple(files), parse=_parse_dmvr, class_names=tuple(names), decode=decode,
                      frame_short_side=(decode.short_side if found and decode.short_side
                                        else _first_record_short_side(files, _parse_dmvr)))


def _first_record_short_side(files: Sequence[str], parse) -> int:
  """The short side of the first record's first frame (0 if it cannot be read): what the stored
  frames measure when nothing recorded it."""
  try:
    for record in tf.data.TFRecordDataset(list(files[:1])).take(1):
      jpegs = parse(record)["frames"]
      if tf.size(jpegs) > 0:
        height, width = tf.io.extract_jpeg_shape(jpegs[0]).numpy()[:2]
        return int(min(height, width))
  except (tf.errors.OpError, ValueError):
    pass
  return 0


def tfds_source(name: str, data_dir: str, split: str) -> RecordSource:
  """A dataset prepared by tensorflow-datasets (e.g. 'kinetics/400' from msca_jax.data.kinetics).

  Only whole splits: the files are read directly, sharded over hosts like DMVR shards.
  """
  import tensorflow_datasets as tfds
  from msca_jax.data import kinetics  # noqa: F401  (registers the Kinetics builder)

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises several types for unknown names and configs
    raise DataError(f"config.data.tfds_name {name!r}: {e}") from e
  if not builder.is_prepared():
    raise DataError(f"TFDS dataset {name} is not prepared under {data_dir}: run "
                    f"python -m msca_jax.data.kinetics (or tfds build) with this --data_dir first")
  if split not in builder.info.splits:
    raise DataError(f"TFDS dataset {name} has no split {split!r}; it has {sorted(builder.info.splits)}")
  features = builder.info.features
  for field in ("video", "label"):
    if field not in features:
      raise DataError(f"TFDS dataset {name} has no {field!r} feature; it has {sorted(features)}")
  split_info = builder.info.splits[split]
  serialized_info = features.get_serialized_info()
  example_parser = tfds.core.example_parser.ExampleParser(serialized_info)
  key_field = "video_id" if "video_id" in features else None

  def parse(serialized: tf.Tensor) -> dict:
    raw = example_parser.parse_example(serialized)
    # The video feature stores each frame's encoded JPEG; skipping TFDS's decoding keeps them.
    frames_ = raw["video"]
    if isinstance(frames_, dict):
      raise DataError(f"TFDS dataset {name}: unexpected video encoding {sorted(frames_)}")
    return {"frames": tf.reshape(frames_, [-1]), "label": tf.cast(raw["label"], tf.int64),
            "key": raw[key_field] if key_field else tf.constant("")}

  metadata = builder.info.metadata or {}
  origin = f"from the TFDS metadata of {name} in {data_dir}"
  try:
    decode, found = DecodeSettings.from_json(dict(metadata), origin=origin), True
  except (KeyError, TypeError, ValueError):
    decode = DecodeSettings(origin=f"defaults: {name} in {data_dir} records no settings")
    found = False
  files = tuple(str(p) for p in split_info.filepaths)
  return RecordSource(description=f"TFDS {name} split {split!r} in {data_dir}", files=files,
                      parse=parse, class_names=tuple(features["label"].names),
                      recorded_count=int(split_info.num_examples), decode=decode,
                      frame_short_side=(decode.short_side if found and decode.short_side
                                        else _first_record_short_side(files, parse)))


def frame_source(data, split: str, *, root: str | None = None,
                 num_classes: int | None = None) -> frames.FrameSource:
  """Frame folders under config.data.path (or `root`), listed in SPLIT.txt or the configured list.

  Class names come from ROOT/labels.txt; a reference dataset without one gets '0', '1', ... up to
  `num_classes` (the model's) or the largest label in the list.
  """
  root = root or data.path
  if not root:
    raise DataError("config.data.path must name the frame-folder root (config.data.source='frames')")
  list_file = {data.train_split: data.get("train_list", ""),
               data.eval_split: data.get("eval_list", "")}.get(split, "") or frames.list_path(root, split)
  videos = frames.read_list(list_file)
  manifest = frames.read_manifest(root, split)
  labels_path = os.path.join(root, frames.LABELS_FILE)
  if tf.io.gfile.exists(labels_path):
    names = dmvr.read_labels(root)
  else:
    count = max(num_classes or 0, int(videos.labels.max()) + 1)
    names = [str(i) for i in range(count)]
  if manifest is not None:
    decode = DecodeSettings.from_json(manifest["settings"], origin=f"from {frames.manifest_path(root, split)}")
    pattern = manifest.get("frame_pattern", frames.DEFAULT_PATTERN)
    first = int(manifest.get("frame_first_index", frames.DEFAULT_FIRST_INDEX))
  else:
    decode = _sniff_decode(root, videos, data)
    pattern, first = data.frame_pattern, int(data.frame_first_index)
  names_ = frames.FrameNames(pattern, first)
  _check_first_frame(root, videos, names_)
  short_side = decode.short_side or _sniff_decode(root, videos, data).short_side
  return frames.FrameSource(root, videos, names, names=names_, frame_short_side=short_side,
                            check_frame_counts=bool(data.get("check_frame_counts", True)),
                            decode=decode)


def _check_first_frame(root: str, videos: frames.VideoList, names: frames.FrameNames) -> None:
  """The frame files of the first listed video follow config.data.frame_pattern and
  frame_first_index: a wrong setting fails now, naming the files that are there, instead of
  every clip being skipped. A first video that is merely bad (missing, empty, a frame short) is
  left to be counted when it is read, like any other."""
  folder = os.path.join(root, videos.folders[0])
  if not tf.io.gfile.isdir(folder):
    return
  present = set(tf.io.gfile.listdir(folder))
  if not present:
    return
  zero, one = names.pattern.format(0), names.pattern.format(1)
  setting = "config.data.frame_first_index"
  if names.first_index == 1 and zero in present:
    raise DataError(f"{folder} holds {zero}: its frames are numbered from 0, set {setting}=0")
  if names.first_index == 0 and zero not in present and one in present:
    raise DataError(f"{folder} holds {one} but no {zero}: its frames are numbered from 1, set "
                    f"{setting}=1")
  if not any(names.matches(name) for name in present):
    raise DataError(f"{os.path.join(folder, names.name(0))} does not exist, and no file in {folder} "
                    f"is named like it (it holds {sorted(present)[:3]}): set "
                    "config.data.frame_pattern (e.g. 'img_{:05d}.jpg' or '{:06d}.jpg') and "
                    f"{setting} (0 or 1) to match the frame files")


def _sniff_decode(root: str, videos: frames.VideoList, data) -> DecodeSettings:
  """Settings of frame folders prepared elsewhere: the frame rate is the config's, the short side
  is read off the first frame, the JPEG quality is unknown (the default is assumed)."""
  origin = "the reference frame folders' first frame; fps from config.data.fps; JPEG quality assumed"
  try:
    names = frames.FrameNames(data.frame_pattern, int(data.frame_first_index))
    path = os.path.join(root, videos.folders[0], names.name(0))
    height, width = tf.io.extract_jpeg_shape(tf.io.read_file(path)).numpy()[:2]
    return DecodeSettings(fps=float(data.fps), short_side=int(min(height, width)), origin=origin)
  except (tf.errors.OpError, DataError):
    return DecodeSettings(fps=float(data.fps), origin="defaults: the first frame was not readable")


def make_source(data, split: str, *, num_classes: int | None = None) -> Source:
  """The Source that config.data describes, for one split: what a run asks of its data (class
  names, `num_records`, `decode`, `description`) is on it. With `num_classes` (the model's), a
  dataset of another number of classes is an error."""
  source = _make_source(data, split, num_classes)
  if num_classes is not None and source.num_classes != num_classes:
    raise DataError(f"config.model.num_classes = {num_classes}, but {source.description} has "
                    f"{source.num_classes} classes")
  return source


def _make_source(data, split: str, num_classes: int | None) -> Source:
  if data.source == "synthetic":
    return frame_source(data, split, root=synthetic.ensure_dataset(data.synthetic))
  if data.source == "frames":
    return frame_source(data, split, num_classes=num_classes)
  if data.source == "dmvr":
    if not data.path:
      raise DataError("config.data.path must name the DMVR shard directory (config.data.source='dmvr')")
    return dmvr_source(data.path, split)
  if data.source == "tfds":
    if not data.path:
      raise DataError("config.data.path must name the TFDS data_dir (config.data.source='tfds')")
    return tfds_source(data.tfds_name, data.path, split)
  raise DataError(f"config.data.source must be one of {SOURCES}, got {data.source!r}")


def decode_settings(data) -> DecodeSettings:
  """How the frames of config.data's dataset were made, read from what its preparation recorded
  (without opening the dataset itself): the settings a new video must be decoded with."""
  if data.source == "synthetic":
    return DecodeSettings(short_side=int(data.synthetic.size), jpeg_quality=synthetic.JPEG_QUALITY,
                          origin="as the synthetic dataset stores frames")
  if not data.path:
    return DecodeSettings(fps=float(data.fps), origin="the preparation defaults: config.data.path is empty")
  if data.source in ("frames", "dmvr"):
    path = (frames.manifest_path(data.path, data.eval_split) if data.source == "frames"
            else os.path.join(data.path, f"{data.eval_split}.manifest.json"))
    found = _manifest_decode(path)
    if found is not None:
      return found
    if data.source == "frames":
      try:
        return frame_source(data, data.eval_split).decode
      except DataError:
        pass
    return DecodeSettings(fps=float(data.fps), origin=f"the preparation defaults: no readable {path}")
  if data.source == "tfds":
    try:
      return tfds_source(data.tfds_name, data.path, data.eval_split).decode
    except DataError as e:
      return DecodeSettings(fps=float(data.fps), origin=f"the preparation defaults ({e})")
  raise DataError(f"config.data.source must be one of {SOURCES}, got {data.source!r}")


def stored_short_side(source: Source) -> int:
  """The short side of a source's stored frames: recorded, or measured on its first frame; the
  preparation default when neither is known."""
  return (getattr(source, "frame_short_side", 0) or source.decode.short_side
          or DecodeSettings().short_side)


# ---------------------------------------------------------------------------------------------
# TFRecord files.

def _per_file(function: Callable[[str], int], paths: Sequence[str]) -> list[int]:
  """`function` of every file, in parallel (on gs:// every request is a round trip)."""
  def one(path: str) -> int:
    try:
      return function(path)
    except tf.errors.NotFoundError as e:
      raise DataError(f"data file {path} does not exist") from e
  with concurrent.futures.ThreadPoolExecutor(max(1, min(32, len(paths)))) as pool:
    return list(pool.map(one, paths))


def file_sizes(paths: Sequence[str]) -> list[int]:
  """Byte sizes."""
  return _per_file(lambda path: tf.io.gfile.stat(path).length, paths)


RECORD_OVERHEAD = 16  # TFRecord framing: u64 length, u32 length CRC, u32 data CRC


def _count_file_records(path: str) -> int:
  """Records in one TFRecord file, by hopping from length header to length header.

  Reads 12 bytes per record instead of the data, so a Kinetics split is counted in seconds on a
  local disk. A truncated tail is not counted (the pipeline skips it too).
  """
  count = position = 0
  size = tf.io.gfile.stat(path).length
  with tf.io.gfile.GFile(path, "rb") as f:
    while position + RECORD_OVERHEAD <= size:
      f.seek(position)
      header = f.read(8)
      length = int.from_bytes(header, "little")
      position += length + RECORD_OVERHEAD
      if position > size:
        break
      count += 1
  return count


def count_records(paths: Sequence[str]) -> list[int]:
  """Records per file (reads only the record headers)."""
  return _per_file(_count_file_records, paths)


def read_records(path: tf.Tensor, size: tf.Tensor) -> tf.data.Dataset:
  """{'record', 'corrupt'} for one TFRecord file; a read error ends the file with a marker.

  TFRecordDataset stops at the first corrupt or truncated record and raises; the error is
  dropped here, and the bytes the readable records account for are compared with the file's size:
  a file that did not read to its end yields one final element with corrupt=True (and an empty
  record), which the pipeline counts as a skipped shard tail.
  """
  records = tf.data.TFRecordDataset(path).ignore_errors()
  records = records.map(lambda r: (r, tf.strings.length(r, unit="BYTE") + RECORD_OVERHEAD))
  end = tf.data.Dataset.from_tensors((tf.constant(b""), tf.constant(-1)))

  def account(consumed, element):
    record, length = element
    is_end = length < 0
    consumed = consumed + tf.cast(tf.maximum(length, 0), tf.int64)
    return consumed, {"record": record, "end": is_end,
                      "corrupt": tf.logical_and(is_end, tf.not_equal(consumed, size))}

  marked = records.concatenate(end).scan(tf.constant(0, tf.int64), account)
  return marked.filter(lambda e: tf.logical_or(tf.logical_not(e["end"]), e["corrupt"])).map(
      lambda e: {"record": e["record"], "corrupt": e["corrupt"]})
