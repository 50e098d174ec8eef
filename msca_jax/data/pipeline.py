"""tf.data assembly: this host's files -> records -> clips -> batches of numpy arrays.

Training (an endless, reproducible stream):
  files (shuffled every epoch) -> parallel interleave -> large record shuffle -> enumerate
  -> parallel decode + augment (each record guarded) -> count and drop bad records -> batch

Evaluation (one exact pass):
  files in order -> records -> parallel decode of clips x crops views -> batch, with the last
  batch padded and a mask; a bad record stays in the batch with mask 0, so the number of batches
  only depends on the number of records.

Bad records never stop a run and never reach the model. Each record is processed inside its own
one-element dataset with errors ignored and a fallback behind it, so a failure anywhere in
parsing, decoding or augmenting turns into an element with an error code instead of an
exception. The codes are counted in the stream itself (`StreamState.skipped`, exact and part of
the checkpointable input state) and the eval batches carry them per video.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf

from msca_jax.data import augment, sampling, sources
from msca_jax.data.dmvr import DataError
from msca_jax.data.sources import Source

# Error codes: 0 is a good record, i + 1 is SKIP_REASONS[i].
SKIP_REASONS = ("corrupt_shard", "undecodable", "label_out_of_range", "no_frames")
_CORRUPT, _UNDECODABLE, _LABEL, _NO_FRAMES = range(1, len(SKIP_REASONS) + 1)
DTYPES = {"float32": tf.float32, "bfloat16": tf.bfloat16}


@dataclasses.dataclass(frozen=True)
class StreamState:
  """Where a process's training stream stands: records consumed and records skipped by reason.

  Saved with a checkpoint, it lets a resumed run continue the same stream (exactly, when
  config.data.deterministic is on) without re-reading the data it had already used.
  """
  position: int = 0
  skipped: tuple[int, ...] = (0,) * len(SKIP_REASONS)

  @classmethod
  def after(cls, batch: dict) -> "StreamState":
    """The state once `batch` (a numpy training batch) has been consumed."""
    return cls(position=int(batch["index"].max()) + 1,
               skipped=tuple(int(n) for n in batch["skipped"].max(axis=0)))

  def skipped_by_reason(self) -> dict[str, int]:
    return dict(zip(SKIP_REASONS, self.skipped))


def train_augment(data) -> augment.TrainAugment:
  return augment.TrainAugment(
      image_size=data.image_size, short_side_range=tuple(data.train_short_side_range),
      flip_prob=data.flip_prob, color_prob=data.color_prob,
      randaugment_layers=data.randaugment_layers, randaugment_magnitude=data.randaugment_magnitude)


def check_config(data) -> None:
  """Configuration mistakes fail here, at start-up, naming the field."""
  if data.sampling not in sampling.SAMPLINGS:
    raise DataError(f"config.data.sampling must be one of {sampling.SAMPLINGS}, got {data.sampling!r}")
  if data.num_frames < 1 or data.stride < 1:
    raise DataError(f"config.data.num_frames and config.data.stride must be >= 1, got "
                    f"{data.num_frames} and {data.stride}")
  if data.dtype not in DTYPES:
    raise DataError(f"config.data.dtype must be one of {sorted(DTYPES)}, got {data.dtype!r}")
  for field in ("eval_crops", "val_crops"):
    if data[field] not in augment.CROP_POSITIONS:
      raise DataError(f"config.data.{field} must be 1 or 3, got {data[field]}")
  for field in ("eval_clips", "val_clips"):
    if data[field] < 1:
      raise DataError(f"config.data.{field} must be >= 1, got {data[field]}")
  if data.eval_short_side < data.image_size:
    raise DataError(f"config.data.eval_short_side ({data.eval_short_side}) must be at least the "
                    f"crop size config.data.image_size ({data.image_size})")
  if data.mixup_alpha < 0 or data.cutmix_alpha < 0:
    raise DataError("config.data.mixup_alpha and cutmix_alpha must be >= 0")
  try:
    train_augment(data)
  except ValueError as e:
    raise DataError(str(e)) from e


def _options(deterministic: bool) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = deterministic
  options.autotune.enabled = True
  options.experimental_optimization.map_parallelization = True
  options.experimental_optimization.parallel_batch = True
  options.experimental_warm_start = True
  return options


def _records(files: list[str], shuffle_seed: int | None, repeat: bool, deterministic: bool,
             num_epochs: int | None = None) -> tf.data.Dataset:
  """{'record', 'corrupt'} from the files, interleaved; shuffled per epoch when a seed is given."""
  sizes = sources.file_sizes(files)
  ds = tf.data.Dataset.from_tensor_slices((files, tf.constant(sizes, tf.int64)))
  if shuffle_seed is not None:
    ds = ds.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat(num_epochs)
  return ds.interleave(sources.read_records, cycle_length=min(len(files), 16), block_length=1,
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)


def _guarded(process, fallback, deterministic: bool):
  """Maps `process` over a dataset; an element whose processing raises becomes `fallback(e)`."""
  def one(element):
    done = tf.data.Dataset.from_tensors(element).map(process).ignore_errors()
    return done.concatenate(tf.data.Dataset.from_tensors(element).map(fallback)).take(1)

  def apply(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.interleave(one, cycle_length=tf.data.AUTOTUNE, block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return apply


def _checked(element: dict, source: Source, decode, empty: dict) -> dict:
  """Parses a record and runs `decode(frames, label, index)` on it if it passes the cheap checks."""
  def parsed():
    record = source.parse(element["record"])
    frames, label = record["frames"], record["label"]
    error = tf.where(tf.size(frames) == 0, _NO_FRAMES,
                     tf.where((label < 0) | (label >= source.num_classes), _LABEL, 0))
    out = tf.cond(error == 0, lambda: decode(frames, label, element["index"]),
                  lambda: dict(empty, label=tf.constant(0, tf.int32)))
    return dict(out, error=tf.cast(error, tf.int32), key=record["key"])
  out = tf.cond(element["corrupt"],
                lambda: dict(empty, label=tf.constant(0, tf.int32),
                             error=tf.constant(_CORRUPT, tf.int32), key=tf.constant("")),
                parsed)
  return dict(out, index=element["index"])


def _is_good(element: dict) -> tf.Tensor:
  return element["error"] == 0


def _without(field: str):
  def drop(element: dict) -> dict:
    return {k: v for k, v in element.items() if k != field}
  return drop


def train_dataset(source: Source, data, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1, state: StreamState = StreamState(),
                  num_epochs: int | None = None) -> tf.data.Dataset:
  """Endless batches {'video' (B,T,S,S,3), 'label' (B,), 'index', 'skipped' (B,R)} for this host.

  `batch_size` is this process's share of the global batch. With mixup/cutmix on, batches also
  carry 'label_mix' and 'mix_weight' (the weight of 'label').
  """
  check_config(data)
  aug = train_augment(data)
  files = source.files_for_process(process_index, process_count)
  dtype = DTYPES[data.dtype]
  clip_shape = (data.num_frames, data.image_size, data.image_size, 3)
  empty = {"video": tf.zeros(clip_shape, dtype)}
  process_seed = tf.constant([seed, process_index], tf.int64)

  def decode(frames, label, index):
    index_seed = tf.random.experimental.stateless_fold_in(process_seed, index)
    s_sample, s_aug = tf.unstack(tf.random.experimental.stateless_split(index_seed, 2))
    indices = sampling.train_indices(data.sampling, tf.size(frames), data.num_frames, data.stride,
                                     s_sample)
    video = augment.train_clip(tf.gather(frames, indices), s_aug, aug)
    return {"video": tf.cast(tf.ensure_shape(video, clip_shape), dtype),
            "label": tf.cast(label, tf.int32)}

  def process(element):
    out = _checked(element, source, decode, empty)
    del out["key"]
    return out

  def fallback(element):
    return dict(empty, label=tf.constant(0, tf.int32), error=tf.constant(_UNDECODABLE, tf.int32),
                index=element["index"])

  ds = _records(files, shuffle_seed=seed + 1000 * process_index, repeat=True,
                deterministic=data.deterministic, num_epochs=num_epochs)
  ds = ds.shuffle(data.shuffle_buffer, seed=seed + 1000 * process_index + 1)
  ds = ds.enumerate().map(lambda i, e: dict(e, index=i))
  ds = ds.skip(state.position)
  ds = _guarded(process, fallback, data.deterministic)(ds)

  def count(skipped, element):
    skipped = skipped + tf.cast(tf.one_hot(element["error"] - 1, len(SKIP_REASONS)), tf.int64)
    return skipped, dict(element, skipped=skipped)

  ds = ds.scan(tf.constant(state.skipped, tf.int64), count)
  ds = ds.filter(_is_good).map(_without("error"))
  ds = ds.batch(batch_size, drop_remainder=True)
  if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
    # Seeded by the batch's first record position, not a batch counter: a resumed stream (which
    # skips ahead) mixes its batches exactly as the uninterrupted one did.
    ds = ds.map(lambda b: augment.mix_batch(
        b, tf.random.experimental.stateless_fold_in(process_seed + 7, b["index"][0]),
        data.mixup_alpha, data.cutmix_alpha))
  ds = ds.prefetch(data.prefetch)
  return ds.with_options(_options(data.deterministic))


def eval_views(frames: tf.Tensor, data, num_clips: int, num_crops: int) -> tf.Tensor:
  """(clips x crops, T, S, S, 3) evaluation views of one video's JPEG frames, in data.dtype."""
  indices = sampling.eval_indices(data.sampling, tf.size(frames), data.num_frames, data.stride,
                                  num_clips)
  video = augment.eval_views(frames, indices, data.image_size, data.eval_short_side, num_crops)
  return tf.cast(video, DTYPES[data.dtype])


