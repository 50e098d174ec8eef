"""MSCA-V: heads take V from frames t-1 / t+1 (head axis)."""

from configs import common


def get_config(arg=None):
  return common.get_config("msca", arg, msca_targets="v")
