"""Pretrained weights: one entry, `load`, for every file and layout we read (docs/weights.md).

    params, report = load(path_or_state_dict, variables['params'], with_report=True)

Files: .npz (numpy, never unpickled), .safetensors (read without torch) and .bin / .pth / .pt
(torch.load(weights_only=True); needs torch). Layouts, detected from the keys: Google's ViT,
the TokShift / MSCA reference state dict, transformers' ViTModel / ViTForImageClassification,
timm's VisionTransformer, OpenAI CLIP / open_clip's visual tower and transformers'
CLIPVisionModel (the CLIP ones need config.model.backbone='clip').

Every loader fills a parameter template (the `params` of `model.init`, boxed or
not, or its `jax.eval_shape`) and returns a tree of the same structure, so the
result drops into `model.apply({'params': params}, video)`. TokenShift and MSCA
have exactly ViT's parameters, so every loader serves every variant.
`load_vit_npz` and `load_torch_state_dict` are the two original layouts' loaders.

Anything that does not fit (a missing key, a shape that differs, a key the
model has no place for) is an error that names the key and both shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import re
import struct
import warnings
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

  # The entry of a wrapped checkpoint ({'state_dict_ema': ..., ...}) that was loaded; '' for a bare one.
  entry: str = ""

  def summary(self) -> str:
    entry = f", entry {self.entry!r}{' (its EMA weights)' if 'ema' in self.entry else ''}" if self.entry else ""
    lines = [f"weights from {self.source}{entry}: {len(self.loaded)} arrays loaded"]
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
          zero_init: tuple[str, ...] = (), grid: tuple[int, int] | None = None,
          head_option: str = "load_head=False") -> dict:
  """Puts source['a/b/c'] into template['a']['b']['c'] for every template leaf.

  `head_option` is how the caller's user skips the checkpoint's head (the flag or field of the
  entry point: '--no_head', 'config.init.load_head=False'), named when the head does not fit.
  """
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
        hint = f" (another label set? skip the head: {head_option})" if path[0] == HEAD else ""
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


# The entries a training checkpoint keeps its weights under, in the order they are taken when no
# key is named: timm's (its train script saves 'state_dict' and, with --model-ema,
# 'state_dict_ema'; timm's own loader prefers the EMA weights), DeiT / MAE / VideoMAE's 'model'
# and 'model_ema', DeepSpeed's 'module'. docs/weights.md#wrapped-training-checkpoints.
STATE_DICT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
KEY_OPTIONS = "--checkpoint_key for convert_torch, config.init.weights_key for training"


def _is_tensor(value) -> bool:
  return (hasattr(value, "detach") or isinstance(value, np.ndarray)) and \
      getattr(value, "dtype", None) != object


def select_state_dict(checkpoint: Any, key: str = "", name: str = "state dict") -> tuple[Mapping, str]:
  """(the state dict in a checkpoint, the entry it was taken from: '' for a bare state dict).

  A mapping of tensors is a state dict as it is. Otherwise it is a training checkpoint, and the
  state dict is its entry `key`, or by default the first of STATE_DICT_KEYS it holds (EMA weights
  when there are any). Raises WeightsError naming the entry (and what the checkpoint holds) when
  the result is not a mapping of tensors.
  """
  if not isinstance(checkpoint, Mapping):
    raise WeightsError(f"{name}: not a plain state dict of tensors: expected a state dict (a "
                       f"mapping), got {type(checkpoint).__name__}")
  holds = lambda: ", ".join(f"{k!r} ({'tensor' if _is_tensor(v) else type(v).__name__})"
                            for k, v in list(checkpoint.items())[:8]) + (
                                " ..." if len(checkpoint) > 8 else "")
  if key:
    if key not in checkpoint:
      raise WeightsError(f"{name}: no entry {key!r} to load (it holds {holds()})")
    entry = key
  elif all(_is_tensor(v) for v in checkpoint.values()):
    return checkpoint, ""
  else:
    entry = next((k for k in STATE_DICT_KEYS if isinstance(checkpoint.get(k), Mapping)), "")
  state = checkpoint[entry] if entry else checkpoint
  if not isinstance(state, Mapping):
    raise WeightsError(f"{name}: entry {entry!r} is a {type(state).__name__}, not a state dict")
  for k, value in state.items():
    if _is_tensor(value):
      continue
    if entry:
      raise WeightsError(f"{name}: not a plain state dict of tensors: entry {entry!r} holds {k!r}, "
                         f"a {type(value).__name__}, not a tensor")
    raise WeightsError(
        f"{name}: not a plain state dict of tensors: entry {k!r} is a {type(value).__name__}, not "
        f"a tensor, and it has none of the entries a training checkpoint keeps its weights under "
        f"({', '.join(map(repr, STATE_DICT_KEYS))}): name one with {KEY_OPTIONS} (it holds {holds()})")
  return state, entry


def unwrap_torch_checkpoint(checkpoint: Mapping[str, Any], key: str = "") -> dict[str, np.ndarray]:
  """A state dict or training checkpoint's (select_state_dict), 'module.'/'base_model.' prefixes
  removed, as numpy."""
  checkpoint, _ = select_state_dict(checkpoint, key)
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
                          source: str = "PyTorch state dict", with_report: bool = False,
                          head_option: str = "load_head=False"):
  """Loads a TokShift / MSCA PyTorch state dict (docs/weights.md) into `params`.

  Takes torch tensors or numpy arrays, with or without the 'state_dict'
  wrapper and the 'module.' / 'base_model.' prefixes. With load_head=False the
  head is left at zero (fine-tuning to another label set).
  """
  state = unwrap_torch_checkpoint(state_dict)
  report = LoadReport(source=source)
  converted = _convert_reference(state, _num_heads(params), source)
  if not load_head:
    report.dropped.extend(k for k in sorted(state) if k.startswith(HEAD + "."))
    converted = {k: v for k, v in converted.items() if not k.startswith(HEAD + "/")}
  params = fill(params, converted, report, zero_init=() if load_head else (HEAD,), grid=grid,
                head_option=head_option)
  logging.info("%s", report.summary())
  return (params, report) if with_report else params


def _num_heads(params: Mapping[str, Any]) -> int:
  heads_shape, _ = _leaf_shape_dtype(
      params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["bias"])
  return heads_shape[0]


def _convert_reference(state: dict[str, np.ndarray], num_heads: int, source: str) -> dict[str, np.ndarray]:
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
    converted[name] = _convert_torch(key, value, kind, num_heads)
  return converted


# ----------------------------------------------------------------------------- files

NPZ_SUFFIXES = (".npz",)
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".tar")
WEIGHT_SUFFIXES = NPZ_SUFFIXES + SAFETENSORS_SUFFIXES + TORCH_SUFFIXES


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file as numpy (bfloat16 as float32), without torch."""
  from safetensors import SafetensorError  # pylint: disable=no-name-in-module
  from safetensors.numpy import load_file

  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"weights file not found: {path}")
  try:
    return load_file(path)
  except SafetensorError as e:
    raise WeightsError(f"{path}: not a readable .safetensors file ({_first_line(e)}; truncated "
                       "or not safetensors?)") from None
  except TypeError:  # numpy has no bfloat16: the file is valid, read it ourselves
    return _read_safetensors_bfloat16(path)


