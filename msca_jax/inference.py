"""Inference: a trained model, a new video decoded as its dataset was prepared, views, batches.

What every program that classifies or reads a model for inference shares (predict, visualize,
extract_features, export): loading the params of a checkpoint (`load_params`, checked to be the
config's model), the decode settings and class names the checkpoint was trained with
(`checkpoint_data`), decoding a video as the preparation tools store it (`decode_video`), the
evaluation views of docs/sampling.md (`eval_views`, `view_batches`), and the model on them.

    params = inference.load_params(config, "/tmp/msca_kv_demo")
    for index, name, prob in inference.predict(config, params, "clip.mp4"):
      print(index, name, prob)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from msca_jax.data.decode import DecodeSettings
from msca_jax.data.errors import DataError
from msca_jax.errors import UserError

VIEWS = ("test", "val")


class InferenceError(UserError, ValueError):
  """An inference input (video, checkpoint, labels, config) that cannot be used; one line."""


@dataclasses.dataclass(frozen=True)
class TrainedOn:
  """What a training checkpoint recorded of its data: how its videos were decoded, its classes."""
  decode: DecodeSettings
  class_names: tuple[str, ...]
  origin: str  # e.g. 'recorded in checkpoint /runs/mine (frames of /data/mine, split validation)'


@dataclasses.dataclass
class Prediction:
  """Everything `classify` found for one video."""
  top: list[tuple[int, str, float]]    # (class index, name, probability), most probable first
  probabilities: np.ndarray            # (num_classes,) softmax of the view-averaged logits
  view_logits: np.ndarray              # (views, num_classes)
  num_frames_decoded: int
  decode: Any                          # DecodeSettings
  protocol: str


# ---------------------------------------------------------------------------------------------
# What the model saw: decoding, views, class names.


def decode_settings(data, short_side: int | None = None, jpeg_quality: int | None = None,
                    trained_on: TrainedOn | None = None):
  """How the model's data was prepared, so that a new video is decoded the same way: what the
  checkpoint recorded (`trained_on`), else what config.data's dataset recorded
  (sources.decode_settings); `short_side` / `jpeg_quality` override either."""
  from msca_jax.data import sources

  if trained_on is not None:
    settings = dataclasses.replace(trained_on.decode, origin=trained_on.origin)
  else:
    settings = sources.decode_settings(data)
  overridden = {}
  if short_side is not None:
    overridden["short_side"] = int(short_side)
  if jpeg_quality is not None:
    overridden["jpeg_quality"] = int(jpeg_quality)
  if overridden:
    names = " and ".join(k.replace("_", " ").replace("jpeg", "JPEG") for k in overridden)
    settings = dataclasses.replace(settings, **overridden,
                                   origin=f"{names} as given, the rest {settings.origin}")
  if settings.short_side < 0 or not 1 <= settings.jpeg_quality <= 100:
    raise InferenceError(f"short side must be >= 0 and JPEG quality in [1, 100], got "
                       f"{settings.short_side} and {settings.jpeg_quality}")
  if float(settings.fps) != float(data.fps):
    settings = dataclasses.replace(settings, fps=float(data.fps), origin=(
        f"{settings.origin}; WARNING: the data was prepared at {settings.fps:g} fps but "
        f"config.data.fps is {float(data.fps):g}, which is used"))
  return settings


def host_tensorflow():
  """TensorFlow, kept off the accelerators: it only decodes here, and they belong to JAX."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow was already initialised by the caller: leave it as it is
    pass
  return tf


def decode_video(path: str, settings) -> list[bytes]:
  """The video's frames as JPEG bytes, as the preparation tools would store them."""
  from msca_jax.data import video

  host_tensorflow()
  frames = video.jpeg_frames(path, fps=settings.fps, short_side=settings.short_side,
                             quality=settings.jpeg_quality, max_frames=settings.max_frames)
  if not frames:
    raise video.VideoError(f"{path}: no frames")
  return frames


def view_counts(data, views: str = "test") -> tuple[int, int]:
  """(clips, crops) of a protocol: 'test' is config.data.eval_*, 'val' is config.data.val_*."""
  if views == "test":
    return int(data.eval_clips), int(data.eval_crops)
  if views == "val":
    return int(data.val_clips), int(data.val_crops)
  raise InferenceError(f"views must be one of {VIEWS}, got {views!r}")


