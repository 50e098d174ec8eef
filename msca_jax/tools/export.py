r"""Exports a trained model with its evaluation preprocessing: uint8 frames in, logits out.

    python -m msca_jax.tools.export --config=configs/msca_kv.py:demo --checkpoint=WORKDIR --out=DIR \
        [--platforms=cpu,cuda,tpu] [--formats=jax,tf]

The exported function takes ONE sampled clip, uint8 (T, H, W, 3) RGB frames with T =
config.model.num_frames and any H, W (symbolic dimensions), and returns float32 (num_classes,)
logits. Inside, it does what evaluation does to a clip (msca_jax/data/augment.py eval_views and
pipeline.to_output): bicubic resize of the short side to config.data.eval_short_side (TensorFlow's
half-pixel ResizeBicubic, Keys a = -0.5, reproduced here tap by tap), clipping,
the config.data.eval_crops square crops along the long side, rounding to what batches carry, the
model, and the mean of the logits over the crops. Choosing the clip (config.data.eval_clips
positions, the stride) stays with the caller: for several clips, call it once per clip and average
the logits, as `predict` does. DIR receives:

  model.jax_export   jax.export serialized artifact for --platforms (params embedded);
  saved_model/       TensorFlow SavedModel (jax2tf; params as variables), signature
                     'serving_default': {'frames': uint8 (T, None, None, 3)} -> {'logits'};
  export.json        the input contract, the classes and where it came from.

Calling them:

    from jax import export
    with open("DIR/model.jax_export", "rb") as f:
      logits = export.deserialize(f.read()).call(frames)     # frames: uint8 (T, H, W, 3)

    import tensorflow as tf
    model = tf.saved_model.load("DIR/saved_model")
    logits = model.serve(tf.constant(frames))                 # or model.signatures["serving_default"]
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Sequence

if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported

import numpy as np  # pylint: disable=g-import-not-at-top
from absl import app, flags

from msca_jax import cli, inference
from msca_jax.data.errors import DataError

PLATFORMS = ("cpu", "cuda", "tpu")
FORMATS = ("jax", "tf")
JAX_FILE = "model.jax_export"
TF_DIR = "saved_model"

# TensorFlow's ResizeBicubic (half-pixel centres) reads its Keys (a = -0.5) weights from a table
# of 1024 steps, computed in double and stored as float: the same table gives the same pixels.
_TABLE_SIZE = 1024
_KEYS_A = -0.5


def _keys_table() -> np.ndarray:
  x = np.arange(_TABLE_SIZE + 1, dtype=np.float64) / _TABLE_SIZE
  near = ((_KEYS_A + 2) * x - (_KEYS_A + 3)) * x * x + 1
  x1 = x + 1.0
  far = ((_KEYS_A * x1 - 5 * _KEYS_A) * x1 + 8 * _KEYS_A) * x1 - 4 * _KEYS_A
  return np.stack([near, far], axis=1).astype(np.float32)


def resize_taps(out_positions, out_size, in_size):
  """(indices, weights), each (len(out_positions), 4), of TensorFlow's half-pixel bicubic resize
  from in_size to out_size for the output rows `out_positions` (any of them may be traced)."""
  import jax.numpy as jnp

  table = jnp.asarray(_keys_table())
  scale = in_size.astype(jnp.float32) / out_size.astype(jnp.float32)
  position = (out_positions.astype(jnp.float32) + 0.5) * scale - 0.5
  start = jnp.floor(position)
  step = jnp.round((position - start) * _TABLE_SIZE).astype(jnp.int32)
  weights = jnp.stack([table[step, 1], table[step, 0], table[_TABLE_SIZE - step, 0],
                       table[_TABLE_SIZE - step, 1]], axis=1)
  taps = start.astype(jnp.int32)[:, None] + jnp.arange(-1, 3)[None, :]
  inside = (taps >= 0) & (taps < in_size)
  # Taps outside the image get no weight and the rest are renormalised, as in TensorFlow.
  weights = jnp.where(inside, weights, 0.0)
  weights = weights * (1.0 / weights.sum(axis=1, keepdims=True))
  return jnp.clip(taps, 0, in_size - 1), weights


def _interpolate(x, taps, weights, axis: int):
  """sum_k weights[:, k] * x[taps[:, k]] along `axis`, the taps added in TensorFlow's order."""
  import jax.numpy as jnp

  shape = [1] * x.ndim
  shape[axis] = -1
  total = None
  for k in range(4):
    term = jnp.take(x, taps[:, k], axis=axis) * weights[:, k].reshape(shape)
    total = term if total is None else total + term
  return total


