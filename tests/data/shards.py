"""Small DMVR datasets written by tests: real JPEG frames, real TFRecord shards."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from msca_jax.configs import recipe
from msca_jax.data import dmvr

CLASSES = ("a", "b", "c")


def jpegs(frames: np.ndarray) -> list[bytes]:
  return [tf.io.encode_jpeg(f, quality=95).numpy() for f in frames]


def video(index: int, num_frames: int = 12, height: int = 36, width: int = 48) -> np.ndarray:
  """A clip whose frames are all distinct and identify (video, frame) by their mean colour."""
  frames = np.zeros((num_frames, height, width, 3), np.uint8)
  for t in range(num_frames):
    frames[t] = (index * 37 % 200 + 20, t * 6, 128)
  return frames


def write(directory: str, split: str = "train", num_videos: int = 12, num_shards: int = 3,
          records: list[bytes] | None = None) -> list[str]:
  """`num_videos` good videos (label i % 3, filename 'v{i}'), or the given serialised records."""
  if records is None:
    records = [dmvr.make_example(jpegs(video(i)), i % len(CLASSES), CLASSES[i % len(CLASSES)], f"v{i}")
               for i in range(num_videos)]
  dmvr.write_labels(directory, CLASSES)
  return dmvr.write_shards(directory, split, records, num_shards)


def pixels(video: np.ndarray) -> np.ndarray:
  """Batch pixels as float32 in [0, 255] whatever the batch dtype (uint8, or floats in [-1, 1])."""
  video = np.asarray(video)
  if video.dtype == np.uint8:
    return video.astype(np.float32)
  return (video.astype(np.float32) + 1) / 2 * 255


def assert_pixels(video: np.ndarray, dtype: str = "uint8") -> None:
  """The batch carries `dtype` pixels in its range: uint8, or finite floats in [-1, 1]."""
  video = np.asarray(video)
  assert video.dtype.name == dtype, (video.dtype, dtype)
  if dtype != "uint8":
    values = video.astype(np.float32)
    assert np.isfinite(values).all() and -1 <= values.min() and values.max() <= 1


def data_config(path: str, **overrides):
  """config.data of the demo, reading DMVR shards at `path`, small enough for fast tests.

  Training views are finished in tf.data (augment_on='host'), so that batches hold the clips
  themselves; the device path is compared with this one in tests/data/test_device_augment.py.
  """
  data = recipe.get_config("vit", "demo").data
  data.source, data.path = "dmvr", path
  data.augment_on = "host"
  data.num_frames = 4
  data.image_size = 16
  data.train_short_side_range = (16, 24)
  data.eval_short_side = 16
  data.shuffle_buffer = 64
  data.update(overrides)
  return data
