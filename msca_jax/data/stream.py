"""The input layer's contract with the trainer, the evaluator and `predict`.

A stream owns everything about batches that is not the model's business:
  * the batch layout: every field's per-example shape and dtype, and whether it goes to the
    devices or stays on the host, declared once beside the code that makes the batches
    (`pipeline.train_fields`, `pipeline.eval_fields`) and checked here;
  * padding and masks, and the lockstep that keeps every process at every evaluation step;
  * the video keys and error codes, which stay on the host (`EvalStream.gather_host` brings the
    other processes' rows to every process, for the reports);
  * the resume state and skip counts (`TrainStream.state`, `resume_state`);
  * the dataset's decode settings (`stream.source.decode`), recorded when the data was prepared.

Each batch arrives as `Batch(device=..., host=...)`: the trainer puts `device` on the mesh and
keeps `host` for its bookkeeping. Adding a field to the batches is a change in pipeline.py alone
(declare it, produce it); the trainer, the evaluator and predict pass `device` on whole.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator, Sequence

import numpy as np

from msca_jax.data import pipeline, sources
from msca_jax.data.pipeline import Field, StreamState, eval_fields, train_fields  # noqa: F401

KEY_BYTES = 256  # keys cross processes as fixed-width bytes (longer keys are cut)


@dataclasses.dataclass
class Batch:
  device: dict[str, np.ndarray]   # what the jitted step receives (this process's share)
  host: dict[str, np.ndarray]     # bookkeeping that never leaves the host


def _np_dtype(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return object if dtype == "bytes" else np.dtype(dtype)


def zeros(fields: Sequence[Field], batch_size: int) -> Batch:
  """An all-padding batch of the layout (mask 0)."""
  def zero(f: Field):
    if f.dtype == "bytes":
      return np.array([b""] * batch_size, dtype=object)
    return np.zeros((batch_size,) + f.shape, _np_dtype(f.dtype))
  return Batch(device={f.name: zero(f) for f in fields if f.device},
               host={f.name: zero(f) for f in fields if not f.device})


def _split(fields: Sequence[Field], batch: dict, batch_size: int, where: str) -> Batch:
  """A pipeline batch as Batch, checked against the layout (a mismatch is our bug: say which)."""
  names = {f.name for f in fields}
  if set(batch) != names:
    raise AssertionError(f"{where}: the pipeline's fields {sorted(batch)} differ from the layout "
                         f"{sorted(names)} (msca_jax/data/stream.py)")
  for f in fields:
    value = batch[f.name]
    expected = (batch_size,) + f.shape
    if value.shape != expected or (f.dtype != "bytes" and value.dtype != _np_dtype(f.dtype)):
      raise AssertionError(f"{where}: field {f.name!r} is {value.dtype}{list(value.shape)}, the "
                           f"layout says {f.dtype}{list(expected)} (msca_jax/data/stream.py)")
  return Batch(device={f.name: batch[f.name] for f in fields if f.device},
               host={f.name: batch[f.name] for f in fields if not f.device})


def training_window(data, source: sources.Source) -> int | None:
  """The padded crop-window side of training batches when the device finishes the views, else None."""
  if not pipeline.augments_on_device(data):
    return None
  return pipeline.device_window(data, sources.stored_short_side(source))


def model_inputs(data, window: int | None) -> Callable[[dict], object]:
  """batch -> the model's video, called inside the jitted train step.

  With `window` (training_window: the device path) the batch holds the clips' decoded crop
  windows and their views: this resizes, flips and colours them (device_augment.py) and maps
  them to [-1, 1]. Otherwise the batch's video goes to the model as it is (the model maps uint8
  pixels itself).
  """
  if window is None:
    return lambda batch: batch["video"]
  from msca_jax.data import device_augment
  size = data.image_size

  def inputs(batch: dict):
    views = device_augment.train_views(batch["video"], batch["window"], batch["flip"],
                                       batch["color"], size)
    return views * 2.0 - 1.0
  return inputs


def resume_state(source: sources.Source, saved: Sequence[StreamState], process_index: int,
                 process_count: int) -> StreamState:
  """This process's state from the states every process saved (possibly another count of them).

  The same count resumes exactly. Another count continues where the stream as a whole was: a
  frame-folder stream at the first global position not yet read by every process (a few clips
  may be seen twice), a record stream at the earliest saved epoch (its files are split anew).
  """
  if len(saved) == process_count:
    return saved[process_index]
  position = source.resume_position([s.position for s in saved], process_index, process_count)
  return StreamState(position=position)


class TrainStream:
  """This process's endless training batches, and where they stand.

  `state` is the StreamState after the last batch handed out: save it with the model state and
  pass it back to continue the same stream.
  """

  def __init__(self, source: sources.Source, data, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1,
               state: StreamState = StreamState(), num_epochs: int | None = None):
    self.source = source
    self.batch_size = batch_size
    self.fields = train_fields(data, training_window(data, source))
    self.state = state
    self._batches = pipeline.as_numpy(pipeline.train_dataset(
        source, data, batch_size=batch_size, seed=seed, process_index=process_index,
        process_count=process_count, state=state, num_epochs=num_epochs))
    self._checked = False

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    batch = next(self._batches)
    if not self._checked:  # the layout is a static property of the dataset: check it once
      _split(self.fields, batch, self.batch_size, "training batch")
      self._checked = True
    self.state = StreamState.after(batch)
    return Batch(device={f.name: batch[f.name] for f in self.fields if f.device},
                 host={f.name: batch[f.name] for f in self.fields if not f.device})


class EvalStream:
  """One exact pass over a split: every video once, in batches of all its views.

  Every process yields the same number of batches: one whose own videos are done feeds masked
  padding until all are (`lockstep`), because the jitted step needs every process at every call.
  """

  def __init__(self, source: sources.Source, data, *, batch_size: int, num_clips: int,
               num_crops: int, process_index: int = 0, process_count: int = 1):
    self.source = source
    self.batch_size = batch_size
    self.process_count = process_count
    self.num_views = num_clips * num_crops
    self.fields = eval_fields(data, self.num_views)
    self.num_videos = source.num_records
    self._dataset = pipeline.eval_dataset(
        source, data, batch_size=batch_size, num_clips=num_clips, num_crops=num_crops,
        process_index=process_index, process_count=process_count)

  @property
  def num_batches(self) -> int:
    """Batches of the slowest process: what every process runs."""
    return math.ceil(math.ceil(self.num_videos / self.process_count) / self.batch_size)

  def __iter__(self) -> Iterator[Batch]:
    local = (_split(self.fields, b, self.batch_size, "evaluation batch")
             for b in pipeline.as_numpy(self._dataset))
    if self.process_count == 1:
      yield from local
      return
    from jax.experimental import multihost_utils
    padding = zeros(self.fields, self.batch_size)
    while True:
      batch = next(local, None)
      if not multihost_utils.process_allgather(np.array(batch is not None)).any():
        return
      yield padding if batch is None else batch

  def gather_host(self, host: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Every process's host fields, in the global batch's row order.

    `rows[p, i]` is the global row of process p's local row i (train/mesh.process_rows); with
    one process the fields are returned as they are.
    """
    if self.process_count == 1:
      return host
    from jax.experimental import multihost_utils
    out = {}
    for name, value in host.items():
      encoded = encode_keys(value) if value.dtype == object else value
      gathered = np.asarray(multihost_utils.process_allgather(encoded))  # (P, B, ...)
      flat = np.empty((gathered.shape[0] * gathered.shape[1],) + gathered.shape[2:], gathered.dtype)
      order = rows if rows is not None else np.arange(flat.shape[0]).reshape(gathered.shape[:2])
      flat[order.reshape(-1)] = gathered.reshape((-1,) + gathered.shape[2:])
      out[name] = decode_keys(flat) if value.dtype == object else flat
    return out


def encode_keys(keys: np.ndarray) -> np.ndarray:
  """bytes keys -> (B, KEY_BYTES) uint8, so they can be gathered across processes."""
  out = np.zeros((len(keys), KEY_BYTES), np.uint8)
  for i, key in enumerate(keys):
    raw = bytes(key)[:KEY_BYTES]
    out[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def decode_keys(rows: np.ndarray) -> np.ndarray:
  return np.array([bytes(row).rstrip(b"\0") for row in np.asarray(rows)], dtype=object)