def eval_crops(frames, data):
  """uint8 (T, H, W, 3) -> (crops, T, S, S, 3) as the evaluation batches carry them."""
  import jax.numpy as jnp
  from msca_jax.data import augment

  size, short_side = int(data.image_size), int(data.eval_short_side)
  positions = augment.CROP_POSITIONS[int(data.eval_crops)]
  height, width = frames.shape[1], frames.shape[2]
  h = jnp.asarray(height, jnp.int32)
  w = jnp.asarray(width, jnp.int32)
  scale = jnp.float32(short_side) / jnp.minimum(h, w).astype(jnp.float32)
  new_h = jnp.maximum(jnp.round(h.astype(jnp.float32) * scale).astype(jnp.int32), size)
  new_w = jnp.maximum(jnp.round(w.astype(jnp.float32) * scale).astype(jnp.int32), size)
  long_is_width = new_w >= new_h
  y_room, x_room = new_h - size, new_w - size
  pixels = frames.astype(jnp.float32) / 255.0
  views = []
  for crop in positions:
    along = lambda room: (jnp.float32(crop) * room.astype(jnp.float32)).astype(jnp.int32)
    y0 = jnp.where(long_is_width, y_room // 2, along(y_room))
    x0 = jnp.where(long_is_width, along(x_room), x_room // 2)
    # Vertical then horizontal, the order TensorFlow's kernel sums in.
    view = _interpolate(pixels, *resize_taps(y0 + jnp.arange(size), new_h, h), axis=1)
    view = _interpolate(view, *resize_taps(x0 + jnp.arange(size), new_w, w), axis=2)
    views.append(jnp.clip(view, 0.0, 1.0))
  views = jnp.stack(views)
  if data.dtype == "uint8":
    return jnp.round(views * 255.0).astype(jnp.uint8)
  return (views * 2.0 - 1.0).astype(jnp.dtype(data.dtype))


def serving_function(config) -> Callable[[Any, Any], Any]:
  """f(params, uint8 (T, H, W, 3)) -> float32 (num_classes,) logits: eval crops, model, mean."""
  from msca_jax import models

  model = models.build(config.model)
  data = config.data

  def serve(params, frames):
    views = eval_crops(frames, data)
    return model.apply({"params": params}, views).mean(axis=0)

  return serve


def input_spec(config, height: str = "height", width: str = "width"):
  """uint8 (T, height, width, 3) with symbolic height and width, both at least the crop size."""
  import jax
  import jax.numpy as jnp
  from jax import export

  height_dim, width_dim = export.symbolic_shape(f"{height}, {width}")
  return jax.ShapeDtypeStruct((int(config.model.num_frames), height_dim, width_dim, 3), jnp.uint8)


def export_jax(config, params, platforms: Sequence[str] = PLATFORMS) -> bytes:
  """The serialized jax.export artifact, params embedded."""
  import jax
  from jax import export

  serve = serving_function(config)
  exported = export.export(jax.jit(lambda frames: serve(params, frames)),
                           platforms=tuple(platforms))(input_spec(config))
  return bytes(exported.serialize())


def export_tf(config, params, path: str, platforms: Sequence[str] = PLATFORMS) -> None:
  """A TensorFlow SavedModel at `path` whose `serve` (and 'serving_default') takes frames."""
  import jax
  from jax.experimental import jax2tf
  tf = inference.host_tensorflow()

  serve = serving_function(config)
  frames_shape = f"({int(config.model.num_frames)}, height, width, 3)"
  converted = jax2tf.convert(serve, with_gradient=False, polymorphic_shapes=[None, frames_shape],
                             native_serialization_platforms=tuple(platforms))
  module = tf.Module()
  module.params = jax.tree.map(lambda x: tf.Variable(np.asarray(x), trainable=False), params)
  spec = tf.TensorSpec((int(config.model.num_frames), None, None, 3), tf.uint8, name="frames")

  @tf.function(input_signature=[spec], autograph=False)
  def serve_tf(frames):
    return converted(module.params, frames)

  @tf.function(input_signature=[spec], autograph=False)
  def signature(frames):
    return {"logits": converted(module.params, frames)}

  module.serve = serve_tf
  tf.saved_model.save(module, path, signatures={"serving_default": signature})


def write(config, params, out: str, platforms: Sequence[str] = PLATFORMS,
          formats: Sequence[str] = FORMATS, names: Sequence[str] | None = None,
          source: str = "") -> dict[str, str]:
  """Writes the artifacts into `out`; returns {name: path}."""
  os.makedirs(out, exist_ok=True)
  written = {}
  if "jax" in formats:
    written["jax"] = os.path.join(out, JAX_FILE)
    with open(written["jax"] + ".tmp", "wb") as f:
      f.write(export_jax(config, params, platforms))
    os.replace(written["jax"] + ".tmp", written["jax"])
  if "tf" in formats:
    written["tf"] = os.path.join(out, TF_DIR)
    export_tf(config, params, written["tf"], platforms)
  d = config.data
  contract = {
      "input": {"dtype": "uint8", "shape": [int(config.model.num_frames), "height", "width", 3],
                "meaning": "one sampled clip of RGB frames, any height and width"},
      "output": {"dtype": "float32", "shape": [int(config.model.num_classes)],
                 "meaning": "logits, averaged over the evaluation crops"},
      "preprocessing": {"eval_short_side": int(d.eval_short_side), "image_size": int(d.image_size),
                        "eval_crops": int(d.eval_crops), "resize": "bicubic (TensorFlow half-pixel)",
                        "clip_sampling": {"sampling": d.sampling, "stride": int(d.stride),
                                          "fps": float(d.fps), "eval_clips": int(d.eval_clips)}},
      "platforms": list(platforms), "formats": list(formats),
      "class_names": list(names) if names is not None else None,
      "model": config.model.to_dict(), "checkpoint": source,
  }
  written["json"] = os.path.join(out, "export.json")
  with open(written["json"], "w", encoding="utf-8") as f:
    json.dump(contract, f, indent=2)
  return written


# ---------------------------------------------------------------------------------------------
# The command line.


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> flags.FlagValues:
  inference.define_model_flags(flag_values, argv)
  flags.DEFINE_string("out", None, "Directory for the artifacts.", flag_values=flag_values)
  flags.DEFINE_list("platforms", list(PLATFORMS), "jax.export / jax2tf platforms.",
                    flag_values=flag_values)
  flags.DEFINE_list("formats", list(FORMATS), "jax: jax.export artifact; tf: TF SavedModel.",
                    flag_values=flag_values)
  flags.DEFINE_string("labels", None, "Class names for export.json (default: those the "
                      "checkpoint was trained with, else the config's dataset).", flag_values=flag_values)
  return flag_values


def run(flag_values: flags.FlagValues, out=None) -> int:
  """The command; a mistake in the inputs prints one line and returns EXIT_USER_ERROR."""
  if flag_values.config is None or not flag_values.checkpoint or not flag_values.out:
    raise app.UsageError("--config, --checkpoint and --out are required, e.g. "
                         "--config=configs/msca_kv.py:demo --checkpoint=WORKDIR --out=DIR")
  out = out or sys.stdout
  config = flag_values.config

  def fail(message: str) -> int:
    print(f"export: error: {cli.one_line(message)}", file=sys.stderr)
    return cli.EXIT_USER_ERROR

  for name, values, allowed in (("platforms", flag_values.platforms, PLATFORMS),
                                ("formats", flag_values.formats, FORMATS)):
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
      return fail(f"--{name}: expected a comma-separated subset of {','.join(allowed)}, got "
                  f"{','.join(values) or 'nothing'}")
  if os.path.exists(flag_values.out) and not os.path.isdir(flag_values.out):
    return fail(f"--out {flag_values.out}: exists and is not a directory")
  if int(config.data.eval_crops) not in (1, 3):
    return fail(f"config.data.eval_crops must be 1 or 3, got {config.data.eval_crops}")
  if int(config.data.eval_short_side) < int(config.data.image_size):
    return fail(f"config.data.eval_short_side {config.data.eval_short_side} is below the crop "
                f"size config.data.image_size {config.data.image_size}")
  try:
    model = inference.load_model(config, flag_values.checkpoint, labels=flag_values.labels)
  except (inference.InferenceError, DataError) as e:
    return fail(str(e))
  names, params = model.names, model.params
  try:
    written = write(config, params, flag_values.out, flag_values.platforms, flag_values.formats,
                    names, source=os.path.abspath(flag_values.checkpoint))
  except OSError as e:
    return fail(f"--out {flag_values.out}: cannot write ({e.strerror or e})")
  for name in sorted(written):
    print(f"wrote {written[name]}", file=out)
  return 0


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  inference.start_program(flags.FLAGS)
  return run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
