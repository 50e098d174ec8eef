"""Frame-wise ViT-B/16 (the baseline without temporal modelling)."""

from configs import common


def get_config(arg=None):
  return common.get_config("vit", arg)