def describe_protocol(data, views: str = "test") -> str:
  """E.g. '2 views (2 clips x 1 crop), 8 frames at stride 1'."""
  clips, crops = view_counts(data, views)
  plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"
  sampled = (f"{data.num_frames} frames at stride {data.stride}" if data.sampling == "dense"
             else f"{data.num_frames} frames, {data.sampling} sampling")
  return (f"{plural(clips * crops, 'view')} ({plural(clips, 'clip')} x {plural(crops, 'crop')}), "
          f"{sampled}, {data.image_size} px crops of short side {data.eval_short_side}")


def eval_views(frames: Sequence[bytes], data, views: str = "test") -> np.ndarray:
  """(clips * crops, T, S, S, 3) views of JPEG frames: one video through the evaluation stream."""
  from msca_jax.data import pipeline, sources, stream

  host_tensorflow()
  pipeline.check_config(data)
  num_clips, num_crops = view_counts(data, views)
  source = sources.MemorySource([list(frames)], class_names=["?"])
  batch = next(iter(stream.EvalStream(source, data, batch_size=1, num_clips=num_clips,
                                      num_crops=num_crops)))
  if batch.host["error"][0]:
    raise InferenceError(f"the video's frames could not be decoded ({pipeline.SKIP_REASONS[batch.host['error'][0] - 1]})")
  return batch.device["video"][0]


def class_names(config, labels: str | None = None,
                trained_on: TrainedOn | None = None) -> tuple[list[str], str]:
  """(names, where they came from) for config.model.num_classes classes.

  `labels` (a file with one name per line or 'index,name' rows, or a directory with labels.txt)
  wins; then the names the checkpoint recorded (`trained_on`); else the config's dataset; if that
  cannot be read, 'class 0', 'class 1', ... with the reason. A list of another length than the
  model's classes is an error.
  """
  from msca_jax.data import dmvr

  num_classes = int(config.model.num_classes)
  if labels:
    try:
      names = dmvr.read_labels(labels) if os.path.isdir(labels) else dmvr.read_class_list(labels)
    except DataError as e:
      raise InferenceError(f"--labels: {e}") from None
    origin = f"from {labels}"
  elif trained_on is not None:
    names, origin = list(trained_on.class_names), trained_on.origin
  else:
    try:
      names, origin = _dataset_class_names(config.data)
    except Exception as e:  # pylint: disable=broad-except  # data not on this host: use indices
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      return ([f"class {i}" for i in range(num_classes)],
              f"class indices: the dataset's class names are not available ({reason}); "
              "pass --labels")
  if len(names) != num_classes:
    raise InferenceError(f"{origin.removeprefix('from ')}: {len(names)} class names, but the model "
                       f"has {num_classes} classes (config.model.num_classes)")
  return list(names), origin


def _dataset_class_names(data) -> tuple[list[str], str]:
  from msca_jax.data import dmvr, sources

  if data.source == "synthetic":
    # The same list ensure_shards writes to labels.txt, without writing the dataset to find it.
    from msca_jax.data import synthetic
    return list(synthetic.CLASSES), "the synthetic dataset"
  if data.source == "dmvr" and data.path:
    # Only labels.txt is needed, not the shards themselves.
    return dmvr.read_labels(data.path), f"from {os.path.join(data.path, dmvr.LABELS_FILE)}"
  source = sources.make_source(data, data.eval_split)
  return list(source.class_names), f"from {source.description}"


# ---------------------------------------------------------------------------------------------
# The model.


def abstract_params(model_config) -> Any:
  """The model's params as shapes (boxed with logical axes), allocating nothing."""
  import jax
  from msca_jax import models

  model = models.build(model_config)
  return jax.eval_shape(model.init, jax.random.key(0), models.clip_spec(model_config))["params"]


