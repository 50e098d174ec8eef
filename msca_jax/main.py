r"""Trains and evaluates a model: the entry point for every variant, device and scale.

    python -m msca_jax.main --config=configs/msca_kv.py:demo --workdir=/tmp/msca_kv_demo
    python -m msca_jax.main --config=configs/msca_kv.py --workdir=gs://bucket/msca_kv \
        --config.data.path=gs://bucket/kinetics400_dmvr
    python -m msca_jax.main --config=configs/msca_kv.py --workdir=... --mode=evaluate

Any config field can be overridden with --config.FIELD=VALUE. Rerunning a command resumes from the
workdir's latest checkpoint. Exit status: 0 done, 143 stopped by SIGTERM after saving a
checkpoint (rerun to resume), 3 the loss became NaN or Inf (the last good checkpoint is kept).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", ["train", "evaluate", "train_and_evaluate"],
                          "train; evaluate the workdir's latest checkpoint (test protocol); or both.")
EXIT_NONFINITE = 3


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required, e.g. "
                         "--config=configs/msca_kv.py:demo --workdir=/tmp/msca_kv_demo")
  # Imported here so that --help answers without loading JAX and TensorFlow.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only: the accelerators belong to JAX
  from msca_jax import progress
  from msca_jax.train import trainer

  progress.quiet_library_logs()
  logging.info("config:\n%s", _CONFIG.value)
  try:
    result = trainer.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(EXIT_NONFINITE)
  if result.get("interrupted"):
    sys.exit(trainer.EXIT_INTERRUPTED)


if __name__ == "__main__":
  app.run(main)
