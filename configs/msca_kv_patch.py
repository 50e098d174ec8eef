"""MSCA-KV along the patch axis: interleaved patches take KV from t-1 / t+1."""

from configs import common


def get_config(arg=None):
  return common.get_config("msca", arg, msca_targets="kv", msca_axis="patch")
