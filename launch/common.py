"""What the launchers share: main.py's command line, passthrough flags, quoting, dry runs.

Every launcher ends in the same entry point,

    python -m msca_jax.main --config=CONFIG --workdir=WORKDIR [--mode=MODE] [FLAGS] [OVERRIDES]

where OVERRIDES are the arguments after a bare `--` on the launcher's command line (any
`--config.FIELD=VALUE`, or another flag of main.py). Commands are lists of arguments until they
are printed: `format_command` quotes them for a POSIX shell (shlex), so that the printed line,
pasted into a shell or split back with `shlex.split`, gives the same arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from typing import Iterable, Mapping, Sequence, TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_MODULE = "msca_jax.main"
MODES = ("train", "evaluate", "train_and_evaluate")
# Flags the launchers set themselves: after `--` they would contradict the launcher's own.
LAUNCHER_FLAGS = ("--config", "--workdir", "--mode", "--coordinator_address", "--num_processes",
                  "--process_id")
# TensorFlow (tf.data only) is loud at import time on accelerator machines.
DEFAULT_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class LaunchError(ValueError):
  """A bad flag or flag combination; the launchers report it as a usage error."""


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits argv at the first bare `--`: (the launcher's arguments, main.py's overrides)."""
  argv = list(argv)
  if "--" in argv:
    i = argv.index("--")
    return argv[:i], argv[i + 1:]
  return argv, []


def check_overrides(overrides: Sequence[str]) -> list[str]:
  """Checks the arguments after `--`: main.py flags only, none the launcher sets itself."""
  for arg in overrides:
    if not arg.startswith("--") or arg == "--":
      raise LaunchError(
          f"arguments after -- are passed to msca_jax.main and must be flags such as "
          f"--config.train.num_steps=100; got {arg!r}")
    name = arg.split("=", 1)[0]
    if name in ("--dry-run", "--dry_run"):
      raise LaunchError(f"{name} goes before --: after it, it would be passed to msca_jax.main")
    if name in LAUNCHER_FLAGS:
      raise LaunchError(f"{name} is set by the launcher (use its own {name} flag), not after --")
  return list(overrides)


def parse_env(assignments: Iterable[str] | None, defaults: Mapping[str, str] | None = None
              ) -> dict[str, str]:
  """KEY=VALUE strings (repeated --env flags) on top of `defaults`, in order."""
  env = dict(defaults or {})
  for item in assignments or ():
    key, sep, value = item.partition("=")
    if not sep or not _ENV_NAME.match(key):
      raise LaunchError(f"--env expects NAME=VALUE with a shell variable name, got {item!r}")
    env[key] = value
  return env


def main_command(config: str, workdir: str, *, mode: str | None = None,
                 overrides: Sequence[str] = (), python: str = "python",
                 flags: Sequence[str] = ()) -> list[str]:
  """The argv of one msca_jax.main process: `flags` (e.g. process ids) come before overrides."""
  if not config:
    raise LaunchError("--config is required, e.g. --config=configs/msca_kv.py")
  if not workdir:
    raise LaunchError("--workdir is required")
  argv = [python, "-m", MAIN_MODULE, f"--config={config}", f"--workdir={workdir}"]
  if mode:
    if mode not in MODES:
      raise LaunchError(f"--mode must be one of {', '.join(MODES)}; got {mode!r}")
    argv.append(f"--mode={mode}")
  return argv + list(flags) + check_overrides(overrides)


def format_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
  """One shell line: `NAME=VALUE ... ARGV`, every word quoted as needed (values after the `=`,
  so that the shell still sees an assignment)."""
  words = [f"{key}={shlex.quote(str(value))}" for key, value in (env or {}).items()]
  return " ".join(words + [shlex.join(argv)]) if words else shlex.join(argv)


def run_command(argv: Sequence[str], *, dry_run: bool, out: TextIO | None = None,
                capture: bool = False) -> str | None:
  """Prints the command, then (unless dry_run) runs it, raising CalledProcessError on failure."""
  out = out or sys.stdout
  print(format_command(argv), file=out, flush=True)
  if dry_run:
    return None
  if capture:
    return subprocess.run(list(argv), check=True, stdout=subprocess.PIPE, text=True).stdout
  subprocess.run(list(argv), check=True)
  return None


def add_main_flags(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
  """--config, --workdir and --mode: what every launcher passes on to main.py."""
  parser.add_argument("--config", required=required,
                      help="config file relative to the repository, e.g. configs/msca_kv.py[:demo]")
  parser.add_argument("--workdir", required=required,
                      help="checkpoints, logs and reports (shared by every process)")
  parser.add_argument("--mode", choices=MODES, default=None,
                      help="main.py's --mode (default: main.py's default, train_and_evaluate)")


def add_dry_run_flag(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print the commands (shell-quoted) and run nothing")


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None
          ) -> tuple[argparse.Namespace, list[str]]:
  """Parses the launcher's own flags; the arguments after `--` come back checked, as overrides."""
  argv = sys.argv[1:] if argv is None else argv
  own, overrides = split_passthrough(argv)
  args = parser.parse_args(own)
  try:
    return args, check_overrides(overrides)
  except LaunchError as e:
    parser.error(str(e))
    raise  # unreachable: parser.error exits
