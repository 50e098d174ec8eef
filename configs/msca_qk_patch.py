"""MSCA-QK along the patch axis: interleaved patches take QK from t-1 / t+1."""

from configs import common


def get_config(arg=None):
  return common.get_config("msca", arg, msca_targets="qk", msca_axis="patch")
