"""The model a checkpoint was made with, compared with the model a command is given.

A checkpoint of one model loads without complaint into another model of the same shapes (MSCA-KV
into MSCA-Q, or into the frame-wise ViT), so resuming and predicting compare the model config saved
with the checkpoint with the given one first. What must match is what defines the parameters or
what they compute (MUST_MATCH); everything else may differ between runs of one model: paths,
steps, batch sizes, evaluation, logging, and the model's compute settings (dtype, remat,
attention_impl, dropout rates, head_zeroinit, num_frames, which no parameter depends on).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import tensorflow as tf

from msca_jax import models

# config.model fields that must be equal (as the model reads them: a variant's sizes are compared
# after width/depth/... overrides, and temporal fields only for the models that use them).
MUST_MATCH = ("name", "width", "depth", "num_heads", "mlp_dim", "patch_size", "num_classes",
              "image_size", "shift_div", "msca_targets", "msca_axis", "boundary", "backbone",
              "proj_dim", "layer_norm_eps", "mlp_activation", "pixel_mean", "pixel_std")
_METADATA_FILE = os.path.join("metadata", "metadata")


def read_model_config(step_directory: str) -> dict | None:
  """config.model as saved in a checkpoint step (training or params), or None when none was saved.

  Training checkpoints save the whole config (trainer metadata 'config', a JSON string); params
  directories of tools.convert_torch save 'model'.
  """
  path = os.path.join(step_directory, _METADATA_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      metadata = json.load(f)
    if "config" in metadata:
      config = metadata["config"]
      config = json.loads(config) if isinstance(config, str) else config
      return dict(config["model"])
    if isinstance(metadata.get("model"), Mapping):
      return dict(metadata["model"])
  except (ValueError, KeyError, TypeError):  # unreadable metadata is treated as absent
    return None
  return None


def read_data_record(step_directory: str) -> dict | None:
  """What a training checkpoint recorded of its data (trainer metadata 'data': decode settings,
  class names, description), or None when it recorded none."""
  path = os.path.join(step_directory, _METADATA_FILE)
  if not tf.io.gfile.exists(path):
    return None
  try:
    with tf.io.gfile.GFile(path) as f:
      record = json.load(f).get("data")
  except (ValueError, AttributeError):  # unreadable metadata is treated as absent
    return None
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


def describe(diffs: list[tuple[str, Any, Any]], saved_as: str = "checkpoint",
             given_as: str = "config") -> str:
  """'config.model.name: 'msca' in the checkpoint, 'vit' in the config; ...'."""
  return "; ".join(f"config.model.{field}: {saved!r} in the {saved_as}, {given!r} in the {given_as}"
                   for field, saved, given in diffs)
