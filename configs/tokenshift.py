"""TokenShift ViT-B/16: C/4 of the CLS channels shifted each way in every block."""

from configs import common


def get_config(arg=None):
  return common.get_config("tokenshift", arg)