def load_params(config, checkpoint_dir: str, with_report: bool = False, check: bool = True):
  """Unboxed numpy params of config.model from a checkpoint directory (see the module docstring).

  Raises FileNotFoundError for a missing directory or one without a checkpoint, OSError for a
  damaged checkpoint, InferenceError for a checkpoint of another model (`check_model`, unless not
  `check`) and pretrained.WeightsError when it does not fit the model; messages name the directory.
  """
  import flax.linen as nn
  from msca_jax import pretrained
  from msca_jax.train import checkpoint as ckpt_lib
  from msca_jax.train import initialise

  directory = os.path.abspath(checkpoint_dir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint {checkpoint_dir}: no such directory (expected a training "
                            "workdir, one of its checkpoint steps, or a params directory)")
  try:
    initialise.step_dir(directory)
  except pretrained.WeightsError:
    raise ckpt_lib.NoCheckpointError(
        f"checkpoint {checkpoint_dir}: no finished checkpoint there (expected a training workdir, "
        "its checkpoints/ or one step of it, or a params directory written by "
        "pretrained.save_params / tools.convert_torch)") from None
  if check:
    unchecked = check_model(config, directory, checkpoint_dir)
    if unchecked:
      logging.warning("%s", unchecked)
  template = abstract_params(config.model)
  init = {"vit_npz": "", "checkpoint": directory, "load_head": True}
  try:
    params, report = initialise.initial_params(init, template)
  except (pretrained.WeightsError, OSError):  # OSError: missing, damaged (the digests say which)
    raise
  except Exception as e:  # pylint: disable=broad-except  # orbax on a directory it cannot read
    first = str(e).splitlines()[0] if str(e) else ""
    raise pretrained.WeightsError(f"checkpoint {checkpoint_dir}: cannot be read as an orbax "
                                  f"checkpoint ({type(e).__name__}: {first})") from e
  params = nn.unbox(params)
  return (params, report) if with_report else params


def check_model(config, directory: str, name: str | None = None) -> str | None:
  """Raises InferenceError when the checkpoint's saved model config is another model than config's.

  The frame size may differ (the position embeddings are resized, and the output says so). Returns
  a warning when the checkpoint saved no config to compare with, else None.
  """
  from msca_jax import pretrained
  from msca_jax.train import initialise, saved_config

  name = name or directory
  try:
    saved = saved_config.read_model_config(initialise.step_dir(directory))
  except pretrained.WeightsError:  # no checkpoint there: load_params says so
    return None
  if saved is None:
    return f"{name} holds no saved config: not checked to be a checkpoint of --config's model"
  diffs = saved_config.differences(saved, config.model, allowed=("image_size",))
  if diffs:
    raise InferenceError(f"--checkpoint {name} is another model than --config: "
                       f"{saved_config.describe(diffs, given_as='--config')}; pass the config it "
                       "was trained with")
  return None


def trained_on(checkpoint_dir: str) -> TrainedOn | None:
  """The data record of a training checkpoint (trainer.data_record), or None: a params directory,
  a checkpoint written before runs recorded it, or no checkpoint there (load_params says so)."""
  from msca_jax import pretrained
  from msca_jax.train import initialise, saved_config

  try:
    step = initialise.step_dir(os.path.abspath(checkpoint_dir))
  except (pretrained.WeightsError, OSError):
    return None
  record = saved_config.read_data_record(step)
  if not record:
    return None
  try:
    decode = DecodeSettings.from_json(record["decode"], origin="")
    names = tuple(str(name) for name in record["class_names"])
  except (KeyError, TypeError, ValueError):  # a damaged record is treated as absent
    return None
  where = f" ({record['description']})" if record.get("description") else ""
  return TrainedOn(decode, names, f"recorded in checkpoint {checkpoint_dir}{where}")


@dataclasses.dataclass
class Model:
  """A checkpoint ready for inference: its params and how its training data was made."""
  config: Any
  params: Any
  report: Any              # pretrained.LoadReport: what was loaded from where
  decode: DecodeSettings
  names: list[str]
  names_origin: str
  warning: str | None      # e.g. no saved config to check the model against


def load_model(config, checkpoint: str, *, labels: str | None = None,
               short_side: int | None = None, jpeg_quality: int | None = None) -> Model:
  """What every inference program starts from; any problem is one InferenceError line.

  Decode settings and class names are the ones the checkpoint was trained with, when it recorded
  them; `labels`, `short_side` and `jpeg_quality` (the command line) override them.
  """
  from msca_jax import models, pretrained

  trained = trained_on(checkpoint)
  decode = decode_settings(config.data, short_side, jpeg_quality, trained)
  names, names_origin = class_names(config, labels, trained)
  try:
    warning = (check_model(config, os.path.abspath(checkpoint), checkpoint)
               if os.path.isdir(checkpoint) else None)
    params, report = load_params(config, checkpoint, with_report=True, check=False)
  except OSError as e:  # no checkpoint there, or a damaged one (the digests name the file)
    raise InferenceError(str(e)) from None
  except pretrained.WeightsError as e:
    arch = ", ".join(f"{k} {v}" for k, v in models.architecture(config.model).items())
    raise InferenceError(
        f"--checkpoint does not fit the model of --config ({config.model.name}: {arch}, "
        f"{config.model.num_classes} classes, {config.model.image_size} px frames): {e}") from None
  return Model(config, params, report, decode, names, names_origin, warning)


@functools.lru_cache(maxsize=8)
def _forward(model):
  import jax
  return jax.jit(model.apply)


def view_logits(config, params, views: np.ndarray) -> np.ndarray:
  """(V, C) float32 logits of config.model on (V, T, S, S, 3) views."""
  from msca_jax import models

  model = models.build(config.model)
  return np.asarray(_forward(model)({"params": params}, views), np.float32)


# ---------------------------------------------------------------------------------------------
# Prediction.


def classify(config, params, video_path: str, views: str = "test", top_k: int = 5,
             names: Sequence[str] | None = None, decode=None) -> Prediction:
  """Decodes, builds the evaluation views, runs the model and ranks the classes.

  `names` defaults to `class_names(config)[0]`; `decode` to `decode_settings(config.data)`.
  Raises video.VideoError for a missing or undecodable video.
  """
  from msca_jax.train import evaluate

  if top_k < 1:
    raise InferenceError(f"top_k must be at least 1, got {top_k}")
  view_counts(config.data, views)
  decode = decode or decode_settings(config.data)
  names = list(names) if names is not None else class_names(config)[0]
  frames = decode_video(video_path, decode)
  logits = view_logits(config, params, eval_views(frames, config.data, views))
  probabilities = evaluate.softmax(np.asarray(evaluate.average_views(logits[None]))[0])
  if len(names) != probabilities.shape[0]:
    raise InferenceError(f"{len(names)} class names for a model with {probabilities.shape[0]} classes")
  return Prediction(top=top_classes(probabilities, names, top_k), probabilities=probabilities,
                    view_logits=logits,
                    num_frames_decoded=len(frames), decode=decode,
                    protocol=describe_protocol(config.data, views))


def predict(config, params, video_path: str, views: str = "test", top_k: int = 5,
            names: Sequence[str] | None = None) -> list[tuple[int, str, float]]:
  """[(class index, name, probability)] of the `top_k` most probable classes, best first."""
  return classify(config, params, video_path, views, top_k, names).top


# ---------------------------------------------------------------------------------------------
# Many videos, and windows of a long one.

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv")
LIST_EXTENSIONS = (".txt", ".lst", ".list")


def is_video_list(path: str) -> bool:
  """A folder, or a text file with one video path per line (by its extension)."""
  return os.path.isdir(path) or (os.path.isfile(path) and path.lower().endswith(LIST_EXTENSIONS))


def list_videos(path: str) -> list[str]:
  """The videos `path` names: itself, the video files under a folder (sorted, recursive), or the
  lines of a list file (relative paths are relative to the list; '#' starts a comment)."""
  if os.path.isdir(path):
    found = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                   if name.lower().endswith(VIDEO_EXTENSIONS))
    if not found:
      raise InferenceError(f"--video {path}: no video files in this folder (expected "
                         f"{', '.join(VIDEO_EXTENSIONS)})")
    return found
  if not os.path.isfile(path):
    raise InferenceError(f"--video {path}: no such file or folder")
  if not path.lower().endswith(LIST_EXTENSIONS):
    return [path]
  base = os.path.dirname(os.path.abspath(path))
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [line.split("#", 1)[0].strip() for line in f]
  found = [line if os.path.isabs(line) else os.path.join(base, line) for line in lines if line]
  if not found:
    raise InferenceError(f"--video {path}: the list names no videos (expected one path per line)")
  return found


