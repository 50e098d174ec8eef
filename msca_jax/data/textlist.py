"""The text lists users hand us (class lists, labels.txt, frame-folder lists), read one tolerant way.

Editors and spreadsheets save a byte-order mark, CRLF line ends and trailing blanks; none of them is
part of a class name or a folder, so each is dropped rather than turned into a new class name.
"""

from __future__ import annotations

import posixpath
import re
from typing import Callable

import tensorflow as tf

from msca_jax.data.errors import DataError

_BOM = b"\xef\xbb\xbf"


def read_lines(path: str, on_bad: Callable[[int, str], None] | None = None) -> list[tuple[int, str]]:
  """(line number, text) of every non-blank line of `path` (local or gs://), stripped of a leading
  byte-order mark, CR/LF line ends and surrounding whitespace.

  A line that is not UTF-8 raises DataError naming the file and line, or, when `on_bad` is given,
  is passed to it as (line number, message) and left out.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if data.startswith(_BOM):
    data = data[len(_BOM):]
  out = []
  # bytes.splitlines ends lines at LF, CRLF and CR only (str.splitlines would also split names
  # at rarer Unicode separators).
  for line_no, raw in enumerate(data.splitlines(), start=1):
    try:
      text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
      message = f"{path} line {line_no}: not UTF-8 text ({raw[:40]!r})"
      if on_bad is None:
        raise DataError(message) from None
      on_bad(line_no, message)
      continue
    if text:
      out.append((line_no, text))
  return out


def check_unique(path: str, lines: list[tuple[int, str]], what: str = "class") -> None:
  """Raises DataError naming the first line that repeats an earlier one's name."""
  first: dict[str, int] = {}
  for line_no, name in lines:
    if name in first:
      raise DataError(f"{path} line {line_no}: {what} {name!r} repeats line {first[name]} "
                      f"({what} names must be unique)")
    first[name] = line_no


def contained_path(folder: str) -> str | None:
  """A list's folder as a normalised relative path, or None when it would leave the list's root
  (absolute, a drive letter, or climbing out with '..'). On the text alone: 'a/../b' is 'b', and a
  symlink the root itself holds is followed like any folder."""
  if not folder or folder.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", folder):
    return None
  normal = posixpath.normpath(folder.replace("\\", "/"))
  if normal == "." or normal == ".." or normal.startswith("../"):
    return None
  return normal
