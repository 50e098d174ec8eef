"""What a preparation run writes beside the frames, shared by prepare_videos and convert_to_frames.

Both write a split in units (DMVR shards, or chunks of frame folders) that a rerun skips when
they are done: each unit's stats and failures (`failures_path`), the frame layout's folder names
(`FolderNames`) and list parts (`part_path`), the check that an output holds no other run's split
(`check_output`), the failures table, the split's list (`assemble_list`) and the run's `Summary`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

from msca_jax.data import annotations, frames, video
from msca_jax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Failure:
  """One video that was skipped."""
  key: str
  path: str
  reason: str


@dataclasses.dataclass
class ShardStats:
  videos: int = 0
  frames: int = 0
  bytes: int = 0
  failures: list[Failure] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Summary:
  """What a run did. Counts of written videos, frames and bytes are for this run only."""
  split: str
  output: str
  num_shards: int = 0
  videos_total: int = 0          # entries in the input list
  videos_written: int = 0
  shards_written: int = 0
  videos_done_before: int = 0    # in shards an earlier run had finished (skipped now)
  shards_done_before: int = 0
  shards_failed: int = 0         # shards whose worker crashed; a rerun retries them
  frames: int = 0
  bytes: int = 0
  seconds: float = 0.0
  failures: list[Failure] = dataclasses.field(default_factory=list)
  failures_path: str = ""
  # Paths the walk of the video tree did not take: link loops, links into the tree, files
  # reached twice (each is also a line of the log).
  walk_notes: list[str] = dataclasses.field(default_factory=list)
  unit: str = "shards"   # what a unit of resumption is called: DMVR shards, frame-folder chunks

  @property
  def videos_failed(self) -> int:
    return len(self.failures)

  @property
  def videos_per_s(self) -> float:
    return self.videos_written / self.seconds if self.seconds > 0 else 0.0

  def format(self, max_failures: int = 10) -> str:
    """A human-readable report of the run."""
    unit = self.unit
    lines = [f"split {self.split!r}: {self.num_shards} {unit} in {self.output}"]
    per_video = f", {self.frames / self.videos_written:.1f} per video" if self.videos_written else ""
    lines.append(f"  written       {self.videos_written} videos in {self.shards_written} {unit}: "
                 f"{self.frames} frames{per_video}, {format_bytes(self.bytes)}, "
                 f"{self.seconds:.1f} s, {self.videos_per_s:.2f} videos/s")
    if self.shards_done_before:
      lines.append(f"  already done  {self.videos_done_before} videos in {self.shards_done_before} "
                   f"{unit} from an earlier run (kept)")
    if self.shards_failed:
      lines.append(f"  {unit[:-1] + ' errors':13} {self.shards_failed} {unit} could not be written; rerun the "
                   "same command to retry them")
    if self.walk_notes:
      lines.append(f"  not walked    {len(self.walk_notes)} paths of the video tree (link loops, "
                   "links into the tree, files reached twice): each video is listed once")
      lines += [f"    {note}" for note in self.walk_notes[:max_failures]]
      if len(self.walk_notes) > max_failures:
        lines.append(f"    ... and {len(self.walk_notes) - max_failures} more (in the log)")
    lines.append(f"  failed        {self.videos_failed} of {self.videos_total} videos"
                 + (f", listed in {self.failures_path}" if self.failures else ""))
    for failure in self.failures[:max_failures]:
      lines.append(f"    {failure.key}: {failure.reason}")
    if len(self.failures) > max_failures:
      lines.append(f"    ... and {len(self.failures) - max_failures} more")
    return "\n".join(lines)


def format_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def reason(error: Exception, path: str = "") -> str:
  """One line; without the leading 'path: ' of VideoError messages, as failures list the path."""
  if isinstance(error, video.VideoError):
    message = str(error)
    return message[len(path) + 2:] if path and message.startswith(path + ": ") else message
  message = (str(error).strip().splitlines() or [""])[0]
  return f"{type(error).__name__}: {message}"


def failures_path(shard_path: str) -> str:
  return shard_path + ".failures.json"


def write_json(path: str, data: Any) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  os.replace(path + ".tmp", path)


def shard_stats_json(stats: ShardStats) -> dict:
  return {"videos": stats.videos, "frames": stats.frames, "bytes": stats.bytes,
          "failures": [dataclasses.asdict(f) for f in stats.failures]}


def read_shard_stats(shard_path: str) -> ShardStats | None:
  try:
    with open(failures_path(shard_path)) as f:
      data = json.load(f)
    return ShardStats(videos=data["videos"], frames=data["frames"], bytes=data["bytes"],
                      failures=[Failure(**x) for x in data["failures"]])
  except (OSError, ValueError, KeyError, TypeError):
    return None


def frame_folder(split: str, key: str) -> str:
  """The folder of a video in the frame layout: SPLIT/<key>, without a video extension, with
  whitespace replaced (list lines are space-separated) and without '.' or '..' components (a
  frame list's '../frames/x' must not write outside SPLIT/)."""
  stem, ext = os.path.splitext(key)
  if ext.lower() in annotations.VIDEO_EXTENSIONS:
    key = stem
  key = re.sub(r"\s+", "_", key.replace(os.sep, "/"))
  parts = [p for p in key.split("/") if p not in ("", ".", "..")]
  return f"{split}/{'/'.join(parts) or '_'}"


class FolderNames:
  """Hands out distinct video folders of one split in the frame layout (`frame_folder`).

  A folder already handed out gets a ~N suffix, and so does one that would nest inside another
  video's folder or hold one: rewriting a video's folder replaces it whole, so it holds only its
  frames.
  """

  def __init__(self, split: str):
    self.split = split
    self.taken: set[str] = set()
    self._holding: set[str] = set()   # the parents of taken folders

  def add(self, folder: str) -> None:
    """Marks a folder as in use."""
    self.taken.add(folder)
    parts = folder.split("/")
    self._holding.update("/".join(parts[:i]) for i in range(1, len(parts)))

  def _taken_parent(self, folder: str) -> int:
    """How many leading components of `folder` name a taken folder (0: none does)."""
    parts = folder.split("/")
    return next((i for i in range(1, len(parts)) if "/".join(parts[:i]) in self.taken), 0)

  def claim(self, key: str) -> str:
    """A folder for `key` that no other video uses; it is marked as in use."""
    folder = base = frame_folder(self.split, key)
    n = 1
    while folder in self.taken or folder in self._holding or self._taken_parent(folder):
      n += 1
      depth = self._taken_parent(base)
      if depth:  # inside another video's folder: rename the component that is that folder
        parts = base.split("/")
        parts[depth - 1] += f"~{n}"
        folder = "/".join(parts)
      else:
        folder = f"{base}~{n}"
    self.add(folder)
    return folder


def unique_folders(split: str, keys: Sequence[str]) -> dict[str, str]:
  """key -> folder for every key, assigned in sorted key order (so every run agrees)."""
  names = FolderNames(split)
  return {key: names.claim(key) for key in sorted(keys)}


def parts_dir(output: str, split: str) -> str:
  return os.path.join(output, f"{split}.parts")


def part_path(output: str, split: str, index: int, count: int) -> str:
  return os.path.join(parts_dir(output, split), f"{index:05d}-of-{count:05d}.txt")


def _manifest_differences(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new), key=lambda k: (k == "shards", k))
  out = []
  for key in keys:
    if old.get(key) == new.get(key):
      continue
    if isinstance(old.get(key), dict) and isinstance(new.get(key), dict):
      out += [f"{key}.{k}: {old[key].get(k)!r} -> {new[key].get(k)!r}"
              for k in sorted(set(old[key]) | set(new[key])) if old[key].get(k) != new[key].get(k)]
    elif key == "shards":
      out.append("shards: the videos or their shard assignment differ")
    elif key == "classes":
      out.append("classes: the class list differs")
    else:
      out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
  return out


