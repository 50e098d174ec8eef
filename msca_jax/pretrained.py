"""Pretrained weights: Google ViT .npz files and the reference PyTorch checkpoints.

Both loaders fill a parameter template (the `params` of `model.init`, boxed or
not, or its `jax.eval_shape`) and return a tree of the same structure, so the
result drops into `model.apply({'params': params}, video)`. TokenShift and MSCA
have exactly ViT's parameters, so every loader serves every variant.

    params = load_vit_npz(path, variables['params'])
    params = load_torch_state_dict(torch.load(p, weights_only=True), variables['params'])

Anything that does not fit (a missing key, a shape that differs, a key the
model has no place for) is an error that names the key and both shapes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
import scipy.ndimage
from absl import logging
from flax import traverse_util

POS_EMBEDDING = ("Transformer", "posembed_input", "pos_embedding")
HEAD = "head"


class WeightsError(ValueError):
  """A checkpoint does not fit the model."""


@dataclasses.dataclass
class LoadReport:
  """What a loader did with each parameter."""
  source: str
  loaded: list[str] = dataclasses.field(default_factory=list)
  resized: list[str] = dataclasses.field(default_factory=list)
  zero_initialised: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    lines = [f"weights from {self.source}: {len(self.loaded)} arrays loaded"]
    if self.resized:
      lines.append(f"  resized: {', '.join(self.resized)}")
    if self.zero_initialised:
      lines.append(f"  freshly initialised (zeros): {', '.join(self.zero_initialised)}")
    if self.dropped:
      lines.append(f"  in the checkpoint but not used: {', '.join(self.dropped)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- position embedding

def resize_pos_embedding(posemb: np.ndarray, grid: tuple[int, int],
                         source_grid: tuple[int, int] | None = None) -> np.ndarray:
  """Resamples a (1, 1 + gh*gw, D) position embedding (CLS row first) to a new patch grid.

  Linear interpolation with scipy.ndimage.zoom(order=1), as the reference code does.
  """
  posemb = np.asarray(posemb)
  cls, patches = posemb[:, :1], posemb[0, 1:]
  if source_grid is None:
    side = math.isqrt(patches.shape[0])
    if side * side != patches.shape[0]:
      raise WeightsError(f"cannot infer the patch grid of a position embedding with "
                         f"{patches.shape[0]} patch rows: pass source_grid")
    source_grid = (side, side)
  if source_grid[0] * source_grid[1] != patches.shape[0]:
    raise WeightsError(f"source_grid {source_grid} does not match {patches.shape[0]} patch rows")
  patches = patches.reshape(*source_grid, -1)
  zoom = (grid[0] / source_grid[0], grid[1] / source_grid[1], 1)
  patches = scipy.ndimage.zoom(patches, zoom, order=1)
  return np.concatenate([cls, patches.reshape(1, grid[0] * grid[1], -1)], axis=1).astype(posemb.dtype)


def _target_grid(num_patches: int, grid: tuple[int, int] | None) -> tuple[int, int]:
  if grid is not None:
    return tuple(grid)
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise WeightsError(f"the model's {num_patches} patches are not a square grid: pass grid=(h, w)")
  return side, side


# ----------------------------------------------------------------------------- the assignment core

def _leaf_shape_dtype(leaf) -> tuple[tuple[int, ...], Any]:
  value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
  return tuple(value.shape), value.dtype


def _rebox(leaf, value):
  """`value` in the place of a template leaf, keeping its logical-axis box if it has one."""
  return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value


def fill(template: Mapping[str, Any], source: dict[str, np.ndarray], report: LoadReport, *,
          zero_init: tuple[str, ...] = (), grid: tuple[int, int] | None = None) -> dict:
  """Puts source['a/b/c'] into template['a']['b']['c'] for every template leaf."""
  flat = traverse_util.flatten_dict(dict(template))
  unused = dict(source)
  filled = {}
  for path, leaf in flat.items():
    name = "/".join(path)
    shape, dtype = _leaf_shape_dtype(leaf)
    if path[0] in zero_init:
      value = np.zeros(shape, dtype)
      report.zero_initialised.append(name)
    else:
      if name not in unused:
        raise WeightsError(f"{report.source}: missing parameter {name!r} (expected shape {shape})")
      value = np.asarray(unused.pop(name))
      if path == POS_EMBEDDING and value.shape != shape and value.ndim == 3 \
          and value.shape[2] == shape[2]:
        source_tokens = value.shape[1]
        value = resize_pos_embedding(value, _target_grid(shape[1] - 1, grid))
        report.resized.append(f"{name} ({source_tokens} -> {shape[1]} tokens)")
      if value.shape != shape:
        hint = " (another label set? skip the head: load_head=False)" if path[0] == HEAD else ""
        raise WeightsError(f"{report.source}: parameter {name!r} has shape {value.shape} in the "
                           f"checkpoint, but the model expects {shape}{hint}")
      report.loaded.append(name)
    filled[path] = _rebox(leaf, value.astype(dtype))
  if unused:
    raise WeightsError(f"{report.source}: {len(unused)} checkpoint arrays have no place in the "
                       f"model (wrong depth or architecture?): {sorted(unused)[:10]}")
  return traverse_util.unflatten_dict(filled)


# ----------------------------------------------------------------------------- Google ViT .npz

_BIG_VISION_BLOCK_RENAMES = {
    "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
    "LayerNorm_1": "LayerNorm_2",
    "MlpBlock_0": "MlpBlock_3",
}


def _normalise_google_keys(arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Maps i21k / AugReg / big_vision / opt-target layouts onto our (pre-Linen) names."""
  ignored = []
  if any(k.startswith("opt/target/") for k in arrays):
    ignored += [k for k in arrays if not k.startswith("opt/target/")]
    arrays = {k[len("opt/target/"):]: v for k, v in arrays.items() if k.startswith("opt/target/")}
  if any(k.startswith("params/") for k in arrays):
    ignored += [k for k in arrays if not k.startswith("params/")]
    arrays = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}

  big_vision = "pos_embedding" in arrays or any("MultiHeadDotProductAttention_0" in k for k in arrays)
  out = {}
  for key, value in arrays.items():
    if big_vision:
      if key == "pos_embedding":
        key = "/".join(POS_EMBEDDING)
      parts = key.split("/")
      if len(parts) > 2 and parts[0] == "Transformer" and parts[1].startswith("encoderblock"):
        parts[2] = _BIG_VISION_BLOCK_RENAMES.get(parts[2], parts[2])
      key = "/".join(parts)
    if key.startswith("Transformer/encoderblock/"):
      # Scanned layers (big_vision scan=True) stack the blocks on a leading axis.
      rest = key[len("Transformer/encoderblock/"):]
      for i, block in enumerate(np.asarray(value)):
        out[f"Transformer/encoderblock_{i}/{rest}"] = block
      continue
    out[key] = value
  return out, ignored


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads every array of an .npz, never unpickling."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"ViT checkpoint not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError) as e:
    if "allow_pickle" in str(e):  # numpy's text names the unsafe setting: not repeated to the user
      raise WeightsError(f"{path}: refused: it contains pickled Python objects (object arrays), "
                         "which can run code when loaded; only .npz files of numeric arrays are "
                         "read") from None
    raise WeightsError(f"{path}: not a readable .npz of arrays ({e})") from e


