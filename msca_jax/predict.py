r"""Classifies one video file with a trained model: the top-k classes and their probabilities.

    python -m msca_jax.predict --config=configs/msca_kv.py:demo --checkpoint=/tmp/msca_kv_demo \
        --video=clip.mp4 [--top_k=5] [--views=test|val] [--labels=labels.txt]

The video goes through exactly what evaluation does with a prepared video:
  1. decoding as the data was prepared: PyAV, resampled to config.data.fps, resized to the short
     side and stored as JPEGs at the quality the dataset used (read from the DMVR manifest or the
     TFDS metadata of config.data.path when present, else the preparation tools' defaults;
     --short_side / --jpeg_quality override);
  2. the evaluation views: config.data.eval_clips x eval_crops ('test', the default) or
     val_clips x val_crops ('val'), sampled and cropped by the pipeline's own functions;
  3. the model on every view, logits averaged over views (`evaluate.average_views`), softmax.

--checkpoint is a training workdir (its latest checkpoint), its checkpoints/ or one step of it, or
a params directory (`pretrained.save_params`, `tools.convert_torch`). Class names come from the
config's dataset (labels.txt of config.data.path, the TFDS label names, or the synthetic classes);
--labels (a file with one name per line, or a directory holding labels.txt) replaces them, and
without either the classes are shown by index.

From Python:

    params = predict.load_params(config, "/tmp/msca_kv_demo")
    for index, name, prob in predict.predict(config, params, "clip.mp4"):
      print(index, name, prob)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
from typing import Any, Sequence

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags, logging
from ml_collections import config_flags

from msca_jax import cli

VIEWS = ("test", "val")


class PredictError(ValueError):
  """A prediction input (video, checkpoint, labels, config) that cannot be used; one line."""


@dataclasses.dataclass
class Prediction:
  """Everything `classify` found for one video."""
  top: list[tuple[int, str, float]]    # (class index, name, probability), most probable first
  probabilities: np.ndarray            # (num_classes,) softmax of the view-averaged logits
  view_logits: np.ndarray              # (views, num_classes)
  num_frames_decoded: int
  decode: Any                          # sources.DecodeSettings
  protocol: str


# ---------------------------------------------------------------------------------------------
# What the model saw: decoding, views, class names.


def decode_settings(data, short_side: int | None = None, jpeg_quality: int | None = None):
  """How the data of `config.data` was prepared (sources.decode_settings), so that a new video is
  decoded the same way; `short_side` / `jpeg_quality` override the recorded values."""
  from msca_jax.data import sources

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
    raise PredictError(f"short side must be >= 0 and JPEG quality in [1, 100], got "
                       f"{settings.short_side} and {settings.jpeg_quality}")
  if float(settings.fps) != float(data.fps):
    settings = dataclasses.replace(settings, fps=float(data.fps), origin=(
        f"{settings.origin}; WARNING: the data was prepared at {settings.fps:g} fps but "
        f"config.data.fps is {float(data.fps):g}, which is used"))
  return settings


def _tensorflow():
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

  _tensorflow()
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
  raise PredictError(f"views must be one of {VIEWS}, got {views!r}")


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

  _tensorflow()
  pipeline.check_config(data)
  num_clips, num_crops = view_counts(data, views)
  source = sources.MemorySource([list(frames)], class_names=["?"])
  batch = next(iter(stream.EvalStream(source, data, batch_size=1, num_clips=num_clips,
                                      num_crops=num_crops)))
  if batch.host["error"][0]:
    raise PredictError(f"the video's frames could not be decoded ({pipeline.SKIP_REASONS[batch.host['error'][0] - 1]})")
  return batch.device["video"][0]


def class_names(config, labels: str | None = None) -> tuple[list[str], str]:
  """(names, where they came from) for config.model.num_classes classes.

  `labels` (a file with one name per line or 'index,name' rows, or a directory with labels.txt)
  wins; else the config's dataset; if that cannot be read, 'class 0', 'class 1', ... with the
  reason. A list of another length than the model's classes is an error.
  """
  from msca_jax.data import dmvr

  num_classes = int(config.model.num_classes)
  if labels:
    try:
      names = dmvr.read_labels(labels) if os.path.isdir(labels) else dmvr.read_class_list(labels)
    except dmvr.DataError as e:
      raise PredictError(f"--labels: {e}") from None
    origin = f"from {labels}"
  else:
    try:
      names, origin = _dataset_class_names(config.data)
    except Exception as e:  # pylint: disable=broad-except  # data not on this machine: use indices
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      return ([f"class {i}" for i in range(num_classes)],
              f"class indices: the dataset's class names are not available ({reason}); "
              "pass --labels")
  if len(names) != num_classes:
    raise PredictError(f"{origin.removeprefix('from ')}: {len(names)} class names, but the model "
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
  damaged checkpoint, PredictError for a checkpoint of another model (`check_model`, unless not
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
  """Raises PredictError when the checkpoint's saved model config is another model than config's.

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
    raise PredictError(f"--checkpoint {name} is another model than --config: "
                       f"{saved_config.describe(diffs, given_as='--config')}; pass the config it "
                       "was trained with")
  return None