def _read_safetensors_bfloat16(path: str) -> dict[str, np.ndarray]:
  """The safetensors format by hand (8-byte header length, JSON header, raw little-endian data)."""
  import ml_dtypes  # a dependency of jax
  dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
            "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
            "BOOL": np.bool_}
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(length))
    data = f.read()
  out = {}
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    if entry["dtype"] not in dtypes:
      raise WeightsError(f"{path}: tensor {key!r} has dtype {entry['dtype']}, which is not read")
    start, end = entry["data_offsets"]
    value = np.frombuffer(data[start:end], dtypes[entry["dtype"]]).reshape(entry["shape"])
    out[key] = value.astype(np.float32) if entry["dtype"] == "BF16" else value.copy()
  return out


def _torch_refusal(path: str, error: Exception, verb: str = "read") -> WeightsError:
  """Why a torch file is not read, without torch's advice to load it unsafely."""
  text = str(error)
  if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
      reason = f"it contains pickled Python objects ({found.group(1)}), which can run code when loaded"
    else:
      stop = re.search(r"Unsupported [^\n.]*", text)
      reason = ("it holds pickled Python objects (code) or is not a PyTorch checkpoint (the "
                f"tensors-only loader stopped at: {stop.group(0) if stop else type(error).__name__})")
    return WeightsError(f"{path}: refused: {reason}; only checkpoints of tensors, which "
                        f"torch.load(weights_only=True) reads, are {verb}")
  first = " ".join(text.splitlines()[0].split()) if text.strip() else ""
  return WeightsError(f"{path}: not a PyTorch checkpoint of tensors ({type(error).__name__}: {first})")