def load_vit_npz(path: str | os.PathLike, params: Mapping[str, Any], *,
                 grid: tuple[int, int] | None = None, with_report: bool = False):
  """Loads a Google ViT checkpoint into `params`; the classification head starts at zero.

  Accepts the original ImageNet-21k files, AugReg files, big_vision files
  (params/ prefix, Linen counters, scanned or not) and opt/target/ files. The
  21k head and pre_logits are dropped. A position embedding for another
  resolution is resampled to the model's patch grid (`grid`, default square).
  """
  arrays, ignored = _normalise_google_keys(read_npz(path))
  report = LoadReport(source=os.fspath(path), dropped=ignored)
  for key in sorted(arrays):
    if key.split("/")[0] in ("pre_logits", HEAD):
      report.dropped.append(key)
      del arrays[key]
  params = fill(params, arrays, report, zero_init=(HEAD,), grid=grid)
  logging.info("%s", report.summary())
  return (params, report) if with_report else params


# ----------------------------------------------------------------------------- PyTorch (TokShift / MSCA)

_TORCH_FIXED = {
    "transformer.embeddings.cls_token": ("cls", "identity"),
    "transformer.embeddings.position_embeddings": ("Transformer/posembed_input/pos_embedding", "identity"),
    "transformer.embeddings.patch_embeddings.weight": ("embedding/kernel", "conv"),
    "transformer.embeddings.patch_embeddings.bias": ("embedding/bias", "identity"),
    "transformer.encoder.encoder_norm.weight": ("Transformer/encoder_norm/scale", "identity"),
    "transformer.encoder.encoder_norm.bias": ("Transformer/encoder_norm/bias", "identity"),
    "head.weight": ("head/kernel", "linear"),
    "head.bias": ("head/bias", "identity"),
}
_TORCH_BLOCK = {
    "attention_norm.weight": ("LayerNorm_0/scale", "identity"),
    "attention_norm.bias": ("LayerNorm_0/bias", "identity"),
    "ffn_norm.weight": ("LayerNorm_2/scale", "identity"),
    "ffn_norm.bias": ("LayerNorm_2/bias", "identity"),
    **{f"attn.{proj}.{torch_name}": (f"MultiHeadDotProductAttention_1/{proj}/{name}", kind)
       for proj in ("query", "key", "value")
       for torch_name, name, kind in (("weight", "kernel", "qkv"), ("bias", "bias", "heads"))},
    "attn.out.weight": ("MultiHeadDotProductAttention_1/out/kernel", "out"),
    "attn.out.bias": ("MultiHeadDotProductAttention_1/out/bias", "identity"),
    "ffn.fc1.weight": ("MlpBlock_3/Dense_0/kernel", "linear"),
    "ffn.fc1.bias": ("MlpBlock_3/Dense_0/bias", "identity"),
    "ffn.fc2.weight": ("MlpBlock_3/Dense_1/kernel", "linear"),
    "ffn.fc2.bias": ("MlpBlock_3/Dense_1/bias", "identity"),
}
_TORCH_BLOCK_KEY = re.compile(r"transformer\.encoder\.layer\.(\d+)\.(.+)")
_TORCH_PREFIXES = ("module.", "base_model.")


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch.Tensor; torch itself is never imported here
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def unwrap_torch_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{'state_dict': {...}} or a bare state dict, 'module.'/'base_model.' prefixes removed."""
  if not isinstance(checkpoint, Mapping):
    raise WeightsError(f"expected a state dict (a mapping), got {type(checkpoint).__name__}")
  if "state_dict" in checkpoint and isinstance(checkpoint["state_dict"], Mapping):
    checkpoint = checkpoint["state_dict"]
  state = {}
  for key, value in checkpoint.items():
    stripped = True
    while stripped:
      stripped = False
      for prefix in _TORCH_PREFIXES:
        if key.startswith(prefix):
          key, stripped = key[len(prefix):], True
    state[key] = _to_numpy(value)
  return state


def _convert_torch(key: str, value: np.ndarray, kind: str, num_heads: int) -> np.ndarray:
  if kind == "identity":
    return value
  if value.ndim != {"conv": 4, "heads": 1}.get(kind, 2):
    raise WeightsError(f"state dict entry {key!r} has shape {value.shape}, which is not a "
                       f"{'conv' if kind == 'conv' else 'linear'} parameter")
  if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
    return value.transpose(2, 3, 1, 0)
  if kind == "linear":  # (out, in) -> (in, out)
    return value.T
  if kind == "heads":  # (heads * head_dim,) -> (heads, head_dim), head h = channels [h*d, (h+1)*d)
    return value.reshape(num_heads, -1)
  if kind == "qkv":  # (heads * head_dim, in) -> (in, heads, head_dim)
    return value.T.reshape(value.shape[1], num_heads, -1)
  if kind == "out":  # (out, heads * head_dim) -> (heads, head_dim, out)
    return value.T.reshape(num_heads, -1, value.shape[0])
  raise AssertionError(kind)


def load_torch_state_dict(state_dict: Mapping[str, Any], params: Mapping[str, Any], *,
                          load_head: bool = True, grid: tuple[int, int] | None = None,
                          source: str = "PyTorch state dict", with_report: bool = False):
  """Loads a TokShift / MSCA PyTorch state dict (docs/weights.md) into `params`.

  Takes torch tensors or numpy arrays, with or without the 'state_dict'
  wrapper and the 'module.' / 'base_model.' prefixes. With load_head=False the
  head is left at zero (fine-tuning to another label set).
  """
  state = unwrap_torch_checkpoint(state_dict)
  heads_shape, _ = _leaf_shape_dtype(
      params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["bias"])
  num_heads = heads_shape[0]
  report = LoadReport(source=source)
  converted = {}
  for key, value in state.items():
    match = _TORCH_BLOCK_KEY.fullmatch(key)
    if key in _TORCH_FIXED:
      name, kind = _TORCH_FIXED[key]
    elif match and match.group(2) in _TORCH_BLOCK:
      name, kind = _TORCH_BLOCK[match.group(2)]
      name = f"Transformer/encoderblock_{match.group(1)}/{name}"
    else:
      raise WeightsError(f"{source}: unexpected state dict entry {key!r}: not part of the "
                         "reference ViT/TokenShift/MSCA layout (docs/weights.md)")
    if name.startswith(HEAD + "/") and not load_head:
      report.dropped.append(key)
      continue
    converted[name] = _convert_torch(key, value, kind, num_heads)
  params = fill(params, converted, report, zero_init=() if load_head else (HEAD,), grid=grid)
  logging.info("%s", report.summary())
  return (params, report) if with_report else params


# ----------------------------------------------------------------------------- our own params checkpoints

def _params_manager(directory: str | os.PathLike, *, for_reading: bool):
  import orbax.checkpoint as ocp  # heavy import, only where checkpoints are used
  directory = os.path.abspath(os.fspath(directory))
  if for_reading and not os.path.isdir(directory):  # checked first: the manager would create it
    raise FileNotFoundError(f"params checkpoint not found: {directory}")
  return ocp, ocp.CheckpointManager(directory, item_names=("params", "metadata"))


def _latest_step(manager, directory) -> int:
  step = manager.latest_step()
  if step is None:
    raise WeightsError(f"{directory}: no finished checkpoint in this directory")
  return step


def save_params(directory: str | os.PathLike, params: Mapping[str, Any],
                metadata: Mapping[str, Any] | None = None) -> str:
  """Writes params (and JSON metadata) as an orbax checkpoint at step 0 of `directory`."""
  ocp, manager = _params_manager(directory, for_reading=False)
  with manager:
    manager.save(0, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nn.meta.unbox(params)),
        metadata=ocp.args.JsonSave(dict(metadata or {}))), force=True)
    manager.wait_until_finished()
  return os.path.abspath(os.fspath(directory))


def restore_params(directory: str | os.PathLike, params: Mapping[str, Any]):
  """Restores params written by `save_params` into the structure (and shardings) of `params`.

  `params` may be concrete arrays or jax.ShapeDtypeStruct leaves carrying the
  target shardings; boxed (logically partitioned) leaves stay boxed.
  """
  ocp, manager = _params_manager(directory, for_reading=True)
  with manager:
    step = _latest_step(manager, directory)
    target = jax.tree.map(
        lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None)), nn.meta.unbox(params))
    restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return jax.tree.map(_rebox, dict(params), restored["params"],
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def read_params_metadata(directory: str | os.PathLike) -> dict:
  ocp, manager = _params_manager(directory, for_reading=True)
  with manager:
    step = _latest_step(manager, directory)
    return dict(manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"])
