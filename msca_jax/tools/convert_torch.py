r"""Converts a weights file into an orbax params checkpoint: a TokShift / MSCA PyTorch
checkpoint, or any file and layout `pretrained.load` reads (.npz, .safetensors, .bin / .pth of
Google, transformers, timm or CLIP weights).

    python -m msca_jax.tools.convert_torch --checkpoint best.pth \
        --config configs/msca_kv.py --output /tmp/msca_kv_k400
    python -m msca_jax.tools.convert_torch --checkpoint model.safetensors \
        --config configs/msca_kv.py:clip --output /tmp/msca_kv_clip

The config says which model the weights are for (size, classes, resolution);
the output directory is what `config.init.checkpoint` points the trainer at,
and what `msca_jax.pretrained.restore_params` reads. PyTorch files need PyTorch:
the `parity` extra (pip install -e '.[parity]'); .npz and .safetensors do not.

Only tensors are read (torch.load with weights_only=True): a file that holds other
pickled Python objects, which could run code when loaded, is refused.
Exit status 2 with one line on stderr for a missing, refused or unfitting file.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from msca_jax import cli, models, pretrained
from msca_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Weights file (.pth / .pth.tar / .bin / .safetensors / .npz).",
                                  required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the orbax checkpoint.", required=True)
_NO_HEAD = flags.DEFINE_bool("no_head", False, "Skip the checkpoint's head; the new head starts at zero.")
_KEY = flags.DEFINE_string(
    "checkpoint_key", "", "The entry of a training checkpoint to convert ({'state_dict_ema': ..., "
    "'state_dict': ...}); by default the first of " + ", ".join(pretrained.STATE_DICT_KEYS) +
    " that it holds (EMA weights first).")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file, e.g. configs/msca_kv.py.")


def _refusal(checkpoint_path: str, error: Exception) -> pretrained.WeightsError:
  """Why a checkpoint is not read, without torch's advice to load it unsafely."""
  return pretrained._torch_refusal(checkpoint_path, error, "converted")  # pylint: disable=protected-access


def convert(checkpoint_path: str, model_config, output: str, *, load_head: bool = True,
            key: str = "", head_option: str = "load_head=False") -> str:
  """Any file pretrained.load reads -> an orbax params directory for config.model.

  `head_option` is what a head that does not fit tells the user to pass ('--no_head' from the
  command line).
  """
  if not checkpoint_path.endswith(pretrained.NPZ_SUFFIXES + pretrained.SAFETENSORS_SUFFIXES):
    try:
      import torch  # pylint: disable=unused-import  # optional dependency: only torch files need it
    except ImportError as e:
      raise UserError("msca_jax.tools.convert_torch needs PyTorch, which is not installed: install "
                      "the parity extra (pip install -e '.[parity]') or torch") from e
  if not os.path.isfile(checkpoint_path):
    raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
  if checkpoint_path.endswith(pretrained.NPZ_SUFFIXES + pretrained.SAFETENSORS_SUFFIXES):
    contents = pretrained.read_weights(checkpoint_path)
  else:  # any name: released checkpoints end in .pth.tar, .pt, .bin or nothing at all
    contents = pretrained.read_torch(checkpoint_path, verb="converted")
  params, report = pretrained.load(
      contents, models.abstract_variables(model_config)[2]["params"], load_head=load_head,
      name=checkpoint_path, with_report=True, key=key, head_option=head_option)
  metadata = {"source": checkpoint_path, "entry": report.entry, "model": model_config.to_dict(),
              "loaded": len(report.loaded), "resized": report.resized,
              "zero_initialised": report.zero_initialised, "dropped": report.dropped}
  return pretrained.save_params(output, params, json.loads(json.dumps(metadata, default=str)))


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. configs/msca_kv.py)")
  if not os.path.isfile(_CHECKPOINT.value):
    raise UserError(f"--checkpoint {_CHECKPOINT.value}: no such file")
  path = convert(_CHECKPOINT.value, _CONFIG.value.model, _OUTPUT.value, load_head=not _NO_HEAD.value,
                 key=_KEY.value, head_option="--no_head")
  logging.info("wrote %s", path)
  entry = pretrained.read_params_metadata(path).get("entry")
  print(f"wrote params checkpoint to {path}" + (f" (from entry {entry!r})" if entry else ""))


if __name__ == "__main__":
  cli.run(main, user_errors=(pretrained.WeightsError,))