def read_torch(path: str | os.PathLike, verb: str = "read") -> Any:
  """torch.load(path, weights_only=True) on the CPU: tensors and plain containers only."""
  path = os.fspath(path)
  try:
    import torch  # optional dependency (the parity extra): only .bin / .pth files need it
  except ImportError:
    raise WeightsError(f"{path}: reading a PyTorch file (.bin / .pth) needs PyTorch, which is not "
                       "installed: install the parity extra (pip install -e '.[parity]') or torch, "
                       "or use the model's .safetensors file") from None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {path}")
  try:
    # argparse.Namespace: the 'args' that timm's, DeiT's and MAE's train scripts save beside the
    # weights. Unpickling one only sets attributes: no code of the file's choosing runs. (A torch
    # without safe_globals refuses such files, naming the class.)
    safe_globals = getattr(getattr(torch, "serialization", None), "safe_globals", None)
    allowed = safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()
    with warnings.catch_warnings(), allowed:
      warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused anyway
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a bad or pickled file
    raise _torch_refusal(path, e, verb) from None  # from None: torch's advice must not be shown


def read_weights(path: str | os.PathLike) -> Any:
  """A weights file's contents by its suffix: a dict of arrays (or torch's loaded object)."""
  path = os.fspath(path)
  if path.endswith(NPZ_SUFFIXES):
    return read_npz(path)
  if path.endswith(SAFETENSORS_SUFFIXES):
    return read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch(path)
  raise WeightsError(f"{path}: unknown weights file type; expected a name ending in "
                     f"{', '.join(WEIGHT_SUFFIXES)}")


# ----------------------------------------------------------------------------- layouts

# name -> what the error messages call it.
LAYOUTS = {
    "google": "Google ViT .npz",
    "reference": "TokShift / MSCA reference state dict",
    "hf_vit": "transformers ViTModel / ViTForImageClassification",
    "timm": "timm VisionTransformer",
    "clip": "OpenAI CLIP / open_clip visual tower",
    "hf_clip": "transformers CLIPVisionModel",
}
CLIP_LAYOUTS = ("clip", "hf_clip")


def detect_layout(keys) -> str:
  """The LAYOUTS name of a state dict's (prefix-free) keys; WeightsError when none fits."""
  keys = set(keys)
  if any("/" in k for k in keys):
    return "google"
  if "transformer.embeddings.cls_token" in keys:
    return "reference"
  if {"class_embedding", "visual.class_embedding"} & keys:
    return "clip"
  if {"embeddings.class_embedding", "vision_model.embeddings.class_embedding"} & keys:
    return "hf_clip"
  if {"embeddings.cls_token", "vit.embeddings.cls_token"} & keys:
    return "hf_vit"
  if {"cls_token", "pos_embed"} <= keys:
    return "timm"
  raise WeightsError(f"unknown weights layout: expected one of {', '.join(LAYOUTS.values())}; "
                     f"the first keys are {sorted(keys)[:8]}")


