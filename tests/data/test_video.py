"""PyAV decoding: frame-rate resampling picks the frame on screen at each instant; sizes; errors."""

import numpy as np
import pytest

from msca_jax.data import video


def _numbered(num_frames, height=32, width=48):
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    frames[t] = 8 * t
  return frames


def _frame_numbers(frames):
  return np.round(frames[:, 4, 4, 0] / 8).astype(int)


@pytest.mark.parametrize("ext", ["mp4", "mkv", "avi"])   # AVI with B-frames has unusable timestamps
@pytest.mark.parametrize("source_fps,expected", [
    (25, list(range(10))),
    (10, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8, 9, 9]),
    (50, list(range(0, 10, 2))),
])
def test_resampling_shows_the_frame_on_screen_at_each_instant(tmp_path, ext, source_fps, expected):
  path = str(tmp_path / f"v.{ext}")
  video.write_video(path, _numbered(10), fps=source_fps)
  frames = video.read_video(path, fps=25)
  np.testing.assert_array_equal(_frame_numbers(frames), expected)


def test_native_rate_and_short_side(tmp_path):
  path = str(tmp_path / "v.mp4")
  video.write_video(path, _numbered(7, height=40, width=100), fps=30)
  frames = video.read_video(path, fps=0, short_side=20)
  assert frames.shape == (7, 20, 50, 3) and frames.dtype == np.uint8
  assert video.scaled_size(100, 40, 20) == (50, 20) and video.scaled_size(10, 12, 0) == (10, 12)


def test_unreadable_videos_name_the_file(tmp_path):
  with pytest.raises(video.VideoError, match="missing.mp4: no such file"):
    video.read_video(str(tmp_path / "missing.mp4"))
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
  with pytest.raises(video.VideoError, match="bad.mp4"):
    video.read_video(str(bad))
