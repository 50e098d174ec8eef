"""The model a checkpoint was made with, compared with the model a command is given.

A checkpoint of one model loads without complaint into another model of the same shapes (MSCA-KV
into MSCA-Q, or into the frame-wise ViT), so resuming and predicting compare the model config saved
with the checkpoint with the given one first. What must match is what defines the parameters or
what they compute (MUST_MATCH); everything else may differ between runs of one model: paths,
steps, batch sizes, evaluation, logging, and the model's compute settings (dtype, remat,
attention_impl, dropout rates, head_zeroinit, num_frames, which no parameter depends on).

Resuming also compares config.train with the saved one where it decides the optimiser state's
structure (OPTIMIZER_FIELDS: which optimiser, momentum on or off, weight decay on or off, gradient
clipping on or off, layer decay on or off, which parameters train): a state of another structure
cannot be restored into, so such a change is refused naming the field. The accumulation count
(config.train.grad_accum_steps) may change: the trainer converts the state (optim.py's
change_accumulation). docs/training.md#checkpoints-and-resume lists which fields are which.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import tensorflow as tf

from msca_jax import models
from msca_jax.train import optim

# config.model fields that must be equal (as the model reads them: a variant's sizes are compared
# after width/depth/... overrides, and temporal fields only for the models that use them).
MUST_MATCH = ("name", "width", "depth", "num_heads", "mlp_dim", "patch_size", "num_classes",
              "image_size", "shift_div", "msca_targets", "msca_axis", "boundary", "backbone",
              "proj_dim", "layer_norm_eps", "mlp_activation", "pixel_mean", "pixel_std")
# config.train fields whose change can give the optimiser state another structure (optim.py's
# make_optimizer): whether one does is decided by building both states' structures, not by rule.
OPTIMIZER_FIELDS = ("optimizer", "momentum", "weight_decay", "grad_clip_norm", "layer_decay",
                    "trainable")
_METADATA_FILE = os.path.join("metadata", "metadata")


def _read_metadata(step_directory: str) -> dict | None:
  path = os.path.join(step_directory, _METADATA_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      metadata = json.load(f)
  except ValueError:  # unreadable metadata is treated as absent
    return None
  return metadata if isinstance(metadata, dict) else None


def read_config(step_directory: str) -> dict | None:
  """The whole config a training checkpoint step was made with, or None when none was saved."""
  metadata = _read_metadata(step_directory)
  if metadata is None or "config" not in metadata:
    return None
  config = metadata["config"]
  try:
    config = json.loads(config) if isinstance(config, str) else config
  except ValueError:
    return None
  return config if isinstance(config, dict) else None


def read_model_config(step_directory: str) -> dict | None:
  """config.model as saved in a checkpoint step (training or params), or None when none was saved.

  Training checkpoints save the whole config (trainer metadata 'config', a JSON string); params
  directories of tools.convert_torch save 'model'.
  """
  config = read_config(step_directory)
  if config is not None:
    return dict(config["model"]) if isinstance(config.get("model"), Mapping) else None
  metadata = _read_metadata(step_directory)
  if metadata is not None and isinstance(metadata.get("model"), Mapping):
    return dict(metadata["model"])
  return None


def read_train_config(step_directory: str) -> dict | None:
  """config.train as saved in a training checkpoint step, or None when none was saved."""
  config = read_config(step_directory)
  train = None if config is None else config.get("train")
  return dict(train) if isinstance(train, Mapping) else None


def read_data_record(step_directory: str) -> dict | None:
  """What a training checkpoint recorded of its data (trainer metadata 'data': decode settings,
  class names, description), or None when it recorded none."""
  metadata = _read_metadata(step_directory)
  record = None if metadata is None else metadata.get("data")
  return dict(record) if isinstance(record, Mapping) else None


def _effective(model: Mapping[str, Any]) -> dict[str, Any]:
  """The MUST_MATCH values of a model config, as the model builder reads them."""
  get = lambda field, default=None: default if model.get(field) is None else model.get(field)
  name = get("name", "vit")
  values: dict[str, Any] = {"name": name}
  try:
    values.update(models.architecture(model))
  except ValueError:  # not a valid variant: compare the fields as written
    values.update({k: model.get(k) for k in ("variant", "width", "depth", "num_heads", "mlp_dim",
                                              "patch_size")})
  try:  # configs saved before the backbone fields existed read as the ViT defaults
    values.update(models.backbone_options(model))
  except ValueError:
    values.update({k: model.get(k) for k in ("backbone", "proj_dim", "layer_norm_eps",
                                              "mlp_activation", "pixel_mean", "pixel_std")})
  values["num_classes"] = model.get("num_classes")
  values["image_size"] = model.get("image_size")
  if name != "vit":
    values["shift_div"] = get("shift_div", 4)
    values["boundary"] = get("boundary", "zero")
  if name == "msca":
    values["msca_targets"] = get("msca_targets", "kv")
    values["msca_axis"] = get("msca_axis", "head")
  return values


def differences(saved: Mapping[str, Any], given: Mapping[str, Any], *,
                allowed: tuple[str, ...] = ()) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, given value)] of the model fields that differ, MUST_MATCH order.

  Temporal fields are compared when both models use them (a differing name says the rest).
  """
  a, b = _effective(saved), _effective(given)
  fields = [f for f in dict.fromkeys((*MUST_MATCH, *a)) if f in a and f in b and f not in allowed]
  return [(f, a.get(f), b.get(f)) for f in fields if a.get(f) != b.get(f)]


def optimizer_differences(saved: Mapping[str, Any], given, params: Any,
                          steps_per_epoch: int) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, given value)] of the OPTIMIZER_FIELDS that change the state's structure.

  `saved` is the saved config.train (a dict), `given` the run's config.train, `params` the
  (abstract) parameters. Both optimisers are built, and a field is named when putting its saved
  value into the given config changes the state's tree structure; when only several fields
  together do, every one of them that differs is named. A field the saved config lacks (written
  before the field existed) reads as the given value. The accumulation count is left out: the
  trainer converts it (optim.change_accumulation). Empty when the structures are the same, or when
  the saved values cannot build an optimiser (then restoring is what fails, naming the cause).
  """
  base = dict(given.to_dict(), grad_accum_steps=1)

  def structure(values: Mapping[str, Any]):
    train = ml_collections.ConfigDict(dict(base, **values))
    tx = optim.make_optimizer(train, steps_per_epoch)
    return jax.tree_util.tree_structure(jax.eval_shape(tx.init, params))

  saved_values = {f: saved[f] for f in OPTIMIZER_FIELDS if f in saved and saved[f] != given.get(f)}
  if not saved_values:
    return []
  ours = structure({})
  try:
    if structure(saved_values) == ours:
      return []
    named = [f for f in saved_values if structure({f: saved_values[f]}) != ours]
  except (ValueError, TypeError):
    return []
  return [(f, saved_values[f], given.get(f)) for f in (named or saved_values)]


def describe(diffs: list[tuple[str, Any, Any]], saved_as: str = "checkpoint",
             given_as: str = "config", group: str = "model") -> str:
  """'config.model.name: 'msca' in the checkpoint, 'vit' in the config; ...'."""
  return "; ".join(f"config.{group}.{field}: {saved!r} in the {saved_as}, {given!r} in the {given_as}"
                   for field, saved, given in diffs)
