r"""Submits a training run to a SLURM GPU cluster: renders an sbatch script and runs sbatch.

    python -m launch.slurm --nodes=2 --gpus_per_node=8 --partition=gpu --time=24:00:00 \
        --venv=/shared/venvs/msca --config=configs/msca_kv.py --workdir=/shared/runs/msca_kv \
        --requeue -- --config.data.path=/shared/data/k400_dmvr
    python -m launch.slurm ... --dry-run      # print the script and the sbatch command

The script starts `srun python -m msca_jax.main ...`: one process per GPU (--per=gpu, the
default) or one per node with all its GPUs (--per=host). main.py sees SLURM_NTASKS > 1 and calls
jax.distributed.initialize(), which reads the coordinator, process count and process id from
SLURM's variables. GPUs are assigned as follows:
  --per=gpu, --gpu_binding=jax (default): every task sees the node's GPUs and JAX keeps GPU
    number SLURM_LOCALID (what jax.distributed does under SLURM); NCCL still sees its peers.
  --per=gpu, --gpu_binding=slurm: `--gpus-per-task=1`, SLURM binds one GPU to each task
    (CUDA_VISIBLE_DEVICES), and JAX_LOCAL_DEVICE_IDS=0 makes JAX use that one.
  --per=host: JAX_LOCAL_DEVICE_IDS=0,...,G-1 (JAX would otherwise keep GPU SLURM_LOCALID only).
Preemption and time limits: `#SBATCH --signal=TERM@S` sends SIGTERM to every task S seconds
before the time limit; the trainer then saves a checkpoint and exits with status 143. With
--requeue, the script then runs `scontrol requeue $SLURM_JOB_ID` and the job starts again, resuming
from that checkpoint (the output file is appended to). The workdir must be on storage every node
sees (a shared filesystem, or gs://).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence

from launch import common

_TIME = re.compile(r"((\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE)\Z", re.IGNORECASE)


def render_script(args: argparse.Namespace, overrides: Sequence[str]) -> str:
  """The sbatch script for parsed flags `args` and main.py overrides (see the module docstring)."""
  if args.gpus_per_node is None:
    what = "one process per GPU" if args.per == "gpu" else "one process per node with all its GPUs"
    raise common.LaunchError(f"--gpus_per_node is required (--per={args.per} starts {what})")
  if args.gpus_per_node < 1:
    raise common.LaunchError(f"--gpus_per_node must be at least 1, got {args.gpus_per_node}")
  if args.nodes < 1:
    raise common.LaunchError(f"--nodes must be at least 1, got {args.nodes}")
  if args.per == "host" and args.gpu_binding == "slurm":
    raise common.LaunchError("--gpu_binding=slurm binds one GPU per task: it needs --per=gpu")
  if args.time is not None and not _TIME.match(args.time):
    raise common.LaunchError(f"--time expects SLURM's [D-]HH:MM:SS (or MM, MM:SS, D-HH...), "
                             f"got {args.time!r}")
  if args.venv and args.container:
    raise common.LaunchError("--venv and --container exclude each other (the container has "
                             "its own Python)")
  if args.grace_seconds < 1:
    raise common.LaunchError(f"--grace_seconds must be at least 1, got {args.grace_seconds}")
  if args.max_requeues and not args.requeue:
    raise common.LaunchError("--max_requeues needs --requeue")
  g = args.gpus_per_node
  per_gpu = args.per == "gpu"
  tasks_per_node = g if per_gpu else 1
  env = common.parse_env(args.env, common.DEFAULT_ENV)

  sbatch = [f"--job-name={args.job_name}", f"--nodes={args.nodes}",
            f"--ntasks-per-node={tasks_per_node}"]
  if per_gpu and args.gpu_binding == "slurm":
    sbatch.append("--gpus-per-task=1")
  else:
    sbatch.append(f"--gpus-per-node={g}")
  if args.cpus_per_task:
    sbatch.append(f"--cpus-per-task={args.cpus_per_task}")
  for flag, value in (("partition", args.partition), ("account", args.account),
                      ("time", args.time)):
    if value:
      sbatch.append(f"--{flag}={value}")
  sbatch += [f"--chdir={args.chdir}", f"--output={os.path.join(log_dir(args), '%x-%j.out')}",
             "--open-mode=append", f"--signal=TERM@{args.grace_seconds}"]
  if args.requeue:
    sbatch.append("--requeue")
  sbatch += list(args.sbatch_option or ())
  for option in sbatch:
    if re.search(r"\s", option) or not option.startswith("--"):
      raise common.LaunchError(f"#SBATCH options are single words starting with --; got {option!r}")

  processes = (f"{args.nodes * g} process(es), one per GPU" if per_gpu else
               f"{args.nodes} process(es), one per node with {g} GPU(s)")
  lines = ["#!/bin/bash",
           f"# Written by `python -m launch.slurm` (msca_jax): {args.nodes} node(s) x {g} GPU(s), "
           f"{processes}."]
  lines += [f"#SBATCH {option}" for option in sbatch]
  lines += ["",
            f"# SIGTERM reaches every task {args.grace_seconds} s before the time limit (and on "
            "preemption or scancel): the",
            "# trainer saves a checkpoint and exits with status 143. The batch shell only notes "
            "the signal, so that it",
            "# lives on to the end of the script.",
            "trap 'echo \"msca_jax: batch shell got SIGTERM\"' TERM"]
  if args.venv:
    lines.append(f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}")
  if per_gpu and args.gpu_binding == "jax":
    lines.append("# One process per GPU: jax.distributed.initialize() keeps GPU number "
                 "SLURM_LOCALID in each task.")
  elif per_gpu:
    lines += ["# One process per GPU: SLURM gives each task one GPU (--gpus-per-task=1), which "
              "JAX sees as device 0.",
              "export JAX_LOCAL_DEVICE_IDS=0"]
  else:
    lines += ["# One process per node: every GPU of the node (JAX would otherwise keep GPU "
              "SLURM_LOCALID only).",
              f"export JAX_LOCAL_DEVICE_IDS={','.join(str(i) for i in range(g))}"]
  lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
  srun = ["srun", "--label"]
  if args.container:
    mounts = [f"{args.chdir}:{args.chdir}"] + list(args.container_mounts or ())
    srun += [f"--container-image={args.container}", f"--container-mounts={','.join(mounts)}",
             f"--container-workdir={args.chdir}"]
  srun += common.main_command(args.config, args.workdir, mode=args.mode, overrides=overrides,
                              python=args.python)
  lines += ["",
            'echo "msca_jax: job ${SLURM_JOB_ID}, restart ${SLURM_RESTART_COUNT:-0}, '
            'nodes ${SLURM_JOB_NODELIST}"',
            shlex.join(srun),
            "status=$?"]
  if args.requeue:
    condition = '[ "$status" -eq 143 ]'
    if args.max_requeues:
      condition += f' && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {args.max_requeues} ]'
    lines += [f"if {condition}; then",
              '  echo "msca_jax: stopped by SIGTERM after saving a checkpoint; requeueing job '
              '${SLURM_JOB_ID}"',
              '  scontrol requeue "${SLURM_JOB_ID}"',
              "fi"]
  lines.append('exit "$status"')
  return "\n".join(lines) + "\n"


def log_dir(args: argparse.Namespace) -> str:
  """SLURM's output directory: --log_dir, under --chdir when relative."""
  return os.path.join(args.chdir, args.log_dir)


