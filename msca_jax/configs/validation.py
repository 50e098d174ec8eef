"""Checks a whole config before anything is built: each mistake is one line naming the field.

main.py runs `validate` after the config is loaded and before the trainer builds anything, so
that a wrong field is an `errors.UserError` (exit 2), not a traceback after the config dump.
"""

from __future__ import annotations

import json
import os
import tempfile

import ml_collections

from msca_jax.data import synthetic
from msca_jax.errors import UserError
from msca_jax.data.errors import DataError

_SPLIT_FIELDS = {"train": ("train_split", "train_list"), "eval": ("eval_split", "eval_list")}


def validate(config: ml_collections.ConfigDict, mode: str = "train_and_evaluate",
             workdir: str | None = None) -> None:
  """Checks a whole config before anything is built; raises errors.UserError naming the field.

  Runs each part's own checks (model, data pipeline, optimiser, mesh) and adds what would
  otherwise fail only later: the patch size against the frame size, the batch sizes against the
  devices and processes, data paths and split files, a writable synthetic-dataset cache, the
  initial weights. `mode` is main's --mode: 'evaluate' needs no training split, but weights: a
  finished checkpoint in `workdir` or config.init's.
  """
  from msca_jax import models
  from msca_jax.data import pipeline
  from msca_jax.train import optim

  train = mode != "evaluate"
  _checked(models.build, config.model)
  _check_patch_size(config.model)
  _checked(pipeline.check_config, config.data)
  _checked(optim.check_config, config.train)  # the trainer checks it in every mode
  _check_batch_sizes(config, train)
  _check_flips(config.data)
  _check_data(config.data, ("train", "eval") if train else ("eval",))
  _check_init(config.init)
  if mode == "evaluate" and workdir is not None:
    _check_something_to_evaluate(config.init, workdir)


def _checked(check, *args):
  """Runs one of the parts' checks, whose ValueErrors (DataError included) name a config field."""
  try:
    return check(*args)
  except ValueError as e:
    raise UserError(str(e)) from e


def _check_patch_size(m: ml_collections.ConfigDict) -> None:
  from msca_jax import models
  patch = models.architecture(m)["patch_size"]
  if m.image_size % patch:
    field = ("config.model.patch_size" if m.get("patch_size") is not None
             else f"config.model.variant = {m.variant!r}")
    raise UserError(f"{field}: patch size {patch} does not divide config.model.image_size = "
                    f"{m.image_size}; expected a patch size that divides the frame size")


def _check_batch_sizes(config: ml_collections.ConfigDict, train: bool) -> None:
  fields = [("eval", config.eval.batch_size)] + ([("train", config.train.batch_size)] if train else [])
  for group, size in fields:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise UserError(f"config.{group}.batch_size = {size!r}: expected a positive integer")
  from msca_jax.train import mesh as mesh_lib   # here: loading a config must not import JAX
  _checked(mesh_lib.rules, config.mesh)
  mesh = _checked(mesh_lib.make_mesh, config.mesh)
  for group, size in fields:
    _checked(mesh_lib.check_batch_size, size, mesh, f"config.{group}.batch_size")


def _check_data(d: ml_collections.ConfigDict, splits: tuple[str, ...]) -> None:
  """The data the run reads exists: the path, each split's list or shards, or the cache."""
  import tensorflow as tf
  from msca_jax.data import dmvr, frames, sources

  if d.source not in sources.SOURCES:
    raise UserError(f"config.data.source = {d.source!r}: expected one of {sources.SOURCES}")
  if d.source == "synthetic":
    _check_synthetic_cache(d.synthetic)
    return
  what = {"frames": "the frame-folder root", "dmvr": "the DMVR shard directory",
          "tfds": "the TFDS data_dir"}[d.source]
  if not d.path:
    raise UserError(f"config.data.path is empty: expected {what} (config.data.source = {d.source!r})")
  if not tf.io.gfile.isdir(d.path):
    raise UserError(f"config.data.path = {d.path!r}: no such directory (expected {what})")
  for group in splits:
    split_field, list_field = _SPLIT_FIELDS[group]
    split = d[split_field]
    if d.source == "frames":
      listed = d.get(list_field, "")
      if listed and not tf.io.gfile.exists(listed):
        raise UserError(f"config.data.{list_field} = {listed!r}: no such file")
      if not listed and not tf.io.gfile.exists(frames.list_path(d.path, split)):
        raise UserError(f"config.data.{split_field} = {split!r}: no video list "
                        f"{frames.list_path(d.path, split)} (set config.data.{split_field} to a "
                        f"split that has one, or config.data.{list_field} to the list file)")
    elif d.source == "dmvr":
      try:
        dmvr.list_shards(d.path, split)
      except DataError as e:
        raise UserError(f"config.data.{split_field} = {split!r}: {e}") from e


