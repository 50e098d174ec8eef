r"""Converts DMVR shards or a TFDS video dataset to frame folders, copying the JPEG bytes.

    python -m msca_jax.tools.convert_to_frames --source=dmvr --path=/data/k400_dmvr \
        --split=train --output=/data/k400
    python -m msca_jax.tools.convert_to_frames --source=tfds --path=~/tensorflow_datasets \
        --tfds_name=kinetics/400 --split=validation --output=/data/k400

Why: frame folders are the random-access layout (docs/data.md compares the two). A clip reads only
its own frames instead of its whole video, an epoch is a permutation computed from (seed, epoch)
instead of a shuffle buffer of whole videos in host memory, and a stopped run resumes at its
position in constant time instead of re-reading the epoch up to it. Training then reads the output
with config.data.source='frames' and config.data.path=OUTPUT.

Cost: every record is read once, and every frame is written as its own file. The JPEG bytes are
copied, not decoded or re-encoded, so the frames are the source's pixels exactly, the output takes
about the source's bytes, and the manifest carries the source's decode settings (fps, short side,
JPEG quality). The price is one file per frame: about 250 per 10 s Kinetics video at 25 fps, some
60 million files for Kinetics-400 train, so the file system needs the inodes.

OUTPUT (a local or mounted file system: each video's folder is written aside and renamed into
place) gets the layout prepare_videos --format=frames writes:
  SPLIT/<key>/img_00001.jpg ...          the frames of each video
  SPLIT.txt                              'folder num_frames label' per video, written once every
                                         input file is done
  SPLIT.parts/NNNNN-of-NNNNN.txt         one per input file, its videos' lines: the unit of
                                         resumption (with its .failures.json report and a
                                         .folders.tsv journal of the folders it took)
  labels.txt                             the source's class names in label order
  SPLIT.manifest.json                    decode settings, frame names and 'converted_from'
  SPLIT.failures.tsv                     every record that was skipped, and why

A video's folder is its record's key (DMVR 'video/filename', TFDS 'video_id') cleaned the way
prepare_videos cleans keys (no video extension, whitespace made '_'), so prepare_videos' DMVR
shards convert to the folders its frame format would have written; a record without a key is
named SHARDNAME-RECORDINDEX, and keys that collide get a ~N suffix (which of two equal keys in
different files keeps the plain name depends on which was converted first).

A rerun with the same arguments resumes: finished input files are kept (to redo one, delete its
part; its videos go back to the same folders). A record that cannot be used (an unparsable record,
a corrupt or truncated file tail, a video without frames, a label outside the class list) is
reported and skipped; the run fails only when nothing at all could be converted. Input files are
converted by --workers threads (the work is reading, protobuf parsing and file writes, which
release the interpreter lock).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import sys
import threading
import time
from typing import Callable, Sequence

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
import tensorflow as tf

from msca_jax import cli
from msca_jax.data import dmvr, frames, preparation, sources
from msca_jax.data.errors import DataError
from msca_jax.progress import Progress

SOURCES = ("dmvr", "tfds")
JOURNAL_SUFFIX = ".folders.tsv"

def journal_path(part: str) -> str:
  """The folders an input file took, 'record_index<TAB>folder' lines written as it goes."""
  return part + JOURNAL_SUFFIX


@dataclasses.dataclass(frozen=True)
class _FileTask:
  index: int
  path: str           # the input file
  size: int
  part: str           # its list part in the output


def _read_journal(path: str) -> dict[int, str]:
  out = {}
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      fields = line[:-1].split("\t")
      # A torn last line (no newline: the writer stopped mid-line) is ignored.
      if line.endswith("\n") and len(fields) == 2 and fields[0].isdigit() and fields[1]:
        out[int(fields[0])] = fields[1]
  return out


def _read_part_folders(path: str) -> list[str]:
  with open(path) as f:
    return [line.split()[0] for line in f if line.strip()]


class _Converter:
  """Converts input files; shared by the worker threads (folder names are claimed under a lock)."""

  def __init__(self, source: sources.RecordSource, output: str, split: str,
               on_record: Callable[[int], None]):
    self.source = source
    self.output = output
    self.split = split
    self.on_record = on_record
    self.names = preparation.FolderNames(split)
    self.journals: dict[int, dict[int, str]] = {}
    self._lock = threading.Lock()
    self.stop = threading.Event()   # set on an interruption: the threads end at their next record
    # Traced once here: the worker threads then share one graph instead of running eager ops.
    self._parse = tf.function(source.parse, input_signature=[tf.TensorSpec([], tf.string)])
    self._parse.get_concrete_function()

  def reserve(self, index: int, part: str) -> None:
    """Marks the folders of input file `index` (finished or not) as taken."""
    journal = _read_journal(journal_path(part))
    self.journals[index] = journal
    for folder in journal.values():
      self.names.add(folder)
    if os.path.exists(part):
      for folder in _read_part_folders(part):
        self.names.add(folder)

  def _folder(self, task: _FileTask, record_index: int, key: str, journal) -> str:
    folder = self.journals.get(task.index, {}).get(record_index)
    if folder is not None:
      return folder  # this file was started before: the same record goes to the same folder
    with self._lock:
      folder = self.names.claim(key)
    # Journalled before any frame is written: a folder on disk always has an owner.
    journal.write(f"{record_index}\t{folder}\n")
    journal.flush()
    return folder

  def convert_file(self, task: _FileTask) -> preparation.ShardStats:
    """Writes every usable record of one input file, then its report and its part (last)."""
    stats, rows = preparation.ShardStats(), []
    name = os.path.basename(task.path)
    consumed = 0      # bytes of the records read, with their framing
    index = 0
    corrupt = False
    path = journal_path(task.part)
    if os.path.exists(path) and os.path.getsize(path):
      with open(path, "rb+") as f:   # end a torn last line, so that new lines stay whole
        f.seek(-1, os.SEEK_END)
        if f.read(1) != b"\n":
          f.write(b"\n")
    with open(path, "a") as journal:
      records = iter(tf.data.TFRecordDataset(task.path))
      while True:
        try:
          record = next(records)
        except StopIteration:
          break
        except tf.errors.OpError:
          corrupt = True
          break
        if self.stop.is_set():
          raise _Stopped("interrupted")
        consumed += len(record.numpy()) + sources.RECORD_OVERHEAD
        key = ""
        try:
          parsed = self._parse(record)
          key = parsed["key"].numpy().decode("utf-8", errors="replace") or f"{name}-{index}"
          jpegs = list(parsed["frames"].numpy())
          label = int(parsed["label"].numpy())
          if not jpegs:
            raise _Skip("the video has no frames")
          if not 0 <= label < self.source.num_classes:
            raise _Skip(f"label {label} is outside the class list [0, {self.source.num_classes})")
          folder = self._folder(task, index, key, journal)
          frames.write_frames(self.output, folder, jpegs)
        except Exception as e:  # pylint: disable=broad-except  # a bad record must not stop the run
          reason = _reason(e)
          if not key:
            key, reason = f"{name}-{index}", f"record {index} cannot be parsed: {reason}"
          stats.failures.append(preparation.Failure(key, task.path, reason))
        else:
          rows.append((folder, len(jpegs), label))
          stats.videos += 1
          stats.frames += len(jpegs)
          stats.bytes += sum(map(len, jpegs))
        index += 1
        self.on_record(1)
    if corrupt or consumed != task.size:
      stats.failures.append(preparation.Failure(
          f"{name}-{index}", task.path,
          f"corrupt or truncated after record {index}: bytes {consumed}..{task.size} of the file "
          "cannot be read (the records in them, if any, are lost)"))
    preparation.write_json(preparation.failures_path(task.part), preparation.shard_stats_json(stats))
    frames.write_list(task.part, rows)  # the part is the file's completion marker: written last
    return stats


class _Stopped(BaseException):
  """Raised in a worker thread once the run is interrupted (not caught as a file failure)."""


class _Skip(Exception):
  """A record that parsed but cannot be used; the message is the reason."""


def _reason(error: Exception) -> str:
  if isinstance(error, _Skip):
    return str(error)
  if isinstance(error, tf.errors.OpError):
    # The op's own words, without the graph's traceback and node names around them.
    message = re.sub(r"\{\{function_node [^}]*\}\}|\[\[[^\]]*\]\]|\[Op:[^\]]*\]", "", error.message)
    lines = [line.strip() for line in message.splitlines()
             if line.strip() and not line.strip().startswith(("File ", "Detected at node"))
             and line.strip() != "Graph execution error:"]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
  return preparation.reason(error)


def _fingerprint(files: Sequence[str], sizes: Sequence[int]) -> str:
  """Names and sizes of the input files, hashed: a rerun on other files is refused."""
  text = "".join(f"{os.path.basename(f)}\t{s}\n" for f, s in zip(files, sizes))
  return hashlib.sha1(text.encode()).hexdigest()[:16]


def _source(kind: str, path: str, split: str, tfds_name: str) -> sources.RecordSource:
  if kind == "dmvr":
    return sources.dmvr_source(path, split)
  if kind == "tfds":
    return sources.tfds_source(tfds_name, path, split)
  raise DataError(f"--source must be one of {SOURCES}, got {kind!r}")


def convert(source: str, path: str, split: str, output: str, *, tfds_name: str = "kinetics/400",
            workers: int = 0, progress_stream=None) -> preparation.Summary:
  """Converts (or resumes converting) one split to frame folders; see the module docstring.

  `workers` <= 1 converts in this thread. Raises DataError for a bad --path / --split / --output;
  records that cannot be used are listed in the returned summary instead.
  """
  start = time.monotonic()
  if not split or not re.fullmatch(r"[\w.\-]+", split):
    raise DataError(f"--split {split!r} must be a plain name such as 'train' or 'validation'")
  if not path:
    raise DataError("--path must name the DMVR shard directory or the TFDS data_dir")
  if source == "tfds" and not tfds_name:
    raise DataError("--tfds_name must name the TFDS dataset, e.g. kinetics/400")
  records = _source(source, path, split, tfds_name)
  if os.path.exists(output) and not os.path.isdir(output):
    raise DataError(f"--output {output} exists and is not a directory")
  if os.path.abspath(output) == os.path.abspath(path):
    raise DataError(f"--output {output} is the --path directory; convert to another directory")
  files = list(records.files)
  sizes = sources.file_sizes(files)
  names = frames.FrameNames()
  extra = {
      "classes": list(records.class_names),
      "settings_origin": records.decode.origin,
      "converted_from": {"source": source, "split": split, "path": os.path.abspath(path),
                         "tfds_name": tfds_name if source == "tfds" else None,
                         "description": records.description,
                         "files": len(files), "bytes": sum(sizes),
                         "fingerprint": _fingerprint(files, sizes)},
  }
  manifest = {"version": frames.MANIFEST_VERSION, "layout": "frames",
              "settings": records.decode.as_json(), "frame_pattern": names.pattern,
              "frame_first_index": names.first_index, **extra}
  manifest_path = frames.manifest_path(output, split)
  preparation.check_output(output, split, manifest_path, manifest)
  dmvr.write_labels(output, records.class_names)
  if not os.path.exists(manifest_path):
    frames.write_manifest(output, split, records.decode.as_json(), names, **extra)
  if records.decode.origin.startswith("defaults"):
    logging.warning("%s: the source records no decode settings; the manifest says %s",
                    records.description, records.decode.describe())
  os.makedirs(preparation.parts_dir(output, split), exist_ok=True)

  summary = preparation.Summary(split=split, output=output, num_shards=len(files), unit="chunks",
                    failures_path=os.path.join(output, f"{split}.failures.tsv"))
  lock = threading.Lock()
  progress: Progress | None = None

  def on_record(n: int) -> None:
    if progress is not None:
      with lock:
        progress.update(n)

  converter = _Converter(records, output, split, on_record)
  file_failures: dict[int, list[preparation.Failure]] = {}
  done: dict[int, preparation.ShardStats] = {}
  tasks = []
  for index, (file, size) in enumerate(zip(files, sizes)):
    part = preparation.part_path(output, split, index, len(files))
    converter.reserve(index, part)
    if os.path.exists(part):
      stats = preparation.read_shard_stats(part)
      if stats is None:
        logging.warning("%s exists but its report is missing or unreadable: its failed records "
                        "are not known", part)
        stats = preparation.ShardStats(videos=len(_read_part_folders(part)))
      summary.shards_done_before += 1
      summary.videos_done_before += stats.videos
      done[index] = stats
      file_failures[index] = stats.failures
    else:
      tasks.append(_FileTask(index=index, path=file, size=size, part=part))
  if summary.shards_done_before:
    logging.info("resuming: %d of %d input files are already converted",
                 summary.shards_done_before, len(files))

  def on_result(task: _FileTask, stats: preparation.ShardStats | None, error: str) -> None:
    with lock:
      if stats is None:
        summary.shards_failed += 1
        file_failures[task.index] = [preparation.Failure(os.path.basename(task.path), task.path,
                                             f"file failed: {error}")]
      else:
        summary.shards_written += 1
        summary.videos_written += stats.videos
        summary.frames += stats.frames
        summary.bytes += stats.bytes
        done[task.index] = stats
        file_failures[task.index] = stats.failures
      if progress is not None:
        progress.fields["failed"] = sum(map(len, file_failures.values()))

  if tasks:
    total = sum(sources.count_records([t.path for t in tasks]))
    with Progress(total, unit="videos", desc=split, stream=progress_stream) as progress:
      progress.update(0, failed=sum(map(len, file_failures.values())))
      _run(tasks, workers, converter, on_result)

  summary.failures = [f for i in sorted(file_failures) for f in file_failures[i]]
  summary.videos_total = sum(s.videos for s in done.values()) + len(summary.failures)
  preparation.write_failures_tsv(summary.failures_path, summary.failures)
  if not summary.shards_failed:
    preparation.assemble_list(output, split, len(files))
  summary.seconds = time.monotonic() - start
  return summary


def _run(tasks: Sequence[_FileTask], workers: int, converter: _Converter,
         on_result: Callable[[_FileTask, preparation.ShardStats | None, str], None]) -> None:
  def one(task: _FileTask) -> None:
    try:
      stats = converter.convert_file(task)
    except Exception as e:  # pylint: disable=broad-except  # e.g. a full disk: keep the other files
      on_result(task, None, _reason(e))
    else:
      on_result(task, stats, "")

  if workers <= 1:
    for task in tasks:
      one(task)
    return
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, len(tasks)))
  try:
    for future in [pool.submit(one, task) for task in tasks]:
      future.result()
  except BaseException:
    # E.g. Ctrl-C: files in progress stop at their next record, without their parts.
    converter.stop.set()
    pool.shutdown(wait=True, cancel_futures=True)
    raise
  pool.shutdown()


# ---------------------------------------------------------------------------------------------
# The command line.


def _define_flags() -> None:
  # Defined only when run as a program, like prepare_videos (flag names shared with other tools).
  flags.DEFINE_enum("source", None, SOURCES, "What --path holds: dmvr shards (SPLIT-00000-of-000NN "
                    "and labels.txt) or a tfds data_dir.", required=True)
  flags.DEFINE_string("path", None, "The DMVR shard directory, or the TFDS data_dir.", required=True)
  flags.DEFINE_string("split", None, "The split to convert, e.g. train or validation.", required=True)
  flags.DEFINE_string("output", None, "The frame-folder root (config.data.path for training).",
                      required=True)
  flags.DEFINE_string("tfds_name", "kinetics/400", "The TFDS dataset (--source=tfds).")
  flags.DEFINE_integer("workers", None, "Input files converted at once, by threads (default: "
                       "min(CPU count, 8); 0 or 1 converts one file at a time).")


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  workers = f.workers if f.workers is not None else min(os.cpu_count() or 1, 8)
  # A bad --path or --split raises DataError naming it: one line and exit 2 (cli.run).
  summary = convert(f.source, f.path, f.split, f.output, tfds_name=f.tfds_name, workers=workers)
  print(summary.format())
  if summary.videos_written + summary.videos_done_before == 0:
    # Nothing usable in the input: a user error, exit status 2 as prepare_videos gives one.
    where = f" (each with its reason in {summary.failures_path})" if summary.failures_path else ""
    print(f"convert_to_frames: error: no video could be converted: {summary.videos_failed} of "
          f"{summary.videos_total} failed{where}", file=sys.stderr)
    return cli.EXIT_USER_ERROR
  return 0


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