def view_batches(videos, data, views: str, batch_size: int):
  """Yields (keys, statuses, views (batch_size, V, T, S, S, 3)) for `videos`, (key, load) pairs.

  `load()` returns a video's JPEG frames or raises video.VideoError; such a video, or one the
  pipeline skips, gets its reason as status (else 'ok') and a row of zeros. Only one batch of
  videos is decoded at a time.
  """
  from msca_jax.data import video

  chunk = []
  for key, load in videos:
    try:
      chunk.append((key, load(), "ok"))
    except video.VideoError as e:
      chunk.append((key, [], str(e)))
    if len(chunk) == batch_size:
      yield _chunk_views(chunk, data, views, batch_size)
      chunk = []
  if chunk:
    yield _chunk_views(chunk, data, views, batch_size)


def _chunk_views(chunk, data, views: str, batch_size: int):
  from msca_jax.data import pipeline, sources, stream

  host_tensorflow()
  num_clips, num_crops = view_counts(data, views)
  source = sources.MemorySource([frames for _, frames, _ in chunk], class_names=["?"])
  batch = next(iter(stream.EvalStream(source, data, batch_size=batch_size, num_clips=num_clips,
                                      num_crops=num_crops)))
  statuses = [status for _, _, status in chunk]
  order = batch.host["index"][:len(chunk)]
  if list(order) != list(range(len(chunk))):
    raise AssertionError(f"the evaluation stream reordered the videos: {list(order)}")
  for i, error in enumerate(batch.host["error"][:len(chunk)]):
    if error and statuses[i] == "ok":
      statuses[i] = pipeline.SKIP_REASONS[error - 1]
  return [key for key, _, _ in chunk], statuses, batch.device["video"]


