"""MSCA-QKV along the patch axis: interleaved patches take QKV from t-1 / t+1."""

from configs import common


def get_config(arg=None):
  return common.get_config("msca", arg, msca_targets="qkv", msca_axis="patch")