def _check_flips(d: ml_collections.ConfigDict) -> None:
  """SSv2 names left and right in its classes: a mirrored clip would carry the wrong label."""
  if d.get("dataset", "k400") == "ssv2" and d.flip_prob > 0:
    raise UserError(f"config.data.flip_prob = {d.flip_prob!r}: expected 0 for Something-Something "
                    "v2, whose classes name left and right (docs/datasets.md)")


def _check_synthetic_cache(s: ml_collections.ConfigDict) -> None:
  """The built-in dataset is there already, or its cache directory can be written."""
  root = synthetic.cache_root(s.dir)
  wanted = {k: s[k] for k in ("seed", "train_size", "eval_size", "video_frames", "size")}
  wanted["version"] = synthetic.VERSION
  if os.path.isdir(root):
    for name in os.listdir(root):
      try:
        with open(os.path.join(root, name, "DONE.json")) as f:
          if json.load(f) == wanted:
            return
      except (OSError, ValueError):
        continue
  try:
    os.makedirs(root, exist_ok=True)
    with tempfile.TemporaryFile(dir=root):
      pass
  except OSError as e:
    setting = ("config.data.synthetic.dir" if s.dir else
               "MSCA_JAX_CACHE (or config.data.synthetic.dir)")
    raise UserError(f"cannot write the synthetic dataset to {root} ({e.strerror or e}): set "
                    f"{setting} to a writable directory") from e


def _check_something_to_evaluate(init: ml_collections.ConfigDict, workdir: str) -> None:
  from msca_jax import pretrained
  from msca_jax.train import initialise
  if init.get("weights") or init.vit_npz or init.checkpoint or "://" in workdir:  # remote workdirs: the trainer reads them
    return
  try:
    initialise.step_dir(workdir)
  except pretrained.WeightsError as e:
    raise UserError(f"--mode=evaluate: {workdir} has no finished checkpoint, and config.init names "
                    "no weights (set config.init.weights or config.init.checkpoint)") from e


INIT_SOURCES = ("weights", "vit_npz", "checkpoint")


def _check_init(init: ml_collections.ConfigDict) -> None:
  import tensorflow as tf
  from msca_jax import pretrained
  named = [field for field in INIT_SOURCES if init.get(field)]
  if len(named) > 1:
    raise UserError(f"config.init: set one of {', '.join(INIT_SOURCES)}, not {' and '.join(named)}")
  if init.get("weights_key") and not init.get("weights"):
    raise UserError(f"config.init.weights_key = {init.weights_key!r}: it names an entry of "
                    "config.init.weights, which is not set")
  for field in named:
    if not tf.io.gfile.exists(init[field]):
      raise UserError(f"config.init.{field} = {init[field]!r}: no such file or directory")
  if init.get("weights"):
    if tf.io.gfile.isdir(init.weights):
      raise UserError(f"config.init.weights = {init.weights!r}: a directory; expected a weights "
                      "file (an orbax directory of ours goes in config.init.checkpoint)")
    if not init.weights.endswith(pretrained.WEIGHT_SUFFIXES):
      raise UserError(f"config.init.weights = {init.weights!r}: expected a file ending in "
                      f"{', '.join(pretrained.WEIGHT_SUFFIXES)}")
