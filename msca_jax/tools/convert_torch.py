r"""Converts a TokShift / MSCA PyTorch checkpoint into an orbax params checkpoint.

    python -m msca_jax.tools.convert_torch --checkpoint best.pth \
        --config configs/msca_kv.py --output /tmp/msca_kv_k400

The config says which model the weights are for (size, classes, resolution);
the output directory is what `config.init.checkpoint` points the trainer at,
and what `msca_jax.pretrained.restore_params` reads.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from msca_jax import models, pretrained

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "PyTorch checkpoint (.pth / .pth.tar).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory for the orbax checkpoint.", required=True)
_NO_HEAD = flags.DEFINE_bool("no_head", False, "Skip the checkpoint's head; the new head starts at zero.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Model config file, e.g. configs/msca_kv.py.")


def convert(checkpoint_path: str, model_config, output: str, *, load_head: bool = True) -> str:
  import torch  # optional dependency: only this tool needs it

  if not os.path.isfile(checkpoint_path):
    raise FileNotFoundError(f"PyTorch checkpoint not found: {checkpoint_path}")
  try:
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises several types for a bad or pickled file
    raise pretrained.WeightsError(
        f"{checkpoint_path}: not a PyTorch checkpoint of tensors that loads with weights_only=True "
        f"({type(e).__name__}: {e})") from e
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
  path = convert(_CHECKPOINT.value, _CONFIG.value.model, _OUTPUT.value, load_head=not _NO_HEAD.value)
  logging.info("wrote %s", path)
  print(f"wrote params checkpoint to {path}")


if __name__ == "__main__":
  app.run(main)
