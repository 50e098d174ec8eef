"""MSCA-QK along the patch axis: interleaved patches take QK from t-1 / t+1."""

from msca_jax import configs


def get_config(arg=None):
  return configs.get("msca_qk_patch", arg)
