"""Frame-wise ViT-B/16 (the baseline without temporal modelling)."""

from msca_jax import configs


def get_config(arg=None):
  return configs.get("vit", arg)
