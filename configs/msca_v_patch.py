"""MSCA-V along the patch axis: interleaved patches take V from t-1 / t+1."""

from msca_jax import configs


def get_config(arg=None):
  return configs.get("msca_v_patch", arg)
