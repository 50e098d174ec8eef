r"""Runs N processes of msca_jax.main on the local host, as one multi-process JAX program.

    python -m launch.local --num_processes=2 --devices_per_process=4 \
        --config=configs/msca_kv.py:demo --workdir=/tmp/msca_2proc -- --config.train.num_steps=20
    python -m launch.local ... --dry-run      # print the N command lines with their environment

Process I runs

    XLA_FLAGS=--xla_force_host_platform_device_count=K JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1 \
        python -m msca_jax.main ... --coordinator_address=127.0.0.1:PORT --num_processes=N \
        --process_id=I [OVERRIDES]

(other XLA_FLAGS of this environment are kept; a free port is picked unless --port is given).
Every output line is prefixed with `[process I]`. If one process fails, the others are stopped
(SIGTERM, then SIGKILL after --grace_seconds), so nothing waits forever on a dead peer. SIGTERM
and SIGINT sent to the launcher are passed on to every process, with no deadline (the trainer
saves a checkpoint and exits with 143); a second one sends SIGKILL. The exit status is 0 when
every process exits with 0, else the status of the process that failed first.

From Python: `build_commands(...)` gives [(argv, env_overrides)] and `run(commands)` runs any
such list and returns the exit codes (negative: killed by that signal).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

from launch import common

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
Command = tuple[list[str], dict[str, str]]


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nobody listens on right now (the coordinator binds it a moment later)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def xla_flags(devices_per_process: int, current: str | None) -> str:
  """`current` XLA_FLAGS without any device-count flag, then ours."""
  kept = [f for f in shlex.split(current or "") if f.split("=", 1)[0] != DEVICE_COUNT_FLAG]
  return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices_per_process}"])


def build_commands(config: str, workdir: str, num_processes: int = 2, *,
                   devices_per_process: int = 1, port: int | None = None,
                   host: str = "127.0.0.1", mode: str | None = None,
                   overrides: Sequence[str] = (), python: str = sys.executable,
                   base_env: Mapping[str, str] | None = None) -> list[Command]:
  """[(argv, env_overrides)] for processes 0..num_processes-1 of one run.

  env_overrides go on top of the launcher's environment (`base_env`, default os.environ, whose
  other XLA_FLAGS are kept)."""
  if num_processes < 1:
    raise common.LaunchError(f"--num_processes must be at least 1, got {num_processes}")
  if devices_per_process < 1:
    raise common.LaunchError(f"--devices_per_process must be at least 1, got {devices_per_process}")
  if port is not None and not 0 < port < 65536:
    raise common.LaunchError(f"--port must be in 1..65535, got {port}")
  base_env = os.environ if base_env is None else base_env
  port = free_port(host) if port is None else port
  env = {"XLA_FLAGS": xla_flags(devices_per_process, base_env.get("XLA_FLAGS")),
         "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  commands = []
  for i in range(num_processes):
    flags = [f"--coordinator_address={host}:{port}", f"--num_processes={num_processes}",
             f"--process_id={i}"]
    argv = common.main_command(config, workdir, mode=mode, overrides=overrides, python=python,
                               flags=flags)
    commands.append((argv, dict(env)))
  return commands


@dataclasses.dataclass
class Outcome:
  codes: list[int]              # one per process; negative: killed by that signal
  first_failure: int | None     # index of the first process seen to fail
  timed_out: bool = False


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
  """Sends `sig` to the process group the launcher started for `proc` (its children too)."""
  if proc.poll() is None:
    try:
      os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
      pass


def _pump(index: int, pipe, out: TextIO, lock: threading.Lock) -> None:
  prefix = f"[process {index}] "
  for raw in iter(pipe.readline, b""):
    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    with lock:
      out.write(prefix + line + "\n")
      out.flush()
  pipe.close()


def supervise(commands: Sequence[Command], *, out: TextIO | None = None,
              grace_seconds: float = 10.0, timeout: float | None = None,
              poll_seconds: float = 0.05) -> Outcome:
  """Runs the commands together and waits for all of them (see the module docstring)."""
  out = out or sys.stdout
  lock = threading.RLock()  # re-entrant: a signal handler may run while the main thread holds it
  procs: list[subprocess.Popen] = []
  threads: list[threading.Thread] = []
  stop_at: float | None = None      # when the survivors get SIGKILL
  state = {"signals": 0}

  def stop_all(sig: int, why: str, kill_later: bool = True) -> None:
    nonlocal stop_at
    with lock:
      out.write(f"[launch] {why}\n")
      out.flush()
    for p in procs:
      _signal_group(p, sig)
    if kill_later and stop_at is None:
      stop_at = time.monotonic() + grace_seconds

  def forward(signum, frame):  # pylint: disable=unused-argument
    state["signals"] += 1
    sig = signum if state["signals"] == 1 else signal.SIGKILL
    # No SIGKILL deadline here: on SIGTERM the trainer saves a checkpoint, which takes its time.
    stop_all(sig, f"got {signal.Signals(signum).name}: sending {signal.Signals(sig).name} "
                  f"to every process", kill_later=False)

  in_main_thread = threading.current_thread() is threading.main_thread()
  previous = {}
  if in_main_thread:
    for sig in (signal.SIGINT, signal.SIGTERM):
      previous[sig] = signal.signal(sig, forward)
  first_failure = None
  timed_out = False
  try:
    for i, (argv, env_overrides) in enumerate(commands):
      env = dict(os.environ)
      env.update(env_overrides)
      p = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, start_new_session=True)
      procs.append(p)
      t = threading.Thread(target=_pump, args=(i, p.stdout, out, lock), daemon=True)
      t.start()
      threads.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
      codes = [p.poll() for p in procs]
      if first_failure is None:
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
          first_failure = failed[0]
          # After a forwarded signal every process is stopping already (and saving: no SIGKILL).
          if any(c is None for c in codes) and not state["signals"]:
            stop_all(signal.SIGTERM, f"process {first_failure} exited with status "
                                     f"{codes[first_failure]}: stopping the others")
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      if deadline is not None and now > deadline and not timed_out:
        timed_out = True
        stop_all(signal.SIGTERM, f"timeout after {timeout} s: stopping every process")
      if stop_at is not None and now > stop_at:
        for p in procs:
          _signal_group(p, signal.SIGKILL)
      time.sleep(poll_seconds)
  finally:
    for p in procs:               # only if something above raised
      _signal_group(p, signal.SIGKILL)
    for p in procs:
      p.wait()
    for t in threads:
      t.join(timeout=5)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  return Outcome([p.returncode for p in procs], first_failure, timed_out)


def run(commands: Sequence[Command], *, out: TextIO | None = None, grace_seconds: float = 10.0,
        timeout: float | None = None) -> list[int]:
  """Runs [(argv, env_overrides)] as one group; returns their exit codes (see the docstring)."""
  return supervise(commands, out=out, grace_seconds=grace_seconds, timeout=timeout).codes


def exit_status(outcome: Outcome) -> int:
  """0, or the first failure's status as a shell reports it (128 + N for signal N)."""
  codes = outcome.codes
  index = outcome.first_failure
  if index is None:
    index = next((i for i, c in enumerate(codes) if c != 0), None)
  if index is None:
    return 0
  code = codes[index]
  return 128 - code if code < 0 else code


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m launch.local", allow_abbrev=False,
      description="Run N processes of msca_jax.main on the local host (CPU, fake devices).",
      epilog="Arguments after -- go to every process, e.g. -- --config.train.num_steps=20")
  common.add_main_flags(p)
  p.add_argument("--num_processes", type=int, default=2, help="processes to start (default 2)")
  p.add_argument("--devices_per_process", type=int, default=1,
                 help="fake CPU devices per process (XLA_FLAGS device count; default 1)")
  p.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
  p.add_argument("--host", default="127.0.0.1", help="coordinator host (default 127.0.0.1)")
  p.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
  p.add_argument("--grace_seconds", type=float, default=10.0,
                 help="after stopping the others with SIGTERM, SIGKILL them this much later")
  p.add_argument("--timeout", type=float, default=None,
                 help="stop every process after this many seconds (default: no limit)")
  common.add_dry_run_flag(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  p = parser()
  args, overrides = common.parse(p, argv)
  try:
    commands = build_commands(args.config, args.workdir, args.num_processes,
                              devices_per_process=args.devices_per_process, port=args.port,
                              host=args.host, mode=args.mode, overrides=overrides,
                              python=args.python)
  except common.LaunchError as e:
    p.error(str(e))
  for argv_i, env in commands:
    print(common.format_command(argv_i, env), flush=True)
  if args.dry_run:
    return 0
  outcome = supervise(commands, grace_seconds=args.grace_seconds, timeout=args.timeout)
  status = exit_status(outcome)
  print(f"[launch] exit codes {outcome.codes}", flush=True)
  return status


if __name__ == "__main__":
  sys.exit(main())
