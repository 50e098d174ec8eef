"""Every variant's config, for a checkout and an installed package alike.

`get('msca_kv')` is what `--config=configs/msca_kv.py` loads, and `get('msca_kv', 'demo')` what
`--config=configs/msca_kv.py:demo` does: each file in the repository's configs/ calls `get` with its
own name. recipe.py holds the paper's setting and the config arguments, validation.py the checks
main.py runs before anything is built. Nothing here imports JAX or TensorFlow.
"""

from __future__ import annotations

import ml_collections

from msca_jax.configs import recipe

MSCA_TARGETS = ("q", "k", "v", "qk", "qv", "kv", "qkv")
# variant -> (model name, model fields). MSCA variants are named msca_<targets>[_patch].
VARIANTS = {
    "vit": ("vit", {}),
    "tokenshift": ("tokenshift", {}),
    **{f"msca_{t}": ("msca", {"msca_targets": t}) for t in MSCA_TARGETS},
    **{f"msca_{t}_patch": ("msca", {"msca_targets": t, "msca_axis": "patch"}) for t in MSCA_TARGETS},
}
# Display names where the variant's name does not spell them; MSCA variants follow one rule.
LABELS = {"vit": "ViT", "tokenshift": "TokenShift"}


def get(variant: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """A variant's config with its config arguments (e.g. 'demo' or 'clip,ssv2').

  ValueError names an unknown variant or argument.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")
  model_name, model_fields = VARIANTS[variant]
  return recipe.get_config(model_name, arg, **model_fields)


def label(variant: str) -> str:
  """A variant's display name: 'msca_kv' -> 'MSCA-KV', 'msca_q_patch' -> 'MSCA-Q (patch)'."""
  if variant in LABELS:
    return LABELS[variant]
  return variant.replace("msca_", "MSCA-").upper().replace("_PATCH", " (patch)")
