r"""Cloud TPU VM launcher: create a TPU VM (or a queued resource), install, train, tear down.

    python -m launch.tpu_vm launch --project=my-proj --zone=us-west4-a --name=msca-v5e \
        --accelerator_type=v5litepod-16 --spot --config=configs/msca_kv.py \
        --workdir=gs://my-bucket/runs/msca_kv -- --config.data.path=gs://my-bucket/data/k400_dmvr
    python -m launch.tpu_vm launch ... --dry-run    # print every command, run none

Subcommands (each takes --project, --zone, --name; `launch` takes the flags of all four steps):
  create   gcloud compute tpus tpu-vm create (or, with --queued, queued-resources create, then
           describe until the request is ACTIVE)
  install  copy the code to every worker (a `git archive` tarball of --ref, default HEAD, sent
           with scp --worker=all; or, with --repo, git clone on every worker), then
           pip install -e . and jax[tpu] at the very jax version that install resolved
  run      the same `python3 -m msca_jax.main ...` on every worker (ssh --worker=all): its output
           streams here and is appended to ~/msca_jax_train.log on each worker (--detach: runs
           in the background under nohup, see `logs`)
  logs     tail -F that log on one worker (--worker, default 0)
  stop     SIGTERM to msca_jax.main on every worker: the trainer saves a checkpoint, exits 143
  delete   tpu-vm delete --quiet (with --queued: queued-resources delete --force --quiet)
  launch   create, install, run, then delete (also after a failure; --keep keeps the TPU)

On a multi-host slice main.py calls jax.distributed.initialize(), which finds the other workers by
itself. Every worker must reach the workdir and the data: use gs:// paths (tf.io.gfile).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from launch import common

# TPU software versions for JAX, per generation (cloud.google.com/tpu/docs/runtimes).
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
_ACCELERATOR = re.compile(r"(v\d+[a-z]*)-(\d+)\Z")
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?\Z")
QUEUED_DONE = "ACTIVE"
QUEUED_FAILED = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")
# Matches `python3 -m msca_jax.main`, but not the remote shell running pkill with this pattern.
_MAIN_PATTERN = "[m]sca_jax[.]main"


@dataclasses.dataclass
class Step:
  """One command. `until`: rerun it until it prints this state (a queued resource's)."""
  argv: list[str]
  until: str | None = None


def check_accelerator(accelerator_type: str, runtime_version: str | None) -> str:
  """The runtime version to use: --runtime_version, else the generation's JAX default."""
  m = _ACCELERATOR.match(accelerator_type or "")
  if not m:
    raise common.LaunchError(
        f"--accelerator_type expects GENERATION-SIZE such as v4-32, v5litepod-16, v5p-8 or "
        f"v6e-8; got {accelerator_type!r}")
  if runtime_version:
    return runtime_version
  if m.group(1) not in RUNTIME_VERSIONS:
    raise common.LaunchError(
        f"no default --runtime_version for {m.group(1)} (known: "
        f"{', '.join(sorted(RUNTIME_VERSIONS))}); pass --runtime_version")
  return RUNTIME_VERSIONS[m.group(1)]


def queued_resource_id(name: str) -> str:
  return f"{name}-qr"


def default_tarball(name: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"msca_jax-{name}.tar.gz")


def _where(args) -> list[str]:
  flags = [f"--zone={args.zone}"]
  if args.project:
    flags.append(f"--project={args.project}")
  return flags


def _tpu_vm(args, verb: str, *positional: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *positional] + _where(args)


def _queued(args, verb: str) -> list[str]:
  return (["gcloud", "compute", "tpus", "queued-resources", verb, queued_resource_id(args.name)]
          + _where(args))


def _ssh(args, worker: str, command: str) -> list[str]:
  return _tpu_vm(args, "ssh", args.name) + [f"--worker={worker}", f"--command={command}"]


def _log(args) -> str:
  return "~/" + shlex.quote(args.remote_log)


def create_steps(args) -> list[Step]:
  runtime = check_accelerator(args.accelerator_type, args.runtime_version)
  if args.queued:
    if args.preemptible:
      raise common.LaunchError("queued resources take --spot, not --preemptible")
    create = _queued(args, "create") + [f"--node-id={args.name}",
                                        f"--accelerator-type={args.accelerator_type}",
                                        f"--runtime-version={runtime}"]
  else:
    create = _tpu_vm(args, "create", args.name) + [f"--accelerator-type={args.accelerator_type}",
                                                   f"--version={runtime}"]
  if args.spot:
    create.append("--spot")
  if args.preemptible:
    create.append("--preemptible")
  steps = [Step(create)]
  if args.queued:
    steps.append(Step(_queued(args, "describe") + ["--format=value(state.state)"],
                      until=QUEUED_DONE))
  return steps


def install_steps(args) -> list[Step]:
  d = shlex.quote(args.remote_dir)
  py = shlex.quote(args.python)
  # jax[tpu] at the jax version `pip install -e .` resolved from pyproject.toml's pin.
  pip = (f"{py} -m pip install --quiet --upgrade pip && {py} -m pip install --quiet -e . && "
         f"{py} -m pip install --quiet \"jax[tpu]==$({py} -c \"import jax; print(jax.__version__)\")\"")
  if args.repo:
    checkout = f" && git checkout --quiet {shlex.quote(args.ref)}" if args.ref else ""
    remote = (f"rm -rf {d} && git clone --quiet {shlex.quote(args.repo)} {d} && cd {d}"
              f"{checkout} && {pip}")
    return [Step(_ssh(args, "all", remote))]
  tarball = args.tarball or default_tarball(args.name)
  remote_tar = shlex.quote(args.remote_dir + ".tar.gz")
  archive = ["git", "-C", common.REPO_ROOT, "archive", "--format=tar.gz", f"--output={tarball}",
             args.ref or "HEAD"]
  scp = (["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
          f"{args.name}:{args.remote_dir}.tar.gz"] + _where(args) + ["--worker=all"])
  remote = (f"rm -rf {d} && mkdir -p {d} && tar -xzf {remote_tar} -C {d} && cd {d} && {pip}")
  return [Step(archive), Step(scp), Step(_ssh(args, "all", remote))]


def train_command(args, overrides: Sequence[str]) -> str:
  """The shell line every worker runs (from its home directory)."""
  if not args.workdir.startswith("gs://"):
    raise common.LaunchError(f"--workdir must be a gs:// path that every worker reaches (the VMs "
                             f"are deleted after the run); got {args.workdir!r}")
  for arg in overrides:
    if arg.startswith("--config.data.path=") and not arg.split("=", 1)[1].startswith("gs://"):
      print(f"warning: {arg} is not a gs:// path: every worker must have it", file=sys.stderr)
  env = common.parse_env(args.env, common.DEFAULT_ENV)
  main = common.main_command(args.config, args.workdir, mode=args.mode, overrides=overrides,
                             python=args.python)
  cd = f"cd {shlex.quote(args.remote_dir)}"
  if args.detach:
    detached = common.format_command(["nohup"] + main, env)
    return f"{cd} && ({detached} >> {_log(args)} 2>&1 < /dev/null &)"
  return f"{cd} && set -o pipefail && {common.format_command(main, env)} 2>&1 | tee -a {_log(args)}"


def run_steps(args, overrides: Sequence[str]) -> list[Step]:
  return [Step(_ssh(args, "all", train_command(args, overrides)))]


def logs_steps(args) -> list[Step]:
  follow = ["-F"] if args.follow else []
  tail = " ".join(["tail", "-n", str(args.lines)] + follow + [_log(args)])
  return [Step(_ssh(args, args.worker, tail))]


def stop_steps(args) -> list[Step]:
  return [Step(_ssh(args, "all", f"pkill -TERM -f \"{_MAIN_PATTERN}\" || true"))]


def delete_steps(args) -> list[Step]:
  if args.queued:
    return [Step(_queued(args, "delete") + ["--force", "--quiet"])]
  return [Step(_tpu_vm(args, "delete", args.name) + ["--quiet"])]


def wait_until(argv: Sequence[str], state: str, *, poll_seconds: float, timeout: float | None
               ) -> None:
  """Reruns `argv` (a describe) until it prints `state`; fails on a failed request."""
  start = time.monotonic()
  last = None
  while True:
    current = subprocess.run(list(argv), check=True, stdout=subprocess.PIPE,
                             text=True).stdout.strip()
    if current != last:
      print(f"state: {current or '(none)'}", flush=True)
      last = current
    if current == state:
      return
    if current in QUEUED_FAILED:
      raise RuntimeError(f"the queued resource is {current}; delete it and try again")
    if timeout is not None and time.monotonic() - start > timeout:
      raise TimeoutError(f"still {current} after {timeout} s")
    time.sleep(poll_seconds)


def execute(steps: Sequence[Step], args) -> None:
  for step in steps:
    print(common.format_command(step.argv), flush=True)
    if args.dry_run:
      continue
    if step.until:
      wait_until(step.argv, step.until, poll_seconds=args.poll_seconds, timeout=args.wait_timeout)
    else:
      subprocess.run(step.argv, check=True)


def _warn_uncommitted(args) -> None:
  if args.repo or args.ref not in (None, "HEAD"):
    return
  changed = subprocess.run(["git", "-C", common.REPO_ROOT, "status", "--porcelain",
                            "--untracked-files=no"], stdout=subprocess.PIPE, text=True).stdout
  if changed.strip():
    print("warning: uncommitted changes are not in the tarball (git archive HEAD)",
          file=sys.stderr)


def parser() -> argparse.ArgumentParser:
  where = argparse.ArgumentParser(add_help=False)
  where.add_argument("--project", default=None, help="GCP project (default: gcloud's)")
  where.add_argument("--zone", required=True, help="e.g. us-central2-b, us-west4-a")
  where.add_argument("--name", required=True, help="the TPU VM (node) name")
  where.add_argument("--queued", action="store_true",
                     help="a queued resource (id NAME-qr, node NAME) rather than a plain TPU VM")
  where.add_argument("--remote_dir", default="msca_jax",
                     help="the code on every worker, relative to the home directory")
  where.add_argument("--remote_log", default="msca_jax_train.log",
                     help="the run's log on every worker, relative to the home directory")
  where.add_argument("--python", default="python3", help="interpreter on the workers")
  common.add_dry_run_flag(where)

  create = argparse.ArgumentParser(add_help=False)
  create.add_argument("--accelerator_type", required=True, help="e.g. v4-32, v5litepod-16, v6e-8")
  create.add_argument("--runtime_version", default=None,
                      help="TPU software version (default per generation: "
                           + ", ".join(f"{k} {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
  kind = create.add_mutually_exclusive_group()
  kind.add_argument("--spot", action="store_true", help="Spot TPU VMs")
  kind.add_argument("--preemptible", action="store_true", help="preemptible TPU VMs")
  create.add_argument("--poll_seconds", type=float, default=30.0,
                      help="--queued: seconds between describes (default 30)")
  create.add_argument("--wait_timeout", type=float, default=None,
                      help="--queued: give up waiting after this many seconds")

  install = argparse.ArgumentParser(add_help=False)
  install.add_argument("--repo", default=None,
                       help="git clone this URL on every worker (default: send a tarball of "
                            "this checkout)")
  install.add_argument("--ref", default=None,
                       help="commit, branch or tag (tarball default HEAD; --repo default: the "
                            "clone's default branch)")
  install.add_argument("--tarball", default=None,
                       help="local tarball path (default: msca_jax-NAME.tar.gz in the temp dir)")

  run = argparse.ArgumentParser(add_help=False)
  common.add_main_flags(run)
  run.add_argument("--env", action="append", default=None,
                   help="NAME=VALUE for the run (repeatable; TF_CPP_MIN_LOG_LEVEL=2 is set)")
  run.add_argument("--detach", action="store_true",
                   help="start the run under nohup and return (follow it with `logs`)")

  logs = argparse.ArgumentParser(add_help=False)
  logs.add_argument("--worker", default="0", help="which worker's log (default 0)")
  logs.add_argument("--lines", type=int, default=100, help="lines of history (default 100)")
  logs.add_argument("--follow", action=argparse.BooleanOptionalAction, default=True,
                    help="keep following (tail -F; default) or print and return")

  p = argparse.ArgumentParser(
      prog="python -m launch.tpu_vm", allow_abbrev=False,
      description="Run msca_jax.main on a Cloud TPU VM slice (every worker).",
      epilog="Arguments after -- go to msca_jax.main (run, launch), e.g. "
             "-- --config.data.path=gs://BUCKET/data/k400_dmvr")
  sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
  helps = {"create": ([where, create], "create the TPU VM (or queued resource) and wait for it"),
           "install": ([where, install], "copy the code to every worker and pip install it"),
           "run": ([where, run], "train on every worker, streaming the output"),
           "logs": ([where, logs], "tail the run's log on one worker"),
           "stop": ([where], "SIGTERM the run on every worker (it saves and exits 143)"),
           "delete": ([where], "delete the TPU VM (or queued resource)"),
           "launch": ([where, create, install, run], "create, install, run, delete")}
  for name, (parents, text) in helps.items():
    s = sub.add_parser(name, parents=parents, help=text, description=text, allow_abbrev=False)
    if name == "launch":
      s.add_argument("--keep", action="store_true", help="do not delete the TPU VM at the end")
  return p


def plan(args, overrides: Sequence[str]) -> tuple[list[Step], list[Step]]:
  """(the steps, the teardown steps that `launch` runs even after a failure)."""
  if not _NAME.match(args.name):
    raise common.LaunchError(f"--name must be lowercase letters, digits and hyphens, starting with "
                             f"a letter; got {args.name!r}")
  if overrides and args.command not in ("run", "launch"):
    raise common.LaunchError(f"arguments after -- go to msca_jax.main: only `run` and `launch` "
                             f"take them, not `{args.command}`")
  if args.command == "create":
    return create_steps(args), []
  if args.command == "install":
    return install_steps(args), []
  if args.command == "run":
    return run_steps(args, overrides), []
  if args.command == "logs":
    return logs_steps(args), []
  if args.command == "stop":
    return stop_steps(args), []
  if args.command == "delete":
    return delete_steps(args), []
  if args.detach and not args.keep:
    raise common.LaunchError("launch --detach would delete the TPU VM under the running job: "
                             "add --keep (and `delete` later)")
  steps = create_steps(args) + install_steps(args) + run_steps(args, overrides)
  return steps, ([] if args.keep else delete_steps(args))


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  args, overrides = common.parse(p, argv)
  try:
    steps, teardown = plan(args, overrides)
  except common.LaunchError as e:
    p.error(str(e))
  if args.dry_run:
    execute(steps + teardown, args)
    return 0
  if args.command in ("install", "launch"):
    _warn_uncommitted(args)
  try:
    execute(steps, args)
  except subprocess.CalledProcessError as e:
    print(f"failed ({e.returncode}): {common.format_command(e.cmd)}", file=sys.stderr)
    return e.returncode or 1
  except (RuntimeError, TimeoutError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  finally:
    if teardown:
      try:
        execute(teardown, args)
      except subprocess.CalledProcessError as e:
        print(f"teardown failed ({e.returncode}): delete the TPU VM by hand", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
