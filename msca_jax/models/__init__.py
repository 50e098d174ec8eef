"""Model zoo: `build(config.model)` returns the Flax module for any variant.

    model = models.build(cfg.model)
    variables = model.init(rng, video)              # video: (B, T, H, W, 3) in [-1, 1]
    logits = model.apply(variables, video)          # (B, num_classes), inference mode
    logits = model.apply(variables, video, train=True, rngs={'dropout': rng})
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from absl import logging

from msca_jax import defaults
from msca_jax.models import msca, shift
from msca_jax.models import vit
from msca_jax.models.vit import TemporalMixing, VideoClassifier

MODEL_NAMES = ("vit", "tokenshift", "msca")

# name -> (width, depth, num_heads, mlp_dim), the ViT paper's sizes.
VARIANTS = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The logical axis names carried by params and activations; a mesh maps them.
LOGICAL_AXES = ("batch", "embed", "mlp", "heads", "kv", "classes")


def _get(config: Mapping[str, Any], field: str, default=None):
  value = config.get(field, default)
  return default if value is None else value


def parse_variant(variant: str) -> tuple[str, int]:
  """'B/16' -> ('B', 16)."""
  name, _, patch = str(variant).partition("/")
  if name not in VARIANTS or not patch.isdigit() or int(patch) < 1:
    raise ValueError(f"config.model.variant: expected '<{'|'.join(VARIANTS)}>/<patch size>' "
                     f"such as 'B/16', got {variant!r}")
  return name, int(patch)


def architecture(config: Mapping[str, Any]) -> dict[str, int]:
  """The variant's sizes, with any of width/depth/num_heads/mlp_dim/patch_size overridden."""
  name, patch = parse_variant(_get(config, "variant", "B/16"))
  width, depth, heads, mlp = VARIANTS[name]
  arch = dict(width=_get(config, "width", width), depth=_get(config, "depth", depth),
              num_heads=_get(config, "num_heads", heads), mlp_dim=_get(config, "mlp_dim", mlp),
              patch_size=_get(config, "patch_size", patch))
  for field, value in arch.items():
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"config.model.{field}: expected a positive integer, got {value!r}")
  if arch["width"] % arch["num_heads"]:
    raise ValueError(f"config.model.num_heads: {arch['num_heads']} does not divide "
                     f"width {arch['width']}")
  return arch


def temporal_mixing(config: Mapping[str, Any]) -> TemporalMixing:
  name = _get(config, "name", "vit")
  if name not in MODEL_NAMES:
    raise ValueError(f"config.model.name: expected one of {MODEL_NAMES}, got {name!r}")
  shift_div = _get(config, "shift_div", defaults.SHIFT_DIV[name])  # the configs' own default
  if not isinstance(shift_div, int) or shift_div < 1:
    raise ValueError(f"config.model.shift_div: expected a positive integer, got {shift_div!r}")
  boundary = _get(config, "boundary", "zero")
  if boundary not in shift.BOUNDARIES:
    raise ValueError(f"config.model.boundary: expected one of {shift.BOUNDARIES}, got {boundary!r}")
  targets = _get(config, "msca_targets", "kv")
  axis = _get(config, "msca_axis", "head")
  if name == "msca":
    if targets not in msca.TARGETS:
      raise ValueError(f"config.model.msca_targets: expected one of {msca.TARGETS}, got {targets!r}")
    if axis not in msca.AXES:
      raise ValueError(f"config.model.msca_axis: expected one of {msca.AXES}, got {axis!r}")
  return TemporalMixing(kind="none" if name == "vit" else name, shift_div=shift_div,
                        msca_targets=targets, msca_axis=axis, boundary=boundary)


