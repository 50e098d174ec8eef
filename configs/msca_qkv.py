"""MSCA-QKV: heads take QKV from frames t-1 / t+1 (head axis)."""

from msca_jax import configs


def get_config(arg=None):
  return configs.get("msca_qkv", arg)