_LN = {"weight": "scale", "bias": "bias"}
_BLOCK = "Transformer/encoderblock_{0}/"
_ATTN = _BLOCK + "MultiHeadDotProductAttention_1/"
_QKV = {"q": "query", "k": "key", "v": "value", "query": "query", "key": "key", "value": "value"}


def _layer_norm_rules(pattern: str, target: str) -> list[tuple[str, str, str]]:
  return [(pattern + rf"\.{torch_name}", f"{target}/{name}", "identity") for torch_name, name in _LN.items()]


def _dense_rules(pattern: str, target: str, weight_kind: str = "linear",
                 bias_kind: str = "identity") -> list[tuple[str, str, str]]:
  return [(pattern + r"\.weight", target + "/kernel", weight_kind),
          (pattern + r"\.bias", target + "/bias", bias_kind)]


def _block_rules(prefix: str, *, ln0: str, ln2: str, fc1: str, fc2: str,
                 out: str) -> list[tuple[str, str, str]]:
  """The per-block rules shared by every torch layout; `prefix` captures the block index."""
  return (_layer_norm_rules(prefix + ln0, _BLOCK + "LayerNorm_0")
          + _layer_norm_rules(prefix + ln2, _BLOCK + "LayerNorm_2")
          + _dense_rules(prefix + fc1, _BLOCK + "MlpBlock_3/Dense_0")
          + _dense_rules(prefix + fc2, _BLOCK + "MlpBlock_3/Dense_1")
          + _dense_rules(prefix + out, _ATTN + "out", "out"))


