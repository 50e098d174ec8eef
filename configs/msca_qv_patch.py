"""MSCA-QV along the patch axis: interleaved patches take QV from t-1 / t+1."""

from msca_jax import configs


def get_config(arg=None):
  return configs.get("msca_qv_patch", arg)