def batch_probabilities(config, params, views: np.ndarray) -> np.ndarray:
  """(B, C) softmax of the view-averaged logits of (B, V, T, S, S, 3) views."""
  from msca_jax.train import evaluate

  num_views = views.shape[1]
  logits = view_logits(config, params, views.reshape((-1,) + views.shape[2:]))
  return evaluate.softmax(np.asarray(evaluate.average_views(logits, num_views)))


def top_classes(probabilities: np.ndarray, names: Sequence[str],
                top_k: int) -> list[tuple[int, str, float]]:
  """[(class index, name, probability)] of the top_k most probable classes, best first."""
  order = np.argsort(-probabilities, kind="stable")[:top_k]
  return [(int(i), names[i], float(probabilities[i])) for i in order]


def classify_many(config, params, paths: Sequence[str], views: str = "test", top_k: int = 5,
                  names: Sequence[str] | None = None, decode=None, batch_size: int | None = None,
                  progress_stream=None) -> list[tuple[str, str, list[tuple[int, str, float]]]]:
  """[(path, status, top)] for every path, in order; status is 'ok' or why it was skipped.

  Batches of `batch_size` videos (default config.eval.batch_size) share one model call; a
  progress line with rate and ETA goes to `progress_stream` (default stderr).
  """
  from msca_jax import progress

  decode = decode or decode_settings(config.data)
  names = list(names) if names is not None else class_names(config)[0]
  batch_size = int(batch_size or config.eval.batch_size)
  if batch_size < 1:
    raise InferenceError(f"batch size must be at least 1, got {batch_size}")
  loaders = ((p, functools.partial(decode_video, p, decode)) for p in paths)
  rows = []
  with progress.Progress(total=len(paths), unit="videos", desc="predict",
                         stream=progress_stream) as bar:
    for keys, statuses, batch in view_batches(loaders, config.data, views, batch_size):
      probabilities = batch_probabilities(config, params, batch)
      for i, (key, status) in enumerate(zip(keys, statuses)):
        rows.append((key, status, top_classes(probabilities[i], names, top_k) if status == "ok" else []))
      bar.update(len(keys), failed=sum(r[1] != "ok" for r in rows))
  return rows


def video_duration(path: str) -> float | None:
  """The container's duration in seconds, when it records one (for the progress total)."""
  import av
  try:
    with av.open(path) as container:
      stream = container.streams.video[0] if container.streams.video else None
      if stream is not None and stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
      return container.duration / 1e6 if container.duration else None
  except (av.error.FFmpegError, OSError, UnicodeDecodeError):
    return None


def window_frames(path: str, decode, window_seconds: float, hop_seconds: float):
  """Yields (start_s, end_s, JPEG frames) of windows `window_seconds` long every `hop_seconds`.

  The video is decoded as a stream at decode.fps (the rate the model's data had), so a window of
  W seconds holds round(W * fps) frames and times are the video's own; only the current window's
  frames are kept, as JPEG bytes. Only whole windows are taken, except that a video shorter than
  one window gives one window over all of it. Raises video.VideoError for an unreadable video.
  """
  import collections
  from msca_jax.data import video

  tf = host_tensorflow()
  if window_seconds <= 0 or hop_seconds <= 0:
    raise InferenceError(f"--window_seconds and --hop_seconds must be positive, got "
                       f"{window_seconds:g} and {hop_seconds:g}")
  fps = float(decode.fps)
  length = max(1, round(window_seconds * fps))
  hop = max(1, round(hop_seconds * fps))
  buffer = collections.deque()  # (frame index, JPEG) of frames at or after the current start
  start, emitted, index = 0, 0, -1
  decoded = video.iter_frames(path, fps, decode.short_side)
  try:
    for index, frame in enumerate(decoded):
      if index >= start:
        buffer.append((index, tf.io.encode_jpeg(frame, quality=decode.jpeg_quality).numpy()))
      if index == start + length - 1:
        yield start / fps, (start + length) / fps, [jpeg for _, jpeg in buffer]
        emitted += 1
        start += hop
        while buffer and buffer[0][0] < start:
          buffer.popleft()
  finally:
    decoded.close()
  if index < 0:
    raise video.VideoError(f"{path}: no frames")
  if not emitted:
    yield 0.0, (index + 1) / fps, [jpeg for _, jpeg in buffer]


