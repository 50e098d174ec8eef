"""Initial weights for a training run (config.init), with a report of what came from where.

  config.init.weights      any file pretrained.load reads: .npz, .safetensors, .bin / .pth, in the
                           Google, reference, transformers, timm or CLIP layouts (docs/weights.md).
  config.init.vit_npz      a Google ViT .npz (ImageNet-21k, AugReg, big_vision): every tensor but
                           the head; the head starts at zero.
  config.init.checkpoint   an orbax directory of ours: the output of tools.convert_torch (a
                           converted TokShift/MSCA PyTorch checkpoint), or a training workdir (or
                           its checkpoints/ or one step of it), whose latest parameters are taken.
  config.init.load_head    False leaves the head at zero (fine-tuning to another label set).
  config.init.weights_key  the entry of a training checkpoint in config.init.weights to load ('':
                           the first of pretrained.STATE_DICT_KEYS it holds, EMA weights first).

Only parameters are taken; the optimiser starts fresh. Resuming an interrupted run is not this:
the trainer resumes from its own workdir automatically, optimiser and data stream included.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from msca_jax import pretrained
from msca_jax.train import checkpoint

HEAD_OPTION = "config.init.load_head=False"  # how a run skips a checkpoint's head
# Items that hold parameters: 'params' in params checkpoints, 'state' (TrainState) in training ones.
_PARAMS_ITEMS = ("params", "state")


def step_dir(directory: str) -> str:
  """The step directory to read: `directory` itself, or the latest step under it (or checkpoints/)."""
  if any(os.path.isdir(os.path.join(directory, item)) for item in _PARAMS_ITEMS):
    return directory
  for root in (directory, os.path.join(directory, "checkpoints")):
    if not os.path.isdir(root):
      continue
    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    manager.close()
    if step is not None:
      return os.path.join(root, str(step))
  raise pretrained.WeightsError(
      f"config.init.checkpoint={directory}: no finished checkpoint there; expected the output of "
      "msca_jax.tools.convert_torch, a training workdir, its checkpoints/ or one of its steps")


def with_older_intact_step(error: checkpoint.DamagedCheckpointError) -> checkpoint.DamagedCheckpointError:
  """The error of a damaged latest step, naming the newest intact step before it: readers never
  pick another step themselves (predictions from older weights must be asked for), nor move it."""
  return checkpoint.DamagedCheckpointError(error.path, error.file,
                                           error.why + _older_intact_step(error.path))


def _older_intact_step(damaged: str) -> str:
  root, step = os.path.split(damaged)
  older = sorted((int(name) for name in os.listdir(root) if name.isdigit() and int(name) < int(step)),
                 reverse=True)
  for candidate in older:
    path = os.path.join(root, str(candidate))
    try:
      checkpoint.verify_step(path)
    except checkpoint.DamagedCheckpointError:
      continue
    return f"; the newest intact step is {path}: name it to read that one"
  return "; no older step is intact"


def read_checkpoint_params(directory: str) -> dict[str, np.ndarray]:
  """{'Transformer/encoderblock_0/...': array} from one of our orbax checkpoints, as numpy.

  Read without a target, so the checkpoint may come from any mesh and any device count. A step
  with digests (checkpoint.DIGESTS) is verified first.
  """
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.init.checkpoint: {directory} does not exist")
  found = step_dir(directory)
  try:
    checkpoint.verify_step(found)
  except checkpoint.DamagedCheckpointError as e:
    if found == directory:   # the step was named: that step or nothing
      raise
    raise with_older_intact_step(e) from None
  item = next(i for i in _PARAMS_ITEMS if os.path.isdir(os.path.join(found, i)))
  path = os.path.join(found, item)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  if item == "state":
    if "params" not in tree:
      raise pretrained.WeightsError(f"{path}: a train state without 'params' (has {sorted(tree)})")
    tree = {"params": tree["params"]}
  as_numpy = ocp.RestoreArgs(restore_type=np.ndarray)
  restore_args = traverse_util.unflatten_dict(
      {k: as_numpy for k in traverse_util.flatten_dict(tree)})
  # A partial restore needs the target tree: without one orbax restores (and checks) everything.
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args, partial_restore=item == "state"))
  params = restored["params"] if item == "state" else restored
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def source_of(init_cfg) -> tuple[str | None, int | None]:
  """(what config.init loads, the training step of those weights): the step directory and its
  step for a training checkpoint of ours, the file or directory with None otherwise (a weights
  file, a converted params checkpoint); (None, None) for a random start."""
  for field in ("weights", "vit_npz"):
    if init_cfg.get(field):
      return os.path.abspath(init_cfg[field]), None
  if not init_cfg.get("checkpoint"):
    return None, None
  try:
    found = step_dir(init_cfg["checkpoint"])
  except pretrained.WeightsError:  # initial_params says why
    return os.path.abspath(init_cfg["checkpoint"]), None
  trained = os.path.isdir(os.path.join(found, "state")) and os.path.basename(found).isdigit()
  return os.path.abspath(found), int(os.path.basename(found)) if trained else None


def initial_params(init_cfg, params_template: Any) -> tuple[Any, pretrained.LoadReport] | None:
  """(params in the template's structure and boxes, report), or None for a random start.

  `params_template` is the model's (abstract, boxed) params; the result holds numpy arrays.
  """
  vit_npz, checkpoint, load_head = init_cfg["vit_npz"], init_cfg["checkpoint"], init_cfg["load_head"]
  weights = init_cfg.get("weights") or ""  # absent from configs saved before it existed
  if sum(map(bool, (weights, vit_npz, checkpoint))) > 1:
    raise ValueError("config.init: set one of weights, vit_npz or checkpoint")
  if weights:
    if not os.path.isfile(weights):
      raise FileNotFoundError(f"config.init.weights: {weights} does not exist")
    return pretrained.load(weights, params_template, load_head=load_head, with_report=True,
                           key=init_cfg.get("weights_key") or "", head_option=HEAD_OPTION)
  if vit_npz:
    if not os.path.isfile(vit_npz):
      raise FileNotFoundError(f"config.init.vit_npz: {vit_npz} does not exist")
    return pretrained.load_vit_npz(vit_npz, params_template, with_report=True)
  if checkpoint:
    arrays = read_checkpoint_params(checkpoint)
    report = pretrained.LoadReport(source=os.path.abspath(checkpoint))
    zero_init = () if load_head else (pretrained.HEAD,)
    if not load_head:
      report.dropped.extend(k for k in sorted(arrays) if k.startswith(pretrained.HEAD + "/"))
      arrays = {k: v for k, v in arrays.items() if not k.startswith(pretrained.HEAD + "/")}
    params = pretrained.fill(params_template, arrays, report, zero_init=zero_init,
                             head_option=HEAD_OPTION)
    return params, report
  return None
