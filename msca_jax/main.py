r"""Trains and evaluates a model: the entry point for every variant, device and scale.

    python -m msca_jax.main --config=configs/msca_kv.py:demo --workdir=/tmp/msca_kv_demo
    python -m msca_jax.main --config=configs/msca_kv.py --workdir=gs://bucket/msca_kv \
        --config.data.path=gs://bucket/kinetics400_dmvr
    python -m msca_jax.main --config=configs/msca_kv.py --workdir=... --mode=evaluate

Any config field can be overridden with --config.FIELD=VALUE. Rerunning a command resumes from the
workdir's latest checkpoint. Exit status: 0 done, 143 stopped by SIGTERM (130: by Ctrl-C) after
saving a checkpoint (rerun to resume), 2 a mistake in the flags, the config or the files they name
(one line on stderr: `error: ...`; also every checkpoint in the workdir damaged), 3 the loss or the
state to save became NaN or Inf (the last good checkpoint is kept), 4 a checkpoint (or the
metrics) could not be saved (read-only or full directory, lost permission: the previous checkpoint
is intact; rerun to resume once fixed).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from msca_jax import cli, host_memory
from msca_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py:demo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and reports.")
_MODE = flags.DEFINE_enum("mode", "train_and_evaluate", ["train", "evaluate", "train_and_evaluate"],
                          "train; evaluate the workdir's latest checkpoint (test protocol); or both.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for a multi-process run that is not "
    "auto-detected (Cloud TPU, SLURM and Open MPI are); needs --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
EXIT_NONFINITE = 3
EXIT_SAVE_FAILED = 4


def _detected_cluster() -> str | None:
  """The multi-process environment this process runs in, if any (jax.distributed finds the rest)."""
  if int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1:
    return "SLURM"
  if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "Open MPI"
  try:  # JAX's own test: a Cloud TPU VM (asks the metadata server) or a GKE TPU slice
    from jax._src.clusters import cloud_tpu_cluster
    if cloud_tpu_cluster.GceTpuCluster.is_env_present() or cloud_tpu_cluster.GkeTpuCluster.is_env_present():
      return "Cloud TPU"
  except (ImportError, AttributeError):  # a JAX without these private classes: flags still work
    pass
  return None


def initialise_distributed() -> None:
  """jax.distributed.initialize, from the flags or the detected cluster; nothing when single-process."""
  import jax

  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  else:
    cluster = _detected_cluster()
    if cluster is None:
      return
    logging.info("%s detected: initialising jax.distributed", cluster)
    jax.distributed.initialize()
  logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(),
               jax.local_device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required, e.g. "
                         "--config=configs/msca_kv.py:demo --workdir=/tmp/msca_kv_demo")
  # Before JAX and TensorFlow start their threads (msca_jax/host_memory.py says why).
  logging.info("%s", host_memory.keep_freed_memory())
  # Imported here so that --help answers without loading JAX and TensorFlow.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")  # tf.data only: the accelerators belong to JAX
  from msca_jax import pretrained, progress
  from msca_jax.train import checkpoint, trainer

  progress.quiet_library_logs()
  initialise_distributed()
  from msca_jax.configs import validation
  # Before anything is built: a mistake in the config is one line, not a traceback after the dump.
  validation.validate(_CONFIG.value, _MODE.value, _WORKDIR.value)
  logging.info("config:\n%s", _CONFIG.value)
  try:
    result = trainer.run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    sys.exit(EXIT_NONFINITE)
  except checkpoint.SaveError as e:
    logging.error("%s", e)
    sys.exit(EXIT_SAVE_FAILED)
  except checkpoint.DamagedCheckpointError as e:  # every step damaged: the user decides what next
    raise UserError(str(e)) from e
  except pretrained.WeightsError as e:  # config.init names weights that do not fit the model
    raise UserError(str(e)) from e
  if result.get("interrupted"):
    sys.exit(result.get("exit_status") or trainer.EXIT_INTERRUPTED)


if __name__ == "__main__":
  cli.run(main)
