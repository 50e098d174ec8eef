"""Checkpoints with orbax: the train state, each process's input-stream state, and metadata.

Orbax writes a step into a temporary directory and renames it when complete, so a kill during a
save leaves the previous step as the latest usable one. Restoring goes through an abstract
target that carries the *current* shardings, so a checkpoint moves between meshes and device
counts.

Integrity: before a step's directory is renamed into place, process 0 records the size and
SHA-256 of every file in it but orbax's bookkeeping (DIGESTS, in the step directory). It does so
in orbax's finalisation, after every process has written its shards, so one writer sees the whole
directory and a finished step always carries its digests. Resuming verifies the latest step against them; a
damaged step is set aside (renamed) and the newest intact one is used. A failed save (read-only
directory, no space left, a permission change) raises SaveError with one line naming the cause.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging as std_logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msca_jax.data.errors import SKIP_REASONS
from msca_jax.data.pipeline import StreamState

# One row per process in the 'streams' item. Positions are int64 (a record stream's position
# carries its epoch in the high bits) and JAX arrays are int32, so a position is two columns.
# The names are saved in the metadata, so rows written with other columns still read.
STREAM_COLUMNS = ("position_hi", "position_lo") + SKIP_REASONS
_LOW_BITS = 31

DIGESTS = "msca_digests.json"  # in each step directory: {"files": {relative path: [size, sha256]}}
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # where orbax writes a step before renaming it
_CHUNK = 8 << 20
# Orbax's step bookkeeping, rewritten after the digests (commit time); not needed to restore.
_UNDIGESTED = ("_CHECKPOINT_METADATA", "commit_success.txt")


class NoCheckpointError(FileNotFoundError):
  """A directory that should hold a checkpoint holds none."""


class DamagedCheckpointError(OSError):
  """A checkpoint's files differ from the digests recorded when it was written."""

  def __init__(self, path: str, file: str, why: str):
    super().__init__(f"checkpoint {path} is damaged: {file} {why}")
    self.path, self.file, self.why = path, file, why


class SaveError(OSError):
  """A checkpoint could not be written; the previous one is untouched."""


# ------------------------------------------------------------------------------------ digests

def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _files(directory: str) -> list[str]:
  """Paths of the files under `directory`, relative to it, but the digests and orbax's bookkeeping."""
  found = []
  for root, _, names in tf.io.gfile.walk(directory):
    rel = os.path.relpath(root, directory)
    found.extend(name if rel == "." else os.path.join(rel, name) for name in names)
  return sorted(f for f in found if f not in _UNDIGESTED and not f.startswith(DIGESTS))


def write_digests(step_dir: str) -> None:
  """Records the size and SHA-256 of every file under `step_dir` in step_dir/DIGESTS."""
  files = {rel: [tf.io.gfile.stat(os.path.join(step_dir, rel)).length,
                 _sha256(os.path.join(step_dir, rel))] for rel in _files(step_dir)}
  path = os.path.join(step_dir, DIGESTS)
  with tf.io.gfile.GFile(path + ".tmp", "w") as f:
    f.write(json.dumps({"algorithm": "sha256", "files": files}, indent=0))
  tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def verify_step(directory: str, step: int | None = None) -> bool:
  """Checks a step's files against its digests: True if they match, False if it has none.

  `directory` is a step directory, or a checkpoints directory with `step`. A step without
  digests was written by an older version or another tool (e.g. tools.convert_torch) and
  cannot be checked. Raises DamagedCheckpointError naming the first file that differs.
  """
  path = directory if step is None else os.path.join(directory, str(step))
  record_path = os.path.join(path, DIGESTS)
  if not tf.io.gfile.exists(record_path):
    return False
  try:
    with tf.io.gfile.GFile(record_path, "rb") as f:
      files = json.loads(f.read())["files"]
  except (ValueError, KeyError, UnicodeDecodeError) as e:
    raise DamagedCheckpointError(path, DIGESTS, f"cannot be read ({type(e).__name__})") from None
  for rel, (size, sha256) in sorted(files.items()):
    full = os.path.join(path, rel)
    if not tf.io.gfile.exists(full):
      raise DamagedCheckpointError(path, rel, "is missing")
    actual = tf.io.gfile.stat(full).length
    if actual != size:
      raise DamagedCheckpointError(path, rel, f"has {actual} bytes, {size} were written")
    if _sha256(full) != sha256:
      raise DamagedCheckpointError(path, rel, "has other contents than were written (SHA-256 differs)")
  return True