def check_output(output: str, split: str, manifest_path: str, manifest: dict) -> None:
  """Refuses an output directory that holds this split from a different run."""
  if os.path.exists(manifest_path):
    try:
      with open(manifest_path) as f:
        old = json.load(f)
    except ValueError as e:
      raise DataError(f"{manifest_path} is not valid JSON ({e}); use another --output") from e
    differences = _manifest_differences(old, manifest)
    if differences:
      raise DataError(
          f"{output} already holds split {split!r} prepared from different inputs or settings "
          f"({'; '.join(differences[:5])}). Use another --output, or delete {manifest_path} and "
          f"the {split}-* shards (frame layout: {split}.parts, {split}.txt and {split}/) to "
          "start over.")
    return
  pattern = re.compile(rf"^{re.escape(split)}(-\d{{5}}-of-\d{{5}}|\.parts|\.txt)$")
  stray = sorted(n for n in os.listdir(output) if pattern.match(n)) if os.path.isdir(output) else []
  if stray:
    raise DataError(f"{output} already holds {len(stray)} files of split {split!r} (e.g. "
                    f"{stray[0]}) but no {os.path.basename(manifest_path)}, so they cannot be "
                    "checked against this run; use another --output")


def write_failures_tsv(path: str, failures: Sequence[Failure]) -> None:
  def clean(text: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", text)
  with open(path + ".tmp", "w") as f:
    f.write("key\tpath\treason\n")
    for failure in failures:
      f.write(f"{clean(failure.key)}\t{clean(failure.path)}\t{clean(failure.reason)}\n")
  os.replace(path + ".tmp", path)


def read_rows(path: str) -> list[tuple[str, int, int]]:
  rows = []
  with open(path) as f:
    for line in f:
      folder, num_frames, label = line.split()
      rows.append((folder, int(num_frames), int(label)))
  return rows


def assemble_list(output: str, split: str, count: int) -> None:
  """SPLIT.txt from the chunks' parts, in chunk order: written once every chunk is done, so the
  list a reader sees is always complete."""
  rows = []
  for index in range(count):
    rows += read_rows(part_path(output, split, index, count))
  frames.write_list(frames.list_path(output, split), rows)