def script_path(args: argparse.Namespace) -> str:
  return args.script or os.path.join(log_dir(args), f"{args.job_name}.sbatch")


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m launch.slurm", allow_abbrev=False,
      description="Render an sbatch script for msca_jax.main and submit it.",
      epilog="Arguments after -- go to msca_jax.main, e.g. -- --config.data.path=/data/k400_dmvr")
  common.add_main_flags(p)
  p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
  p.add_argument("--gpus_per_node", type=int, default=None, help="GPUs per node (required)")
  p.add_argument("--per", choices=("gpu", "host"), default="gpu",
                 help="one process per GPU (default) or one per node with all its GPUs")
  p.add_argument("--gpu_binding", choices=("jax", "slurm"), default="jax",
                 help="--per=gpu: JAX picks GPU SLURM_LOCALID (default), or SLURM binds one GPU "
                      "per task (--gpus-per-task=1)")
  p.add_argument("--partition", default=None)
  p.add_argument("--account", default=None)
  p.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 or 2-00:00:00")
  p.add_argument("--job_name", default="msca_jax")
  p.add_argument("--cpus_per_task", type=int, default=None)
  p.add_argument("--venv", default=None, help="virtual environment to activate on every node")
  p.add_argument("--container", default=None,
                 help="container image for srun (pyxis/enroot: --container-image); the "
                      "repository is mounted at the same path")
  p.add_argument("--container_mounts", action="append", default=None,
                 help="more SRC:DST mounts for --container (repeatable)")
  p.add_argument("--python", default="python", help="interpreter on the nodes (default python)")
  p.add_argument("--chdir", default=common.REPO_ROOT, type=os.path.abspath,
                 help="the repository on the nodes' shared filesystem (default: this checkout)")
  p.add_argument("--log_dir", default="slurm_logs",
                 help="SLURM output files (%%x-%%j.out), under --chdir if relative "
                      "(default slurm_logs)")
  p.add_argument("--script", default=None,
                 help="where to write the script (default LOG_DIR/JOB_NAME.sbatch under --chdir)")
  p.add_argument("--grace_seconds", type=int, default=120,
                 help="SIGTERM this long before the time limit (default 120)")
  p.add_argument("--requeue", action="store_true",
                 help="requeue the job when the trainer stops on SIGTERM (exit status 143)")
  p.add_argument("--max_requeues", type=int, default=0,
                 help="with --requeue: stop requeueing after this many restarts (0: no limit)")
  p.add_argument("--env", action="append", default=None,
                 help="NAME=VALUE exported on every node (repeatable)")
  p.add_argument("--sbatch_option", action="append", default=None,
                 help="another #SBATCH line, e.g. --sbatch_option=--exclusive (repeatable)")
  common.add_dry_run_flag(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  args, overrides = common.parse(p, argv)
  try:
    script = render_script(args, overrides)
  except common.LaunchError as e:
    p.error(str(e))
  path = script_path(args)
  if args.dry_run:
    sys.stdout.write(script)
    print(common.format_command(["sbatch", path]), flush=True)
    return 0
  os.makedirs(log_dir(args), exist_ok=True)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(script)
  print(f"wrote {path}", flush=True)
  try:
    common.run_command(["sbatch", path], dry_run=False)
  except subprocess.CalledProcessError as e:
    return e.returncode or 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
