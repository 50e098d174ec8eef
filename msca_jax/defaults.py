"""Defaults that configs/ and the library share, in one place, importable without JAX or TensorFlow.

Loading a config imports this module and nothing heavier, so a config can be read, printed or
checked on a machine (or in a process) that never starts JAX.
"""

from __future__ import annotations

import ml_collections

# config.model.shift_div by model kind (docs/model.md): every reference TokenShift config moves
# width // 4 CLS channels each way; the released MSCA code moves num_heads // 12 heads each way.
# The frame-wise ViT moves nothing and ignores the field.
SHIFT_DIV = {"vit": 4, "tokenshift": 4, "msca": 12}
# The released MSCA code's 12 // 12: one of ViT-B's 12 heads takes K/V from each neighbour frame.
MSCA_HEADS_EACH_WAY = 1


def msca_shift_div(num_heads: int) -> int:
  """The shift_div that moves as many heads each way as the released code does at B/16."""
  return num_heads // MSCA_HEADS_EACH_WAY


# How the model's logical axes (models.LOGICAL_AXES) map onto the mesh axes (train/mesh.py).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("classes", None),
)


def mesh_config() -> ml_collections.ConfigDict:
  """config.mesh: data-parallel over every device unless told otherwise."""
  cfg = ml_collections.ConfigDict()
  cfg.shape = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  cfg.rules = DEFAULT_RULES
  return cfg
