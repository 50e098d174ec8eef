"""Experiment configs: `common.py` holds the paper's recipe, one thin file per variant.

Load a file with ml_collections (`--config=configs/msca_kv.py`) or import it
(`from configs import msca_kv; cfg = msca_kv.get_config()`, or `configs.load('msca_kv')`).
Nothing here imports JAX or TensorFlow.
"""

from __future__ import annotations

import importlib

# Display names where the file name does not spell them; MSCA variants follow one rule (label).
LABELS = {"vit": "ViT", "tokenshift": "TokenShift"}


def label(variant: str) -> str:
  """A variant file's display name: 'msca_kv' -> 'MSCA-KV', 'msca_q_patch' -> 'MSCA-Q (patch)'."""
  if variant in LABELS:
    return LABELS[variant]
  return variant.replace("msca_", "MSCA-").upper().replace("_PATCH", " (patch)")


def load(variant: str, arg: str | None = None):
  """configs/<variant>.py's config with `arg` (e.g. 'demo'); ValueError names a missing file."""
  try:
    module = importlib.import_module(f"{__name__}.{variant}")
  except ModuleNotFoundError as e:
    if e.name != f"{__name__}.{variant}":
      raise
    raise ValueError(f"no config file configs/{variant}.py") from e
  return module.get_config(arg) if arg else module.get_config()