# ------------------------------------------------------------------------------------ save errors

_STATUS_WORDS = {  # tensorstore / gRPC status codes in an error's text, as a cause a user acts on
    "RESOURCE_EXHAUSTED": "no space left or quota exceeded",
    "PERMISSION_DENIED": "permission denied",
    "UNAUTHENTICATED": "not authenticated",
}


def failure_reason(error: BaseException) -> str:
  """The root cause of a failed save in a few words: 'read-only file system', 'no space left ...'."""
  seen, chain = set(), []
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  for e in chain:
    if isinstance(e, OSError) and e.errno:
      where = f" ({e.filename})" if e.filename else ""
      return os.strerror(e.errno).lower() + where
  text = "\n".join(str(e) for e in chain)
  for word, reason in _STATUS_WORDS.items():
    if word in text:
      return f"{reason} ({word})"
  for code, reason in ((errno.ENOSPC, "No space left"), (errno.EROFS, "Read-only file system"),
                       (errno.EACCES, "Permission denied")):
    if reason in text:
      return os.strerror(code).lower()
  first = next((line.strip() for line in str(chain[-1]).splitlines() if line.strip()), "")
  return f"{type(chain[-1]).__name__}: {first}" if first else type(chain[-1]).__name__


def _from_orbax(exc_value: BaseException | None, tb) -> bool:
  """An exception of orbax's write machinery: raised in orbax's code, or tensorstore completing a
  write into the event loop orbax has closed after a failure ('Event loop is closed')."""
  if isinstance(exc_value, RuntimeError) and "Event loop is closed" in str(exc_value):
    return True
  tb = tb if tb is not None else getattr(exc_value, "__traceback__", None)
  return tb is not None and any("/orbax/" in frame.filename for frame in traceback.extract_tb(tb))


class _SaveNoise(std_logging.Filter):
  """What orbax's threads print about a failing save, held back: SaveError reports the cause once.

  When a save fails (a full disk), orbax's threads log the storage error many times (each
  signalling thread, the commit, the finalisation) before the failure reaches the caller;
  tensorstore's writes that complete after orbax closed its event loop raise 'Event loop is
  closed'; and asyncio logs every other failed write task ('Task exception was never retrieved',
  a traceback each) when the loop is collected, usually at exit. While a save is in flight all of
  that is held (orbax's error lines without their tracebacks, as always) and let through once
  the save has finished well; after a failure it is dropped until the process ends, or until a
  new Checkpointer starts. Installed as a filter on absl's logger (orbax logs there) and
  asyncio's, and around sys.excepthook, threading.excepthook and sys.unraisablehook.
  """

  def __init__(self):
    super().__init__()
    self._lock = threading.Lock()
    self._held: list[Callable[[], None]] = []
    self.holding = False
    self.dropping = False
    self._hooked = False

  def _keep(self, replay: Callable[[], None]) -> bool:
    """True when the caller should go on as usual; else held (to replay) or dropped."""
    with self._lock:
      if self.dropping:
        return False
      if self.holding:
        self._held.append(replay)
        return False
    return True

  def filter(self, record: std_logging.LogRecord) -> bool:
    if getattr(record, "msca_released", False) or record.levelno < std_logging.ERROR:
      return True
    if "/orbax/" in record.pathname:
      record.exc_info, record.exc_text = None, None
    elif not (record.name == "asyncio" and ("/orbax/" in record.getMessage() or (
        record.exc_info and _from_orbax(record.exc_info[1], record.exc_info[2])))):
      return True

    def replay(record=record):
      record.msca_released = True
      std_logging.getLogger(record.name).handle(record)
    return self._keep(replay)

  def install(self) -> None:
    logging.get_absl_logger().addFilter(self)   # adding a filter twice adds it once
    std_logging.getLogger("asyncio").addFilter(self)
    if self._hooked:
      return
    self._hooked = True
    previous_except, previous_thread, previous_unraisable = (
        sys.excepthook, threading.excepthook, sys.unraisablehook)

    def except_hook(kind, value, tb):
      if not _from_orbax(value, tb) or self._keep(lambda: previous_except(kind, value, tb)):
        previous_except(kind, value, tb)

    def thread_hook(args):
      if not _from_orbax(args.exc_value, args.exc_traceback) or self._keep(
          lambda: previous_thread(args)):
        previous_thread(args)

    def unraisable_hook(unraisable):
      if not _from_orbax(unraisable.exc_value, unraisable.exc_traceback) or self._keep(
          lambda: previous_unraisable(unraisable)):
        previous_unraisable(unraisable)

    sys.excepthook, threading.excepthook, sys.unraisablehook = except_hook, thread_hook, unraisable_hook

  def hold(self) -> None:
    with self._lock:
      self.holding = True

  def release(self) -> None:
    with self._lock:
      held, self._held, self.holding = self._held, [], False
    for replay in held:
      replay()

  def drop(self) -> None:
    with self._lock:
      self._held, self.holding, self.dropping = [], False, True

  def reset(self) -> None:
    self.release()
    with self._lock:
      self.dropping = False