def classify_windows(config, params, path: str, window_seconds: float, hop_seconds: float,
                     views: str = "test", top_k: int = 5, names: Sequence[str] | None = None,
                     decode=None, batch_size: int | None = None, progress_stream=None):
  """[(start_s, end_s, status, top, probabilities)] of the sliding windows of one video."""
  from msca_jax import progress

  if window_seconds <= 0 or hop_seconds <= 0:
    raise InferenceError(f"--window_seconds and --hop_seconds must be positive, got "
                       f"{window_seconds:g} and {hop_seconds:g}")
  decode = decode or decode_settings(config.data)
  names = list(names) if names is not None else class_names(config)[0]
  batch_size = int(batch_size or config.eval.batch_size)
  duration = video_duration(path)
  total = (max(1, int((duration - window_seconds) // hop_seconds) + 1) if duration else None)
  spans = []

  def windows():
    for start, end, frames in window_frames(path, decode, window_seconds, hop_seconds):
      spans.append((start, end))
      yield len(spans) - 1, lambda frames=frames: frames

  rows = []
  with progress.Progress(total=total, unit="windows", desc="predict", stream=progress_stream) as bar:
    for keys, statuses, batch in view_batches(windows(), config.data, views, batch_size):
      probabilities = batch_probabilities(config, params, batch)
      for i, (key, status) in enumerate(zip(keys, statuses)):
        top = top_classes(probabilities[i], names, top_k) if status == "ok" else []
        rows.append((*spans[key], status, top, probabilities[i]))
      bar.update(len(keys))
  return rows



# ---------------------------------------------------------------------------------------------
# What every inference program does first.


def define_model_flags(flag_values: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
  """--config and --checkpoint, the model every inference program (predict, visualize, export,
  extract_features) loads; `argv` is where --config.FIELD overrides are looked for."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py:demo.",
                                  flag_values=flag_values,
                                  sys_argv=list(argv) if argv is not None else None)
  flags.DEFINE_string("checkpoint", None, "Training workdir, one checkpoint step of it, or a params "
                      "directory (pretrained.save_params, tools.convert_torch).",
                      flag_values=flag_values)



def define_video_flags(flag_values: flags.FlagValues) -> None:
  """--video and how it is read and shown: the flags of predict and visualize."""
  flags.DEFINE_string("video", None, "The video file to classify, a folder of videos (searched "
                      "recursively) or a list file (.txt, one path per line).",
                      flag_values=flag_values)
  flags.DEFINE_integer("top_k", 5, "How many classes to list.", flag_values=flag_values)
  flags.DEFINE_enum("views", "test", list(VIEWS), "test: config.data.eval_clips x eval_crops; "
                    "val: config.data.val_clips x val_crops.", flag_values=flag_values)
  flags.DEFINE_string("labels", None, "Class names, one per line (or a directory with labels.txt); "
                      "default: those the checkpoint was trained with, else the config's dataset.",
                      flag_values=flag_values)
  flags.DEFINE_integer("short_side", None, "Decode to this short side (default: as the training "
                       "data was prepared).", flag_values=flag_values)
  flags.DEFINE_integer("jpeg_quality", None, "JPEG quality of the decoded frames (default: as the "
                       "training data was prepared).", flag_values=flag_values)


def start_program(flag_values: flags.FlagValues) -> None:
  """What every program that reads a checkpoint for inference does first (predict, visualize,
  extract_features, export): TensorFlow kept off the accelerators, absl at WARNING unless
  --verbosity says otherwise, and orbax's warnings about read-only managers and missing metadata
  files (which reading a checkpoint causes) filtered out."""
  # Imported here so that --help answers without loading JAX and TensorFlow.
  host_tensorflow()
  if not flag_values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_ERROR or "/orbax/" not in record.pathname)
