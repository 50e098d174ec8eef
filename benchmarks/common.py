"""What the input benchmarks measure about this process: bytes read, CPU time, cores, and how to
confine the process (and tf.data) to one core. Shared by input_benchmark and layout_benchmark."""

from __future__ import annotations

import contextlib
import os
import time

import tensorflow as tf


def io_counters() -> dict[str, int]:
  """/proc/self/io: rchar (bytes returned by read calls, page cache or not) and read_bytes (bytes
  fetched from storage for this process, readahead included). Zeros where it is not available."""
  try:
    with open("/proc/self/io") as f:
      values = dict(line.split(":") for line in f if ":" in line)
    return {"rchar": int(values["rchar"]), "read_bytes": int(values["read_bytes"])}
  except (OSError, KeyError, ValueError):
    return {"rchar": 0, "read_bytes": 0}


def cpu_seconds() -> float:
  return time.process_time()  # every thread of the process, user + system


def num_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _tasks() -> list[int]:
  try:
    return [int(t) for t in os.listdir("/proc/self/task")]
  except OSError:
    return [0]


@contextlib.contextmanager
def one_core():
  """Pins every thread of this process (and those they start) to one CPU; yields a function that
  pins threads started since (e.g. a reader's thread pool). Restores the affinity on exit."""
  if not hasattr(os, "sched_setaffinity"):
    yield lambda: None
    return
  original = os.sched_getaffinity(0)
  cpu = {min(original)}

  def pin():
    for tid in _tasks():
      with contextlib.suppress(OSError):
        os.sched_setaffinity(tid, cpu)
  pin()
  try:
    yield pin
  finally:
    for tid in _tasks():
      with contextlib.suppress(OSError):
        os.sched_setaffinity(tid, original)


def single_core(ds: tf.data.Dataset) -> tf.data.Dataset:
  """tf.data's own threads: one (a private pool of one thread, no intra-op parallelism)."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)