# (regex over the key, our name (str.format of the regex groups; None: dropped), kind).
_RULES: dict[str, list[tuple[str, str | None, str]]] = {
    "hf_vit": [
        (r"embeddings\.cls_token", "cls", "identity"),
        (r"embeddings\.position_embeddings", "/".join(POS_EMBEDDING), "identity"),
        *_dense_rules(r"embeddings\.patch_embeddings\.projection", "embedding", "conv"),
        # transformers 4.x names (the files on the Hub) and 5.x names.
        *_block_rules(r"(?:encoder\.layer|layers)\.(\d+)\.", ln0="layernorm_before",
                      ln2="layernorm_after", fc1=r"(?:intermediate\.dense|mlp\.fc1)",
                      fc2=r"(?:output\.dense|mlp\.fc2)",
                      out=r"(?:attention\.output\.dense|attention\.o_proj)"),
        *_dense_rules(r"(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q|k|v)(?:_proj)?",
                      _ATTN + "{1}", "qkv", "heads"),
        *_layer_norm_rules(r"layernorm", "Transformer/encoder_norm"),
        (r"pooler\.dense\.(?:weight|bias)", None, "identity"),
        (r"classifier\.(?:weight|bias)", None, "identity"),
    ],
    "timm": [
        (r"cls_token", "cls", "identity"),
        (r"pos_embed", "/".join(POS_EMBEDDING), "identity"),
        *_dense_rules(r"patch_embed\.proj", "embedding", "conv"),
        *_block_rules(r"blocks\.(\d+)\.", ln0="norm1", ln2="norm2", fc1=r"mlp\.fc1", fc2=r"mlp\.fc2",
                      out=r"attn\.proj"),
        *_dense_rules(r"blocks\.(\d+)\.attn\.qkv", _ATTN + "{qkv}", "fused_qkv", "fused_heads"),
        *_layer_norm_rules(r"norm_pre", "Transformer/pre_norm"),
        *_layer_norm_rules(r"norm", "Transformer/encoder_norm"),
        (r"head\.(?:weight|bias)", None, "identity"),
        (r"pre_logits\.fc\.(?:weight|bias)", None, "identity"),
    ],
    "clip": [
        (r"class_embedding", "cls", "cls"),
        (r"positional_embedding", "/".join(POS_EMBEDDING), "pos"),
        (r"conv1\.weight", "embedding/kernel", "conv"),
        *_layer_norm_rules(r"ln_pre", "Transformer/pre_norm"),
        *_block_rules(r"transformer\.resblocks\.(\d+)\.", ln0="ln_1", ln2="ln_2", fc1=r"mlp\.c_fc",
                      fc2=r"mlp\.c_proj", out=r"attn\.out_proj"),
        (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", _ATTN + "{qkv}/kernel", "fused_qkv"),
        (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_bias", _ATTN + "{qkv}/bias", "fused_heads"),
        *_layer_norm_rules(r"ln_post", "Transformer/encoder_norm"),
        (r"proj", "proj/kernel", "identity"),  # stored (width, output dim): used as x @ proj
    ],
    "hf_clip": [
        (r"embeddings\.class_embedding", "cls", "cls"),
        (r"embeddings\.position_embedding\.weight", "/".join(POS_EMBEDDING), "pos"),
        (r"embeddings\.patch_embedding\.weight", "embedding/kernel", "conv"),
        (r"embeddings\.position_ids", None, "identity"),
        *_layer_norm_rules(r"pre_layrnorm", "Transformer/pre_norm"),  # sic: transformers' spelling
        *_block_rules(r"encoder\.layers\.(\d+)\.", ln0="layer_norm1", ln2="layer_norm2",
                      fc1=r"mlp\.fc1", fc2=r"mlp\.fc2", out=r"self_attn\.out_proj"),
        *_dense_rules(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj", _ATTN + "{1}", "qkv", "heads"),
        *_layer_norm_rules(r"post_layernorm", "Transformer/encoder_norm"),
        (r"visual_projection\.weight", "proj/kernel", "linear"),
    ],
}
_COMPILED = {layout: [(re.compile(p), t, k) for p, t, k in rules] for layout, rules in _RULES.items()}

# Prefixes of whole models around the tower we read, and the other towers' keys, dropped.
_STRIP = {"hf_vit": ("vit.",), "hf_clip": ("vision_model.",), "clip": ("visual.",)}
_OTHER_TOWERS = {
    "hf_clip": re.compile(r"text_model\..*|text_projection\.weight|logit_scale"),
}


def _convert_rules(state: dict[str, np.ndarray], layout: str, num_heads: int,
                   source: str) -> tuple[dict[str, np.ndarray], list[str]]:
  """(our names -> arrays, keys dropped) for one of the _RULES layouts."""
  dropped = []
  if layout == "clip" and any(k.startswith("visual.") for k in state):  # a whole CLIP: the visual tower
    dropped = sorted(k for k in state if not k.startswith("visual."))
    state = {k: v for k, v in state.items() if k.startswith("visual.")}
  converted = {}
  for key, value in state.items():
    if layout in _OTHER_TOWERS and _OTHER_TOWERS[layout].fullmatch(key):
      dropped.append(key)
      continue
    short = key
    for prefix in _STRIP.get(layout, ()):
      short = short[len(prefix):] if short.startswith(prefix) else short
    for pattern, target, kind in _COMPILED[layout]:
      match = pattern.fullmatch(short)
      if match:
        break
    else:
      raise WeightsError(f"{source}: unexpected entry {key!r} for the {LAYOUTS[layout]} layout "
                         "(docs/weights.md): a model part we do not have")
    if target is None:
      dropped.append(key)
      continue
    groups = [_QKV.get(g, g) for g in match.groups()]
    value = np.asarray(value)
    if kind.startswith("fused_"):  # one (3 * width, ...) tensor holds query, key and value
      if value.shape[0] % 3:
        raise WeightsError(f"{source}: {key!r} has shape {value.shape}; expected 3 * width rows")
      for name, part in zip(("query", "key", "value"), np.split(value, 3)):
        converted[target.format(*groups, qkv=name)] = _convert_torch(key, part, kind[6:], num_heads)
      continue
    name = target.format(*groups)
    if kind == "cls":  # (width,) -> (1, 1, width)
      value = value.reshape(1, 1, -1)
    elif kind == "pos":  # (tokens, width) -> (1, tokens, width)
      value = value[None] if value.ndim == 2 else value
    else:
      value = _convert_torch(key, value, kind, num_heads)
    converted[name] = value
  return converted, dropped


def _backbone(params: Mapping[str, Any]) -> str:
  return "clip" if "pre_norm" in params.get("Transformer", {}) else "vit"


def load(source: str | os.PathLike | Mapping[str, Any], params: Mapping[str, Any], *,
         load_head: bool = True, grid: tuple[int, int] | None = None, name: str | None = None,
         with_report: bool = False, key: str = "", head_option: str = "load_head=False"):
  """Loads a weights file or state dict of any known layout (LAYOUTS) into `params`.

  `source` is a path (.npz, .safetensors, .bin / .pth) or an already loaded state dict. The
  image-pretrained layouts (all but the reference's) never bring a head: it starts at zero and
  their classifier, pooler or pre_logits are dropped; the reference's head is loaded unless
  load_head=False. CLIP's `proj` is loaded when the model has one (config.model.proj_dim) and
  dropped otherwise. A position embedding for another resolution is resampled (`grid`).
  A training checkpoint (a mapping whose entries are not all tensors) gives the state dict of
  its entry `key`, or by default the first of STATE_DICT_KEYS it holds (select_state_dict); the
  report's `entry` names it. `head_option` names how the caller's user skips a head that does
  not fit (see `fill`).
  """
  if isinstance(source, (str, os.PathLike)):
    name = name or os.fspath(source)
    contents = read_weights(source)
  else:
    name, contents = name or "state dict", source
  entry = ""
  if isinstance(contents, Mapping) and any("/" in str(k) for k in contents) and not key:
    state = dict(contents)  # a Google .npz: keys are paths ('cls' has none), values numpy
  else:
    contents, entry = select_state_dict(contents, key, name)
    state = unwrap_torch_checkpoint(contents)
  try:
    layout = detect_layout(state)
  except WeightsError as e:
    raise WeightsError(f"{name}: {e}") from None

  model_backbone = _backbone(params)
  clip_weights = layout in CLIP_LAYOUTS or (layout == "timm" and "norm_pre.weight" in state)
  if clip_weights and model_backbone != "clip":
    raise WeightsError(
        f"{name}: a CLIP checkpoint ({LAYOUTS[layout]}), but config.model.backbone is 'vit': use "
        "the clip config argument (e.g. --config=configs/msca_kv.py:clip), which sets the backbone, "
        "its sizes, eps, activation and CLIP's pixel mean and std")
  if not clip_weights and model_backbone == "clip":
    raise WeightsError(
        f"{name}: a ViT checkpoint ({LAYOUTS[layout]}) without CLIP's ln_pre, but "
        "config.model.backbone is 'clip': drop the clip config argument (backbone 'vit')")

  if layout == "google":
    arrays, ignored = _normalise_google_keys(state)
    report = LoadReport(source=name, dropped=ignored)
    for key in sorted(arrays):
      if key.split("/")[0] in ("pre_logits", HEAD):
        report.dropped.append(key)
        del arrays[key]
    zero_init = (HEAD,)
  elif layout == "reference":
    arrays = _convert_reference(state, _num_heads(params), name)
    report = LoadReport(source=name)
    zero_init = () if load_head else (HEAD,)
    if not load_head:
      report.dropped.extend(k for k in sorted(state) if k.startswith(HEAD + "."))
      arrays = {k: v for k, v in arrays.items() if not k.startswith(HEAD + "/")}
  else:
    arrays, dropped = _convert_rules(state, layout, _num_heads(params), name)
    report = LoadReport(source=name, dropped=dropped)
    zero_init = (HEAD,)
  if "proj/kernel" in arrays and "proj" not in params:
    report.dropped.append("proj (config.model.proj_dim is 0)")
    del arrays["proj/kernel"]
  if "proj" in params and "proj/kernel" not in arrays:
    raise WeightsError(f"{name}: the model has a projection (config.model.proj_dim = "
                       f"{_leaf_shape_dtype(params['proj']['kernel'])[0][1]}) but the checkpoint "
                       "has none: set config.model.proj_dim=0")
  report.entry = entry
  params = fill(params, arrays, report, zero_init=zero_init, grid=grid, head_option=head_option)
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