@functools.lru_cache(maxsize=8)
def _forward(model):
  import jax
  return jax.jit(model.apply)


def view_logits(config, params, views: np.ndarray) -> np.ndarray:
  """(V, C) float32 logits of config.model on (V, T, S, S, 3) views."""
  from msca_jax import models

  model = models.build(config.model)
  return np.asarray(_forward(model)({"params": params}, views), np.float32)


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


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
    raise PredictError(f"top_k must be at least 1, got {top_k}")
  view_counts(config.data, views)
  decode = decode or decode_settings(config.data)
  names = list(names) if names is not None else class_names(config)[0]
  frames = decode_video(video_path, decode)
  logits = view_logits(config, params, eval_views(frames, config.data, views))
  probabilities = _softmax(np.asarray(evaluate.average_views(logits[None]))[0])
  if len(names) != probabilities.shape[0]:
    raise PredictError(f"{len(names)} class names for a model with {probabilities.shape[0]} classes")
  order = np.argsort(-probabilities, kind="stable")[:top_k]
  top = [(int(i), names[i], float(probabilities[i])) for i in order]
  return Prediction(top=top, probabilities=probabilities, view_logits=logits,
                    num_frames_decoded=len(frames), decode=decode,
                    protocol=describe_protocol(config.data, views))


def predict(config, params, video_path: str, views: str = "test", top_k: int = 5,
            names: Sequence[str] | None = None) -> list[tuple[int, str, float]]:
  """[(class index, name, probability)] of the `top_k` most probable classes, best first."""
  return classify(config, params, video_path, views, top_k, names).top


# ---------------------------------------------------------------------------------------------
# The command line.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> flags.FlagValues:
  """Defines the flags; only when run as a program, so importing this module defines nothing.

  `argv` is where --config.FIELD overrides are looked for (default: sys.argv).
  """
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py:demo.",
                                  flag_values=flag_values,
                                  sys_argv=list(argv) if argv is not None else None)
  flags.DEFINE_string("checkpoint", None, "Training workdir, one checkpoint step of it, or a params "
                      "directory (pretrained.save_params, tools.convert_torch).",
                      flag_values=flag_values)
  flags.DEFINE_string("video", None, "The video file to classify.", flag_values=flag_values)
  flags.DEFINE_integer("top_k", 5, "How many classes to list.", flag_values=flag_values)
  flags.DEFINE_enum("views", "test", list(VIEWS), "test: config.data.eval_clips x eval_crops; "
                    "val: config.data.val_clips x val_crops.", flag_values=flag_values)
  flags.DEFINE_string("labels", None, "Class names, one per line (or a directory with labels.txt); "
                      "default: the config's dataset.", flag_values=flag_values)
  flags.DEFINE_integer("short_side", None, "Decode to this short side (default: as the dataset "
                       "was prepared).", flag_values=flag_values)
  flags.DEFINE_integer("jpeg_quality", None, "JPEG quality of the decoded frames (default: as the "
                       "dataset was prepared).", flag_values=flag_values)
  return flag_values


