"""Where records come from: DMVR shards or a TFDS-prepared dataset, behind one interface.

A `Source` is a list of TFRecord files plus a parser from a serialised record to
{'frames': string[T] JPEG frames, 'label': int64, 'key': string}. The pipeline reads the files
itself (per host, with corruption accounting) whichever tool wrote them, so DMVR shards, TFDS
datasets and the synthetic dataset share every later stage.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Callable, Sequence

import tensorflow as tf

from msca_jax.data import dmvr
from msca_jax.data.dmvr import DataError

SOURCES = ("synthetic", "dmvr", "tfds")


@dataclasses.dataclass(frozen=True)
class Source:
  description: str                          # for logs: what was read from where
  files: tuple[str, ...]
  parse: Callable[[tf.Tensor], dict]        # serialised record -> frames / label / key
  class_names: tuple[str, ...]
  num_records: int | None = None            # when the writer recorded it

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def files_for_process(self, process_index: int, process_count: int) -> list[str]:
    return dmvr.files_for_process(self.files, process_index, process_count)


def _parse_dmvr(serialized: tf.Tensor) -> dict:
  parsed = dmvr.parse_example(serialized)
  return {"frames": parsed["frames"], "label": parsed["label"], "key": parsed["filename"]}


def dmvr_source(directory: str, split: str) -> Source:
  files = dmvr.list_shards(directory, split)
  names = dmvr.read_labels(directory)
  return Source(description=f"DMVR shards {directory}/{split}-*-of-{len(files):05d}",
                files=tuple(files), parse=_parse_dmvr, class_names=tuple(names))


def tfds_source(name: str, data_dir: str, split: str) -> Source:
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
    frames = raw["video"]
    if isinstance(frames, dict):
      raise DataError(f"TFDS dataset {name}: unexpected video encoding {sorted(frames)}")
    return {"frames": tf.reshape(frames, [-1]), "label": tf.cast(raw["label"], tf.int64),
            "key": raw[key_field] if key_field else tf.constant("")}

  return Source(description=f"TFDS {name} split {split!r} in {data_dir}",
                files=tuple(str(p) for p in split_info.filepaths), parse=parse,
                class_names=tuple(features["label"].names),
                num_records=int(split_info.num_examples))


def make_source(data, split: str) -> Source:
  """The Source that config.data describes, for one split."""
  if data.source == "synthetic":
    from msca_jax.data import synthetic
    return dmvr_source(synthetic.ensure_shards(data.synthetic), split)
  if data.source == "dmvr":
    if not data.path:
      raise DataError("config.data.path must name the DMVR shard directory (config.data.source='dmvr')")
    return dmvr_source(data.path, split)
  if data.source == "tfds":
    if not data.path:
      raise DataError("config.data.path must name the TFDS data_dir (config.data.source='tfds')")
    return tfds_source(data.tfds_name, data.path, split)
  raise DataError(f"config.data.source must be one of {SOURCES}, got {data.source!r}")


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
