r"""Converts a TokShift / MSCA PyTorch checkpoint into an orbax params checkpoint.

    python -m msca_jax.tools.convert_torch --checkpoint best.pth \
        --config configs/msca_kv.py --output /tmp/msca_kv_k400

The config says which model the weights are for (size, classes, resolution);
the output directory is what `config.init.checkpoint` points the trainer at,
and what `msca_jax.pretrained.restore_params` reads. It needs PyTorch: the
`parity` extra (pip install -e '.[parity]').

Only tensors are read (torch.load with weights_only=True): a file that holds other
pickled Python objects, which could run code when loaded, is refused.
Exit status 2 with one line on stderr for a missing, refused or unfitting file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

from msca_jax import cli, models, pretrained
from msca_jax.errors import UserError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pth / .pth.tar).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the orbax checkpoint.", required=True)
_NO_HEAD = flags.DEFINE_bool("no_head", False, "Skip the checkpoint's head; the new head starts at zero.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file, e.g. configs/msca_kv.py.")


def _refusal(checkpoint_path: str, error: Exception) -> pretrained.WeightsError:
  """Why a checkpoint is not read, without torch's advice to load it unsafely."""
  text = str(error)
  if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
      reason = f"it contains pickled Python objects ({found.group(1)}), which can run code when loaded"
    else:
      stop = re.search(r"Unsupported [^\n.]*", text)
      reason = ("it holds pickled Python objects (code) or is not a PyTorch checkpoint (the "
                f"tensors-only loader stopped at: {stop.group(0) if stop else type(error).__name__})")
    return pretrained.WeightsError(
        f"{checkpoint_path}: refused: {reason}; only checkpoints of tensors, which "
        "torch.load(weights_only=True) reads, are converted")
  first = cli.one_line(text.splitlines()[0] if text.strip() else "")
  return pretrained.WeightsError(f"{checkpoint_path}: not a PyTorch checkpoint of tensors "
                                 f"({type(error).__name__}: {first})")


def convert(checkpoint_path: str, model_config, output: str, *, load_head: bool = True) -> str:
  try:
    import torch  # optional dependency: only this tool needs it
  except ImportError as e:
    raise UserError("msca_jax.tools.convert_torch needs PyTorch, which is not installed: install "
                    "the parity extra (pip install -e '.[parity]') or torch") from e

  if not os.path.isfile(checkpoint_path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {checkpoint_path}")
  try:
    with warnings.catch_warnings():  # torch's note on the pickle protocol of a file it refuses anyway
      warnings.filterwarnings("ignore", message="Detected pickle protocol")
      checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a bad or pickled file
    raise _refusal(checkpoint_path, e) from None  # from None: torch's advice must not be shown
  params, report = pretrained.load_torch_state_dict(
      checkpoint, models.abstract_variables(model_config)[2]["params"], load_head=load_head, source=checkpoint_path,
      with_report=True)
  metadata = {"source": checkpoint_path, "model": model_config.to_dict(),
              "loaded": len(report.loaded), "resized": report.resized,
              "zero_initialised": report.zero_initialised, "dropped": report.dropped}
  return pretrained.save_params(output, params, json.loads(json.dumps(metadata, default=str)))


def main(argv):
  del argv
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (e.g. configs/msca_kv.py)")
  if not os.path.isfile(_CHECKPOINT.value):
    raise UserError(f"--checkpoint {_CHECKPOINT.value}: no such file")
  path = convert(_CHECKPOINT.value, _CONFIG.value.model, _OUTPUT.value, load_head=not _NO_HEAD.value)
  logging.info("wrote %s", path)
  print(f"wrote params checkpoint to {path}")


if __name__ == "__main__":
  cli.run(main, user_errors=(pretrained.WeightsError,))