def eval_dataset(source: Source, data, *, batch_size: int, num_clips: int, num_crops: int,
                 process_index: int = 0, process_count: int = 1,
                 num_batches: int | None = None) -> tf.data.Dataset:
  """One pass: {'video' (B,V,T,S,S,3), 'label', 'mask', 'error', 'index', 'key'}, V = clips x crops.

  The last batch is padded with mask 0. With `num_batches`, the stream is padded to exactly that
  many batches (multi-host evaluation needs the same count on every host).
  """
  check_config(data)
  files = source.files_for_process(process_index, process_count)
  dtype = DTYPES[data.dtype]
  views = num_clips * num_crops
  view_shape = (views, data.num_frames, data.image_size, data.image_size, 3)
  empty = {"video": tf.zeros(view_shape, dtype)}

  def decode(frames, label, index):
    del index  # evaluation views are not random
    return {"video": eval_views(frames, data, num_clips, num_crops), "label": tf.cast(label, tf.int32)}

  def fallback(element):
    return dict(empty, label=tf.constant(0, tf.int32), error=tf.constant(_UNDECODABLE, tf.int32),
                index=element["index"], key=tf.constant(""))

  ds = _records(files, shuffle_seed=None, repeat=False, deterministic=True)
  ds = ds.enumerate().map(lambda i, e: dict(e, index=i))
  ds = _guarded(lambda e: _checked(e, source, decode, empty), fallback, deterministic=True)(ds)
  ds = ds.map(lambda e: dict(e, mask=tf.cast(e["error"] == 0, tf.int32), real=tf.constant(1, tf.int32)))
  padding = dict(empty, label=tf.constant(0, tf.int32), error=tf.constant(0, tf.int32),
                 index=tf.constant(-1, tf.int64), key=tf.constant(""),
                 mask=tf.constant(0, tf.int32), real=tf.constant(0, tf.int32))
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.batch(batch_size, drop_remainder=True)
  if num_batches is None:
    ds = ds.take_while(lambda b: b["real"][0] == 1)
  else:
    ds = ds.take(num_batches)
  ds = ds.map(_without("real"))
  return ds.prefetch(data.prefetch).with_options(_options(True))


def as_numpy(ds: tf.data.Dataset) -> Iterator[dict]:
  """Batches as dicts of numpy arrays (bfloat16 through ml_dtypes), ready for JAX."""
  return ds.as_numpy_iterator()


def skip_summary(errors: np.ndarray) -> dict[str, int]:
  """Counts of eval 'error' codes by reason."""
  counts = np.bincount(np.asarray(errors).ravel(), minlength=len(SKIP_REASONS) + 1)
  return {reason: int(counts[i + 1]) for i, reason in enumerate(SKIP_REASONS)}