_SAVE_NOISE = _SaveNoise()


# ------------------------------------------------------------------------------------ finite state

@jax.jit
def _all_finite(parts: dict) -> dict:
  def finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
  return {name: finite(tree) for name, tree in parts.items()}


def nonfinite_parts(state: Any) -> list[str]:
  """Which of the state's 'params' and 'opt_state' hold a NaN or Inf (reduced on the devices)."""
  parts = {name: getattr(state, name) for name in ("params", "opt_state")
           if getattr(state, name, None) is not None}
  finite = jax.device_get(_all_finite(parts))
  return [name for name in parts if not finite[name]]


def _agreed(value: int) -> int:
  """Process 0's value on every process (a decision made once, from one reading of the files)."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class Checkpointer:
  """Periodic, final and on-signal saves into `directory`; resume from the latest step."""

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int = 3,
               async_save: bool = True):
    self.directory = directory
    self._async = async_save
    self._saving: int | None = None  # the step whose save is in flight
    self._failed = False
    # Directories created in save() itself, so that a read-only or full directory fails there:
    # created asynchronously, a failure leaves orbax's threads waiting for the directory.
    # Always orbax's asynchronous checkpointer (its finalisation writes the digests); a
    # synchronous save waits for it.
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_interval_steps), max_to_keep=max_to_keep,
        enable_async_checkpointing=True, create=True,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False,
                                       post_finalization_callback=self._finalised))
    _SAVE_NOISE.install()
    _SAVE_NOISE.reset()
    try:
      # Handlers named up front, so that item_metadata can describe a checkpoint before restoring.
      self.manager = ocp.CheckpointManager(directory, options=options, item_handlers={
          "state": ocp.StandardCheckpointHandler(), "streams": ocp.StandardCheckpointHandler(),
          "metadata": ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise SaveError(f"checkpoint directory {directory} cannot be used: {failure_reason(e)}") from e

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _finalised(self) -> None:
    """Orbax's hook on process 0 once every process wrote the step, before its rename."""
    if self._saving is None:
      return
    final = os.path.join(self.directory, str(self._saving))
    tmp = final + _TMP_SUFFIX  # absent where orbax writes in place (object stores)
    write_digests(tmp if tf.io.gfile.isdir(tmp) else final)

  def _raise_save_error(self, step: int | None, error: BaseException):
    self._failed = True
    _SAVE_NOISE.drop()
    what = f"checkpoint save to {self.directory}" + (f" (step {step})" if step is not None else "")
    raise SaveError(f"{what} failed: {failure_reason(error)}; the previous checkpoint "
                    f"({self.last_finished()}) is intact") from error

  def last_finished(self) -> str:
    """'step N' of the newest finished checkpoint, 'none', or 'unknown' when storage fails."""
    try:
      self.manager.reload()
      step = self.manager.latest_step()
    except Exception:  # pylint: disable=broad-except  # the storage is failing: say so, not more
      return "unknown"
    return "none" if step is None else f"step {step}"

  def save(self, step: int, state: Any, streams: jax.Array, metadata: dict, *, force: bool = False) -> bool:
    """Saves if the interval says so (or `force`); returns whether a save started.

    Raises SaveError if this save, or the previous asynchronous one, failed.
    """
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              streams=ocp.args.StandardSave({"streams": streams}),
                              metadata=ocp.args.JsonSave(dict(metadata, stream_columns=STREAM_COLUMNS)))
    # The finalisation hook reads self._saving: the previous save must be over before it changes
    # (orbax waits for it in save() anyway).
    self.wait()
    try:
      if not (force or self.manager.should_save(step)):
        return False
      self._saving = step
      _SAVE_NOISE.hold()
      started = self.manager.save(step, args=args, force=force)
      if started and not self._async:
        self.manager.wait_until_finished()
        self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(self._saving, e)
    return started

  def restore(self, step: int, abstract_state: Any, mesh: Mesh) -> tuple[Any, list[StreamState], dict]:
    """(state with the abstract target's shardings, per-process stream states, metadata)."""
    # One row per process that wrote the checkpoint, which may be another number than now.
    written = self.manager.item_metadata(step)["streams"]["streams"].shape
    streams_target = {"streams": jax.ShapeDtypeStruct(
        tuple(written), np.int32, sharding=NamedSharding(mesh, P()))}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        streams=ocp.args.StandardRestore(streams_target),
        metadata=ocp.args.JsonRestore()))
    rows = np.asarray(jax.device_get(restored["streams"]["streams"])).astype(np.int64)
    metadata = dict(restored["metadata"])
    columns = metadata.pop("stream_columns", None)
    return restored["state"], [_stream_state(row, columns) for row in rows], metadata

  def latest_intact_step(self) -> int | None:
    """The newest step whose files match their digests, setting damaged newer ones aside.

    Damaged steps newer than it are renamed to damaged-STEP-TIME (kept for inspection, out of
    orbax's sight, so that training can save those steps again), each named in a warning with the
    file and why. A step without digests is taken as it is. If every step is damaged, nothing is
    moved and DamagedCheckpointError says so: starting afresh is the user's decision.
    """
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = ""
      if jax.process_index() == 0:  # one reading of the files decides for every process
        try:
          verify_step(self.directory, step)
        except DamagedCheckpointError as e:
          problem = f"{e.file} {e.why}"
      if _agreed(int(bool(problem))):
        damaged.append((step, problem or "damaged (process 0 says)"))
        continue
      for bad, why in damaged:
        aside = os.path.join(self.directory, f"damaged-{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
        if jax.process_index() == 0:
          logging.warning("checkpoint step %d in %s is damaged: %s; moved to %s, resuming from "
                          "step %d", bad, self.directory, why, aside, step)
          tf.io.gfile.rename(os.path.join(self.directory, str(bad)), aside)
      if damaged:
        if jax.process_count() > 1:
          multihost_utils.sync_global_devices("msca_jax_damaged_steps_set_aside")
        self.manager.reload()
      return step
    if damaged:
      raise DamagedCheckpointError(
          self.directory, "every step", "differs from its digests (" +
          "; ".join(f"step {bad}: {why}" for bad, why in damaged) + "); move them away to start afresh")
    return None

  def wait(self) -> None:
    """Waits for the save in flight; raises SaveError if it failed."""
    try:
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_save_error(self._saving, e)
    _SAVE_NOISE.release()   # no failure: what orbax logged meanwhile was about something else

  def close(self) -> None:
    """Waits for the save in flight and closes; after a reported failure, closes quietly."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except
        if not self._failed:
          self._raise_save_error(self._saving, e)
      if not self._failed:
        _SAVE_NOISE.release()


def _stream_state(row: np.ndarray, columns: list[str] | None) -> StreamState:
  if columns is None:  # written before the columns were named: position, then four reasons
    return StreamState(int(row[0]), tuple(int(x) for x in row[1:]))
  values = dict(zip(columns, (int(x) for x in row)))
  position = (values.pop("position_hi") << _LOW_BITS) | values.pop("position_lo")
  return StreamState(position, tuple(values.get(reason, 0) for reason in SKIP_REASONS))


def streams_array(local: StreamState, mesh: Mesh) -> jax.Array:
  """Every process's StreamState as one replicated (process_count, len(STREAM_COLUMNS)) array.

  Each process only knows its own row; they are gathered so that any process count can resume
  (each process takes its row back).
  """
  position = int(local.position)
  row = np.array([[position >> _LOW_BITS, position & ((1 << _LOW_BITS) - 1), *local.skipped]],
                 np.int32)
  rows = multihost_utils.process_allgather(row) if jax.process_count() > 1 else row
  rows = np.asarray(rows).reshape(jax.process_count(), -1)
  return jax.device_put(rows, NamedSharding(mesh, P()))


class StopSignal:
  """Turns SIGTERM (preemption, scancel, kill) and SIGINT (Ctrl-C) into a flag the train loop checks.

  The loop saves and stops at the next step; a second signal only logs, so the save in flight is
  never cut short.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self.signal_name = ""
    self.signum = 0
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set():
      logging.warning("%s: already stopping, waiting for the save", signal.Signals(signum).name)
      return
    self.signal_name = signal.Signals(signum).name
    self.signum = signum
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  @property
  def exit_status(self) -> int:
    """128 + the signal's number, as a shell reports a process the signal ended: 143 or 130."""
    return 128 + (self.signum or signal.SIGTERM)

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
