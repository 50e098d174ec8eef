"""Video lists: Kinetics annotation CSVs, TokShift frame-folder lists, and class-per-folder trees.

Each reader returns `Entry` rows; problems with one row (an unknown label, a missing video) are
kept on the row as `error`, so that tools report and skip them instead of aborting the whole run.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Iterable, Sequence

from msca_jax.data import textlist
from msca_jax.data.errors import DataError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".3gp")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


@dataclasses.dataclass
class Entry:
  key: str                  # a stable id: Kinetics '{youtube_id}_{start:06d}_{end:06d}', else the path
  path: str | None          # the video file, or the frame folder; None when it was not found
  label_name: str | None    # None for frame-folder lists without a class file
  label: int = -1
  num_frames: int = 0       # frame folders only: the count the list claims
  error: str = ""           # why this entry cannot be used ("" when it can)


def kinetics_key(youtube_id: str, time_start: float, time_end: float) -> str:
  """The file stem used by the Kinetics downloaders: abc123_000010_000020."""
  return f"{youtube_id}_{int(float(time_start)):06d}_{int(float(time_end)):06d}"


def walk_videos(root: str, notes: list[str] | None = None) -> list[str]:
  """Every video file under `root` once, in sorted walk order, never through a link loop.

  Real folders are walked. A symlinked folder or file is followed only when its target lies
  outside the tree (e.g. videos on another disk); a link into the tree is not followed, as what it
  points to is walked under its own name. A folder reached a second time (a loop outside the
  tree, two links to one folder, a bind mount) is not walked again, and a file reached a second
  time (two links to one file, a hard link) is listed once. Each path not taken adds one line
  to `notes`.
  """
  notes = [] if notes is None else notes
  top = os.path.realpath(root)
  start = os.stat(root)
  seen_dirs = {(start.st_dev, start.st_ino): root}
  seen_files: dict[tuple[int, int], str] = {}
  found = []
  stack = [(root, start.st_dev)]
  while stack:
    directory, device = stack.pop()
    try:
      with os.scandir(directory) as it:
        children = sorted(it, key=lambda e: e.name)
    except OSError as e:
      notes.append(f"{directory}: not walked, cannot be listed ({e.strerror})")
      continue
    subdirs = []
    for entry in children:
      path = entry.path
      video = os.path.splitext(entry.name)[1].lower() in VIDEO_EXTENSIONS
      try:
        is_link = entry.is_symlink()
        is_dir = entry.is_dir()  # follows a link
        if is_link:
          if not os.path.exists(path):
            if video:  # a dangling link: listed, so that its failure is reported
              found.append(path)
            continue
          target = os.path.realpath(path)
          if target == top or target.startswith(top + os.sep):
            notes.append(f"{path}: not followed, a link to {target} inside the tree "
                         "(what it holds is taken from there)")
            continue
        if is_dir:
          st = os.stat(path)
          identity = (st.st_dev, st.st_ino)
          if identity in seen_dirs:
            notes.append(f"{path}: not walked, the folder {seen_dirs[identity]} again "
                         "(a link loop or a second link to it)")
            continue
          seen_dirs[identity] = path
          subdirs.append((path, st.st_dev))
          continue
        if not video:
          continue
        # A plain file's inode comes with the directory listing: no stat call per file.
        if is_link:
          st = os.stat(path)
          identity = (st.st_dev, st.st_ino)
        else:
          identity = (device, entry.inode())
      except OSError as e:
        notes.append(f"{path}: skipped, cannot be read ({e.strerror})")
        continue
      if identity in seen_files:
        notes.append(f"{path}: not listed, the same file as {seen_files[identity]}")
        continue
      seen_files[identity] = path
      found.append(path)
    stack.extend(reversed(subdirs))
  return found


def index_videos(root: str, notes: list[str] | None = None) -> dict[str, str]:
  """Every video file under `root`, by file stem (the first one found wins, in sorted order);
  walked as `walk_videos` does, with its notes."""
  found: dict[str, str] = {}
  for path in walk_videos(root, notes):
    found.setdefault(os.path.splitext(os.path.basename(path))[0], path)
  return found


def read_kinetics_csv(csv_path: str, video_root: str | None = None,
                      videos: dict[str, str] | None = None,
                      notes: list[str] | None = None) -> list[Entry]:
  """Rows of a Kinetics annotation CSV (label, youtube_id, time_start, time_end[, split, is_cc]).

  Videos are looked up by their downloader file name anywhere under `video_root` (default: the
  CSV's directory), so both the flat and the class-per-folder download layouts work. Pass
  `videos` (an `index_videos` result) to share one walk of a large tree between several CSVs;
  otherwise the walk's notes (`walk_videos`) go to `notes`.
  """
  if not os.path.isfile(csv_path):
    raise DataError(f"annotation file {csv_path} does not exist")
  with open(csv_path, newline="", encoding="utf-8-sig") as f:  # tolerate a byte-order mark
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    missing = [c for c in KINETICS_COLUMNS[1:] if c not in columns]
    if missing:
      raise DataError(f"{csv_path}: not a Kinetics annotation CSV, columns {missing} missing "
                      f"(found {columns}; expected {', '.join(KINETICS_COLUMNS)}, split)")
    rows = list(reader)
  if videos is None:
    videos = index_videos(video_root or os.path.dirname(os.path.abspath(csv_path)), notes)
  entries = []
  for line, row in enumerate(rows, start=2):
    try:
      key = kinetics_key(row["youtube_id"], row["time_start"], row["time_end"])
    except (TypeError, ValueError):
      entries.append(Entry(key=f"{csv_path}:{line}", path=None, label_name=None,
                           error=f"{csv_path} line {line}: bad time_start/time_end {row}"))
      continue
    label = (row.get("label") or "").strip() or None
    path = videos.get(key)
    entries.append(Entry(key=key, path=path, label_name=label,
                         error="" if path else f"video {key}.* not found under the video root"))
  return entries


def read_frame_list(list_path: str, root: str | None = None) -> list[Entry]:
  """A TokShift / TSN list: one 'frame_folder num_frames label_index' line per video (a BOM,
  CRLF and blank lines are tolerated, as by `textlist.read_lines`).

  Folders are relative to `root` (default: the list's directory) and stay inside it, as in the
  training lists (frames.read_list): an absolute folder, or one that climbs out with '..', is an
  entry with its error, naming the line, and is skipped.
  """
  if not os.path.isfile(list_path):
    raise DataError(f"video list {list_path} does not exist")
  root = root or os.path.dirname(os.path.abspath(list_path))
  entries = []
  for line_no, line in textlist.read_lines(list_path):
    parts = line.split()
    if len(parts) < 3 or not parts[-1].lstrip("-").isdigit() or not parts[-2].isdigit():
      raise DataError(f"{list_path} line {line_no}: expected 'frame_folder num_frames label', "
                      f"got {line!r}")
    folder = " ".join(parts[:-2])
    inside = textlist.contained_path(folder)
    if inside is None:
      entries.append(Entry(key=folder, path=None, label_name=None, label=int(parts[-1]),
                           num_frames=int(parts[-2]),
                           error=f"{list_path} line {line_no}: folder {folder!r} is not a relative "
                                 f"path inside {root}"))
      continue
    path = os.path.join(root, inside)
    entries.append(Entry(key=folder, path=path if os.path.isdir(path) else None, label_name=None,
                         label=int(parts[-1]), num_frames=int(parts[-2]),
                         error="" if os.path.isdir(path) else f"frame folder {path} not found"))
  return entries


def read_class_folders(root: str, notes: list[str] | None = None) -> list[Entry]:
  """ROOT/class_name/.../video.ext: the label is the top folder's name, the key the path under ROOT.

  Keys are relative paths, not file stems: generic datasets reuse names such as 001.mp4 across
  classes. The tree is walked by `walk_videos` (its notes go to `notes`), so a video is listed
  once and labelled by the class folder it really lies in: a link into the tree (such as a loop
  'walk/loop -> ..') is not followed. A symlinked class folder, or a link to a folder or file
  outside the tree, is labelled by the class folder that holds the link.
  """
  if not os.path.isdir(root):
    raise DataError(f"video directory {root} does not exist")
  entries = []
  for path in walk_videos(root, notes):
    key = os.path.relpath(path, root)
    label = key.split(os.sep)[0] if os.sep in key else None
    entries.append(Entry(key=key, path=path, label_name=label,
                         error="" if label else "not inside a class folder"))
  if not entries:
    raise DataError(f"video directory {root} holds no video files ({', '.join(VIDEO_EXTENSIONS)}) "
                    "in class folders")
  return entries


def assign_labels(entries: Iterable[Entry], class_names: Sequence[str]) -> list[Entry]:
  """Sets each entry's label index from its name; unknown names become per-entry errors."""
  index = {name: i for i, name in enumerate(class_names)}
  out = []
  for e in entries:
    if e.label_name is not None:
      if e.label_name in index:
        e.label = index[e.label_name]
      elif not e.error:
        e.error = f"label {e.label_name!r} is not in the class list"
    elif not 0 <= e.label < len(class_names) and not e.error:
      e.error = f"label {e.label} is outside the class list [0, {len(class_names)})"
    else:
      e.label_name = class_names[e.label] if 0 <= e.label < len(class_names) else None
    out.append(e)
  return out


def sorted_class_names(entries: Iterable[Entry]) -> list[str]:
  """The sorted set of label names: the official Kinetics class order is alphabetical."""
  return sorted({e.label_name for e in entries if e.label_name is not None})
