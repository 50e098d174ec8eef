"""A synthetic action dataset that only temporal models can solve.

Each clip shows one shape moving over a noisy background. The classes come in
time-reversed pairs: left/right, up/down, clockwise/anticlockwise and
grow/shrink. A clip of one class played backwards is, exactly, a clip of its
partner class with the same parameters. So within a pair, the frames of a clip
have the same distribution whichever class it is. A frame-wise model, which
averages per-frame logits, cannot beat chance within a pair (50%); it can only
tell the four pairs apart (the motion kind leaves traces such as a shape's
size range). A model that compares frames can solve all eight classes.

Everything is deterministic from (seed, index), rendered with NumPy alone. `ensure_dataset` writes
the dataset once in the frame-folder layout that prepare_videos writes for Kinetics (JPEG frames,
a list, labels.txt) in a cache directory, so that the demo goes through exactly the pipeline that
Kinetics goes through.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

import numpy as np

from msca_jax.data.decode import DecodeSettings
from msca_jax.data.errors import DataError

VERSION = 1           # bump when rendering changes, so stale caches are not reused
JPEG_QUALITY = 95  # of the stored frames (msca_jax.predict decodes new videos alike)
EVAL_INDEX_OFFSET = 10**9  # evaluation clips come from a disjoint part of the index space

# Label 2k and 2k + 1 are each other's time reversal.
CLASSES = ("move_left", "move_right", "move_up", "move_down",
           "rotate_clockwise", "rotate_anticlockwise", "grow", "shrink")
SHAPES = ("square", "triangle", "arrow")


def partner(label: int) -> int:
  """The class whose clips are this class's clips played backwards."""
  return label ^ 1


@dataclasses.dataclass(frozen=True)
class ClipParams:
  """Everything random about one clip; the label only sets the direction of motion."""
  shape: str
  color: tuple[float, float, float]
  background: tuple[float, float, float]
  center: tuple[float, float]      # (y, x) of the trajectory's midpoint, in [0, 1]
  size: float                      # half-width at the trajectory's midpoint, in [0, 1]
  angle: float                     # orientation at the midpoint, radians
  speed: float                     # per-frame change: position, radians, or size
  noise_seed: int


def sample_params(rng: np.random.Generator) -> ClipParams:
  color = rng.uniform(0.55, 1.0, 3)
  return ClipParams(
      shape=SHAPES[rng.integers(len(SHAPES))],
      color=tuple(float(c) for c in color),
      background=tuple(float(c) for c in rng.uniform(0.0, 0.35, 3)),
      center=(float(rng.uniform(0.35, 0.65)), float(rng.uniform(0.35, 0.65))),
      size=float(rng.uniform(0.13, 0.2)),
      angle=float(rng.uniform(0, 2 * np.pi)),
      speed=float(rng.uniform(0.6, 1.0)),
      noise_seed=int(rng.integers(2**31)))


def _polygon(shape: str) -> np.ndarray:
  """Unit-size outline of a shape, vertices as (y, x); none is rotation-symmetric but the square."""
  if shape == "square":
    return np.array([[-1, -1], [-1, 1], [1, 1], [1, -1]], np.float64)
  if shape == "triangle":
    return np.array([[-1, 0], [1, -0.8], [1, 0.8]], np.float64)
  if shape == "arrow":
    return np.array([[-1, 0], [0, -0.9], [0, -0.35], [1, -0.35], [1, 0.35], [0, 0.35], [0, 0.9]],
                    np.float64)
  raise ValueError(f"unknown shape {shape!r}")