def _check_required(flag_values: flags.FlagValues) -> None:
  if flag_values.config is None or not flag_values.checkpoint or not flag_values.video:
    raise app.UsageError("--config, --checkpoint and --video are required, e.g. "
                         "--config=configs/msca_kv.py:demo --checkpoint=WORKDIR --video=clip.mp4")


def run(flag_values: flags.FlagValues, out=None) -> int:
  """The command: prints the prediction to `out` (stdout); errors go to stderr, returning 1."""
  _check_required(flag_values)
  from msca_jax import models, pretrained
  from msca_jax.data import dmvr, video

  out = out or sys.stdout
  config = flag_values.config

  def fail(message: str) -> int:
    print(f"predict: error: {message}", file=sys.stderr)
    return 1

  path = flag_values.video
  if flag_values.top_k < 1:
    raise app.UsageError(f"--top_k must be at least 1, got {flag_values.top_k}")
  if not os.path.isfile(path):
    return fail(f"--video {path}: no such file")
  try:
    data = config.data
    protocol = describe_protocol(data, flag_values.views)
    decode = decode_settings(data, flag_values.short_side, flag_values.jpeg_quality)
    names, names_origin = class_names(config, flag_values.labels)
  except (PredictError, dmvr.DataError) as e:
    return fail(str(e))
  unchecked = None
  try:
    if os.path.isdir(flag_values.checkpoint):
      unchecked = check_model(config, os.path.abspath(flag_values.checkpoint), flag_values.checkpoint)
    params, report = load_params(config, flag_values.checkpoint, with_report=True, check=False)
  except (OSError, PredictError) as e:  # no checkpoint there, a damaged one, or another model
    return fail(str(e))
  except pretrained.WeightsError as e:
    arch = ", ".join(f"{k} {v}" for k, v in models.architecture(config.model).items())
    return fail(f"--checkpoint does not fit the model of --config ({config.model.name}: {arch}, "
                f"{config.model.num_classes} classes, {config.model.image_size} px frames): {e}")
  try:
    result = classify(config, params, path, flag_values.views, flag_values.top_k, names, decode)
  except video.VideoError as e:
    return fail(f"--video: {e}")
  except (PredictError, dmvr.DataError) as e:
    return fail(str(e))

  seconds = result.num_frames_decoded / decode.fps if decode.fps else float("nan")
  print(f"video      {path}: {result.num_frames_decoded} frames ({seconds:.2f} s), decoded at "
        f"{decode.describe()}", file=out)
  print(f"views      {protocol} ({flag_values.views} protocol)", file=out)
  print(f"weights    {report.source}: {len(report.loaded)} arrays", file=out)
  if unchecked:
    print(f"warning    {unchecked}", file=out)
  if report.resized:
    print(f"warning    resized to the config's frame size: {', '.join(report.resized)}", file=out)
  print(f"classes    {len(names)}, {names_origin}", file=out)
  print(f"top-{len(result.top)}", file=out)
  width = max(len(name) for _, name, _ in result.top)
  for rank, (index, name, prob) in enumerate(result.top, 1):
    print(f"  {rank}. {name:<{width}}  {prob:.4f}  (class {index})", file=out)
  return 0


def main(argv: Sequence[str]) -> int:
  """The program: 0 with a prediction; 2 (one line on stderr) for a mistake in the inputs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _check_required(flags.FLAGS)
  # Imported here so that --help answers without loading JAX and TensorFlow.
  _tensorflow()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Reading a checkpoint makes orbax warn about read-only managers and missing metadata files.
  logging.get_absl_logger().addFilter(
      lambda record: record.levelno >= logging.converter.STANDARD_ERROR or "/orbax/" not in record.pathname)
  # run's failures are all about the inputs: the exit status every program gives a user error.
  return cli.EXIT_USER_ERROR if run(flags.FLAGS) else 0


if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=(PredictError,))
