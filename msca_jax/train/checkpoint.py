"""Checkpoints with orbax: the train state, each process's input-stream state, and metadata.

Orbax writes a step into a temporary directory and renames it when complete, so a kill during a
save leaves the previous step as the latest usable one. Restoring goes through an abstract
target that carries the *current* shardings, so a checkpoint moves between meshes and device
counts.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msca_jax.data.errors import SKIP_REASONS
from msca_jax.data.pipeline import StreamState

# One row per process in the 'streams' item. Positions are int64 (a record stream's position
# carries its epoch in the high bits) and JAX arrays are int32, so a position is two columns.
# The names are saved in the metadata, so rows written with other columns still read.
STREAM_COLUMNS = ("position_hi", "position_lo") + SKIP_REASONS
_LOW_BITS = 31


class Checkpointer:
  """Periodic, final and on-signal saves into `directory`; resume from the latest step."""

  def __init__(self, directory: str, *, save_interval_steps: int, max_to_keep: int = 3,
               async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, save_interval_steps), max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save, create=True)
    # Handlers named up front, so that item_metadata can describe a checkpoint before restoring.
    self.manager = ocp.CheckpointManager(directory, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "streams": ocp.StandardCheckpointHandler(),
        "metadata": ocp.JsonCheckpointHandler()})
    self.directory = directory

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, streams: jax.Array, metadata: dict, *, force: bool = False) -> bool:
    """Saves if the interval says so (or `force`); returns whether a save started."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              streams=ocp.args.StandardSave({"streams": streams}),
                              metadata=ocp.args.JsonSave(dict(metadata, stream_columns=STREAM_COLUMNS)))
    return self.manager.save(step, args=args, force=force)

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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


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
  """Turns SIGTERM (preemption, scancel, kill) into a flag the train loop checks every step."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self.signal_name = ""
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
