"""Small frame-folder datasets written by tests: one real JPEG file per frame, a list, labels."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from msca_jax.data import dmvr, frames
from msca_jax.data.decode import DecodeSettings
from tests.data import shards

CLASSES = shards.CLASSES
HEIGHT, WIDTH = 36, 48


def red(index: int) -> int:
  """The red level of every frame of video `index` (as in shards.video)."""
  return index * 37 % 200 + 20


def green(t: int, num_frames: int) -> int:
  """The green level of frame t: 6 t for short videos (as in shards.video), else t."""
  return t * 6 if num_frames * 6 <= 256 else t


def video(index: int, num_frames: int = 12, height: int = HEIGHT, width: int = WIDTH,
          texture: int = 0) -> np.ndarray:
  """uint8 frames whose mean colour says (video, frame); `texture` adds seeded noise of that
  amplitude to the blue channel (bigger JPEG files, the same red and green)."""
  if not 0 <= texture <= 127:
    raise ValueError(f"texture must be in [0, 127], got {texture}")
  out = np.zeros((num_frames, height, width, 3), np.uint8)
  rng = np.random.default_rng(index)
  for t in range(num_frames):
    out[t] = (red(index), green(t, num_frames), 128)
    if texture:   # in the blue channel only, around 128: never clipped, red and green stay put
      out[t, ..., 2] = 128 + rng.integers(-texture, texture + 1, (height, width))
  return out


def jpegs(clip: np.ndarray) -> list[bytes]:
  return [tf.io.encode_jpeg(f, quality=95).numpy() for f in clip]


def write_video(root: str, folder: str, index: int, num_frames: int = 12,
                names: frames.FrameNames = frames.FrameNames(), texture: int = 0) -> None:
  frames.write_frames(root, folder, jpegs(video(index, num_frames, texture=texture)), names)


def write(root: str, split: str = "train", num_videos: int = 10, num_frames: int = 12,
          rows: Sequence[tuple[str, int, int]] | None = None, texture: int = 0,
          class_names: Sequence[str] = CLASSES) -> list[tuple[str, int, int]]:
  """`num_videos` good videos SPLIT/v{i} (label i % 3) plus labels.txt, list and manifest.

  With `rows`, only the list is written from them (the folders are the caller's business).
  """
  if rows is None:
    rows = []
    for i in range(num_videos):
      folder = f"{split}/v{i}"
      write_video(root, folder, i, num_frames, texture=texture)
      rows.append((folder, num_frames, i % len(class_names)))
  dmvr.write_labels(root, class_names)
  write_list_lines(frames.list_path(root, split), [f"{f} {n} {l}" for f, n, l in rows])
  frames.write_manifest(root, split, DecodeSettings(short_side=HEIGHT).as_json())
  return list(rows)


def write_list_lines(path: str, lines: Sequence[str]) -> None:
  """A list file of raw lines (which may be malformed on purpose)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))


def data_config(root: str, **overrides):
  """config.data reading frame folders under `root`, small enough for fast tests."""
  return shards.data_config(root, **{"source": "frames", **overrides})


def folder_bytes(root: str, folder: str, names: frames.FrameNames, indices) -> int:
  """Total size of the frame files `indices` (0-based, each counted once) of ROOT/folder."""
  return sum(os.path.getsize(os.path.join(root, folder, names.name(int(i))))
             for i in sorted(set(int(i) for i in np.ravel(indices))))


def rchar() -> int:
  """Bytes this process (all its threads) has read through read() and friends so far."""
  with open("/proc/self/io") as f:
    for line in f:
      if line.startswith("rchar:"):
        return int(line.split()[1])
  raise RuntimeError("no rchar in /proc/self/io")
