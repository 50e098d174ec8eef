"""TokenShift ViT-B/16: C/4 of the CLS channels shifted each way in every block."""

from msca_jax import configs


def get_config(arg=None):
  return configs.get("tokenshift", arg)