def moved_fraction(temporal: TemporalMixing, arch: Mapping[str, int]) -> float:
  """The fraction of heads (MSCA), CLS channels (TokenShift) or patches that read other frames."""
  if temporal.kind == "tokenshift":
    return 2 * (arch["width"] // temporal.shift_div) / arch["width"]
  if temporal.kind == "msca" and temporal.msca_axis == "head":
    return 2 * (arch["num_heads"] // temporal.shift_div) / arch["num_heads"]
  if temporal.kind == "msca":
    return min(2, temporal.shift_div) / temporal.shift_div
  return 0.0


def _pixel_stats(config: Mapping[str, Any], field: str, default: tuple[float, ...]) -> tuple[float, ...]:
  value = _get(config, field, default)
  try:
    value = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    value = ()
  if len(value) != 3 or (field == "pixel_std" and min(value) <= 0):
    what = "three positive floats" if field == "pixel_std" else "three floats"
    raise ValueError(f"config.data.{field} (= config.model.{field}): expected {what} (R, G, B, "
                     f"of pixels in [0, 1]), got {_get(config, field)!r}")
  return value


def backbone_options(config: Mapping[str, Any]) -> dict[str, Any]:
  """The backbone fields of config.model, checked; absent ones (older configs) are ViT's."""
  backbone = _get(config, "backbone", "vit")
  if backbone not in vit.BACKBONES:
    raise ValueError(f"config.model.backbone: expected one of {vit.BACKBONES}, got {backbone!r}")
  proj_dim = _get(config, "proj_dim", 0)
  if isinstance(proj_dim, bool) or not isinstance(proj_dim, int) or proj_dim < 0:
    raise ValueError(f"config.model.proj_dim: expected a non-negative integer, got {proj_dim!r}")
  if proj_dim and backbone != "clip":
    raise ValueError(f"config.model.proj_dim = {proj_dim}: only the 'clip' backbone has a "
                     "projection; expected 0 with config.model.backbone = 'vit'")
  eps = _get(config, "layer_norm_eps", vit.LN_EPSILON)
  if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
    raise ValueError(f"config.model.layer_norm_eps: expected a small positive float, got {eps!r}")
  activation = _get(config, "mlp_activation", "gelu")
  if activation not in vit.MLP_ACTIVATIONS:
    raise ValueError(f"config.model.mlp_activation: expected one of {vit.MLP_ACTIVATIONS}, "
                     f"got {activation!r}")
  return dict(backbone=backbone, proj_dim=proj_dim, layer_norm_eps=float(eps),
              mlp_activation=activation,
              pixel_mean=_pixel_stats(config, "pixel_mean", vit.DEFAULT_PIXEL_MEAN),
              pixel_std=_pixel_stats(config, "pixel_std", vit.DEFAULT_PIXEL_STD))


def build(config: Mapping[str, Any]) -> VideoClassifier:
  """Builds the classifier described by a `config.model` ConfigDict (or any mapping)."""
  num_classes = config.get("num_classes")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"config.model.num_classes: expected a positive integer, got {num_classes!r}")
  dtype = _get(config, "dtype", "float32")
  if dtype not in DTYPES:
    raise ValueError(f"config.model.dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
  rates = {}
  for field in ("dropout_rate", "attention_dropout_rate", "drop_path_rate"):
    rates[field] = float(_get(config, field, 0.0))
    if not 0.0 <= rates[field] < 1.0:
      raise ValueError(f"config.model.{field}: expected a rate in [0, 1), got {rates[field]}")
  attention_impl = _get(config, "attention_impl", "auto")
  if attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl: expected one of {ATTENTION_IMPLS}, "
                     f"got {attention_impl!r}")
  arch, temporal = architecture(config), temporal_mixing(config)
  backbone = backbone_options(config)
  if temporal.kind != "none" and moved_fraction(temporal, arch) == 0.0:
    logging.warning(
        "config.model.shift_div=%d moves nothing with %d heads / width %d: this %s model "
        "computes exactly the frame-wise ViT", temporal.shift_div, arch["num_heads"], arch["width"],
        temporal.kind)
  return VideoClassifier(
      num_classes=num_classes, **arch, temporal=temporal,
      **rates, head_zeroinit=bool(_get(config, "head_zeroinit", True)),
      attention_impl=attention_impl, remat=bool(_get(config, "remat", False)),
      remat_policy=_get(config, "remat_policy", "nothing_saveable"), **backbone,
      dtype=DTYPES[dtype])


def clip_spec(config: Mapping[str, Any], batch: int = 1) -> jax.ShapeDtypeStruct:
  """The (batch, num_frames, image_size, image_size, 3) float32 input a config describes."""
  size = config["image_size"]
  return jax.ShapeDtypeStruct((batch, config["num_frames"], size, size, 3), jnp.float32)


def abstract_variables(config: Mapping[str, Any]):
  """(model, clip spec, variables as shapes): a config's model, without allocating anything."""
  model, clip = build(config), clip_spec(config)
  return model, clip, jax.eval_shape(model.init, jax.random.key(0), clip)


__all__ = ["build", "backbone_options", "clip_spec", "abstract_variables", "moved_fraction", "architecture", "temporal_mixing", "parse_variant", "VideoClassifier",
           "TemporalMixing", "VARIANTS", "MODEL_NAMES", "LOGICAL_AXES"]
