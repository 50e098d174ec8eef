"""Video files to RGB frames with PyAV: a fixed frame rate and a fixed short side.

Kinetics videos come at many frame rates; the recipe's stride (32 frames at 25 fps) only means the
same time span everywhere once every video is resampled to one rate. Resampling keeps, for each
output instant k / fps, the source frame shown at that instant (the frame with the latest
timestamp not after it, as a player would), so nothing is blended and no frame is invented.
"""

from __future__ import annotations

import os
from typing import Iterator

import av
import numpy as np


class VideoError(RuntimeError):
  """A video that cannot be read; the message names the file."""


# The widest shape preparation accepts, long side : short side. Resizing the short side to 256
# turns a 4000x16 video into 64000-pixel-wide frames that dominate every later read, while real
# footage (portrait phones 9:16, cinema 2.39:1) stays far below this.
MAX_ASPECT_RATIO = 8.0


def check_aspect(height: int, width: int, limit: float = MAX_ASPECT_RATIO) -> None:
  """Raises VideoError (no file name) when the frame is more than `limit` times as long as wide."""
  ratio = max(height, width) / max(1, min(height, width))
  if limit and ratio > limit:
    raise VideoError(f"frames of {width}x{height} pixels ({ratio:.1f}:1) are beyond the aspect "
                     f"ratio limit of {limit:g}:1 (video.MAX_ASPECT_RATIO)")


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
  """(height, width) with the shorter side equal to `short_side` (0 keeps the size)."""
  if not short_side or min(height, width) == short_side:
    return height, width
  if height <= width:
    return short_side, max(1, round(width * short_side / height))
  return max(1, round(height * short_side / width)), short_side


def iter_frames(path: str, fps: float = 25.0, short_side: int = 0,
                max_aspect: float = 0.0) -> Iterator[np.ndarray]:
  """Yields uint8 (H, W, 3) frames of `path` resampled to `fps` (0 keeps every decoded frame).

  With `max_aspect`, a video whose frames are longer than that many times their width fails
  (VideoError) at its first frame, before anything is resized.
  """
  if not os.path.exists(path):
    raise VideoError(f"{path}: no such file")
  try:
    container = av.open(path)
  except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise VideoError(f"{path}: cannot open as a video ({e})") from e
  with container:
    if not container.streams.video:
      raise VideoError(f"{path}: has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    rate = float(stream.average_rate or stream.guessed_rate or fps or 25)
    held_time = 0.0
    size = None
    next_time = None  # the output instant waiting for a frame, seconds from the first frame
    start = None
    held = None       # the most recent frame, shown until the next one replaces it
    try:
      for frame in container.decode(stream):
        if size is None:
          try:
            check_aspect(frame.height, frame.width, max_aspect)
          except VideoError as e:
            raise VideoError(f"{path}: {e}") from None
          size = scaled_size(frame.height, frame.width, short_side)
        time = frame.time
        if time is None or (held is not None and time <= held_time):
          # Some containers (AVI with B-frames) give missing or out-of-order timestamps: such a
          # frame is taken to follow the previous one by one source frame interval.
          time = 0.0 if held is None else held_time + 1.0 / rate
        if start is None:
          start, next_time = time, 0.0
        rgb = frame.to_ndarray(format="rgb24", width=size[1], height=size[0],
                               interpolation="BICUBIC")
        if not fps:
          yield rgb
          continue
        # Every output instant before this frame's time is showing the held frame.
        while held is not None and next_time < time - start - 1e-6:
          yield held
          next_time += 1.0 / fps
        held, held_time = rgb, time
      if held is not None and fps:
        # The last frame stays on screen for one source frame interval.
        end = held_time - start + 1.0 / rate
        while next_time < end - 1e-6:
          yield held
          next_time += 1.0 / fps
    except av.error.FFmpegError as e:
      raise VideoError(f"{path}: decoding failed ({e})") from e
    if size is None:
      raise VideoError(f"{path}: no frame could be decoded")


def read_video(path: str, fps: float = 25.0, short_side: int = 0) -> np.ndarray:
  """All frames of a video as uint8 (T, H, W, 3); see `iter_frames`."""
  frames = list(iter_frames(path, fps, short_side))
  return np.stack(frames)


def jpeg_frames(path: str, fps: float = 25.0, short_side: int = 0, quality: int = 90,
                max_frames: int = 0, max_aspect: float = 0.0) -> list[bytes]:
  """The frames of `iter_frames` as JPEG bytes (the DMVR / TFDS storage), at most `max_frames`.

  Each frame is encoded as soon as it is decoded, so a long video never sits in memory as raw RGB.
  """
  import tensorflow as tf  # only the preparation tools need it
  frames = []
  decoded = iter_frames(path, fps, short_side, max_aspect)
  try:
    for frame in decoded:
      frames.append(tf.io.encode_jpeg(frame, quality=quality).numpy())
      if max_frames and len(frames) >= max_frames:
        break
  finally:
    decoded.close()
  return frames


def write_video(path: str, frames: np.ndarray, fps: float = 25.0, codec: str = "libx264") -> None:
  """Encodes uint8 (T, H, W, 3) frames (even H and W for H.264); used by tests and tools."""
  from fractions import Fraction
  with av.open(path, mode="w") as container:
    stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for frame in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)