def _inside(polygon: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """Even-odd rule point-in-polygon test for pixel centres."""
  inside = np.zeros(ys.shape, bool)
  for (y0, x0), (y1, x1) in zip(polygon, np.roll(polygon, -1, axis=0)):
    crosses = (y0 > ys) != (y1 > ys)
    with np.errstate(divide="ignore", invalid="ignore"):
      x_at = x0 + (ys - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (xs < x_at)
  return inside


def _trajectory(params: ClipParams, label: int, num_frames: int, t: int):
  """(center_y, center_x, size, angle) at frame t, symmetric in time about the midpoint."""
  offset = t - (num_frames - 1) / 2
  sign = 1.0 if label % 2 == 0 else -1.0  # the partner class runs the same path backwards
  kind = CLASSES[label].split("_")[0]
  cy, cx = params.center
  size, angle = params.size, params.angle
  step = params.speed / max(num_frames - 1, 1)
  if kind == "move":
    delta = sign * 0.45 * step * offset
    if CLASSES[label] in ("move_left", "move_right"):
      cx -= delta  # move_left: x decreases over time
    else:
      cy -= delta  # move_up: y decreases over time (rows grow downwards)
  elif kind == "rotate":
    # With rows pointing down, a decreasing angle turns (y, x) clockwise on screen.
    angle -= sign * 1.6 * step * offset
  elif kind in ("grow", "shrink"):
    size *= np.exp(sign * 0.9 * step * offset)
  return cy, cx, size, angle


def render(params: ClipParams, label: int, num_frames: int = 16, size: int = 32) -> np.ndarray:
  """Renders a clip as uint8 (num_frames, size, size, 3)."""
  if not 0 <= label < len(CLASSES):
    raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
  # Pixel centres in [0, 1]; the background noise is static, so it carries no motion cue.
  coords = (np.arange(size) + 0.5) / size
  ys, xs = np.meshgrid(coords, coords, indexing="ij")
  noise = np.random.default_rng(params.noise_seed).normal(0, 0.04, (size, size, 3))
  background = np.clip(np.asarray(params.background) + noise, 0, 1)
  outline = _polygon(params.shape)
  frames = np.empty((num_frames, size, size, 3), np.uint8)
  for t in range(num_frames):
    cy, cx, half, angle = _trajectory(params, label, num_frames, t)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polygon = outline @ rotation.T * half + np.array([cy, cx])
    mask = _inside(polygon, ys, xs)[..., None]
    frame = np.where(mask, np.asarray(params.color), background)
    frames[t] = np.round(frame * 255).astype(np.uint8)
  return frames


def clip(seed: int, index: int, num_frames: int = 16, size: int = 32) -> tuple[np.ndarray, int]:
  """The index-th clip of the dataset with this seed: (uint8 frames, label), balanced labels."""
  rng = np.random.default_rng([seed, index])
  label = index % len(CLASSES)
  return render(sample_params(rng), label, num_frames, size), label


def cache_root(directory: str = "") -> str:
  """config.data.synthetic.dir, else $MSCA_JAX_CACHE/synthetic, else ~/.cache/msca_jax/synthetic."""
  if directory:
    return directory
  base = os.environ.get("MSCA_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "msca_jax")
  return os.path.join(base, "synthetic")


def ensure_dataset(cfg) -> str:
  """Writes the dataset described by config.data.synthetic once; returns its root directory.

  The frame-folder layout that prepare_videos writes (msca_jax/data/frames.py): splits 'train'
  and 'validation', one JPEG per frame. The directory name encodes every parameter, and it is
  filled under a temporary name and renamed when complete, so concurrent processes and
  interrupted runs never see a partial dataset.
  """
  import tensorflow as tf
  from msca_jax.data import dmvr, frames

  for field in ("train_size", "eval_size", "video_frames", "size"):
    if int(cfg[field]) < 1:
      raise DataError(f"config.data.synthetic.{field} must be >= 1, got {cfg[field]}")
  name = (f"seed{cfg.seed}-train{cfg.train_size}-eval{cfg.eval_size}-{cfg.video_frames}x{cfg.size}px"
          f"-frames-v{VERSION}")
  directory = os.path.join(cache_root(cfg.dir), name)
  if os.path.exists(os.path.join(directory, "DONE.json")):
    return directory
  tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
  encode = tf.function(lambda frames_: tf.map_fn(
      lambda f: tf.io.encode_jpeg(f, quality=JPEG_QUALITY), frames_, fn_output_signature=tf.string))
  settings = DecodeSettings(fps=25.0, short_side=int(cfg.size), jpeg_quality=JPEG_QUALITY)

  def write_split(split: str, offset: int, count: int) -> None:
    rows = []
    for i in range(count):
      index = offset + i
      video, label = clip(cfg.seed, index, cfg.video_frames, cfg.size)
      folder = f"{split}/{index:010d}"
      frames.write_frames(tmp, folder, [bytes(b) for b in encode(video).numpy()])
      rows.append((folder, len(video), label))
    frames.write_list(frames.list_path(tmp, split), rows)
    frames.write_manifest(tmp, split, settings.as_json(), source="msca_jax.data.synthetic",
                          videos=count)

  try:
    dmvr.write_labels(tmp, CLASSES)
    write_split("train", 0, cfg.train_size)
    write_split("validation", EVAL_INDEX_OFFSET, cfg.eval_size)
    with open(os.path.join(tmp, "DONE.json"), "w") as f:
      json.dump({k: cfg[k] for k in ("seed", "train_size", "eval_size", "video_frames", "size")}
                | {"version": VERSION}, f)
    os.replace(tmp, directory)
  except OSError:
    # Another process finished the same dataset first: use theirs.
    shutil.rmtree(tmp, ignore_errors=True)
    if not os.path.exists(os.path.join(directory, "DONE.json")):
      raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return directory
