"""tf.data assembly: a source's videos -> clips -> batches of numpy arrays.

Training (an endless, reproducible stream, resumable at any position):
  source.train_records (frame folders: positions -> index shuffle; record files: epochs of
  shuffled files through a record buffer) -> parallel open + sample + read + decode + augment
  (each video guarded) -> count and drop bad videos -> batch

Evaluation (one exact pass):
  source.eval_records (in order) -> parallel views of clips x crops -> batch, with the last batch
  padded and a mask; a bad video stays in the batch with mask 0, so the number of batches only
  depends on the number of videos.

Bad videos never stop a run and never reach the model. Each video is processed inside its own
one-element dataset with errors ignored and a fallback behind it, so a failure anywhere in
parsing, reading, decoding or augmenting turns into an element with an error code instead of an
exception. The codes are counted in the stream itself (`StreamState.skipped`, exact and part of
the checkpointable input state) and the eval batches carry them per video.

The clips leave as uint8 pixels by default (config.data.dtype): a quarter of float32's bytes
from the host to the device, and the model normalises them inside the jitted step (float batches
are in [-1, 1]; the model applies config.data.pixel_mean / pixel_std to both).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorflow as tf

from msca_jax.data import augment, errors, sampling, sources
from msca_jax.data.errors import SKIP_REASONS, DataError
from msca_jax.data.sources import Source

DTYPES = {"uint8": tf.uint8, "float32": tf.float32, "bfloat16": tf.bfloat16}


@dataclasses.dataclass(frozen=True)
class StreamState:
  """Where a process's training stream stands: the next element to read and the skips so far.

  Saved with a checkpoint, it lets a resumed run continue the same stream (exactly, when
  config.data.deterministic is on). A frame-folder stream jumps to `position` in constant time;
  a record-file stream re-reads the current epoch up to it (sources.EPOCH_STRIDE).
  """
  position: int = 0
  skipped: tuple[int, ...] = (0,) * len(SKIP_REASONS)

  def __post_init__(self):
    # Checkpoints written before a reason was added hold fewer counts; the new ones start at 0.
    if len(self.skipped) < len(SKIP_REASONS):
      object.__setattr__(self, "skipped", tuple(self.skipped) + (0,) * (len(SKIP_REASONS) - len(self.skipped)))

  @classmethod
  def after(cls, batch: dict) -> "StreamState":
    """The state once `batch` (a numpy training batch) has been consumed."""
    return cls(position=int(batch["index"].max()) + 1,
               skipped=tuple(int(n) for n in batch["skipped"].max(axis=0)))

  def skipped_by_reason(self) -> dict[str, int]:
    return dict(zip(SKIP_REASONS, self.skipped))


@dataclasses.dataclass(frozen=True)
class Field:
  name: str
  shape: tuple[int, ...]     # per example
  dtype: str
  device: bool               # goes to the accelerators (else stays on the host)


AUGMENT_ON = ("auto", "device", "host")


def augments_on_device(data) -> bool:
  """Whether the training views are finished in the train step (config.data.augment_on).

  'auto' does so unless a host-only hook is on: RandAugment and mixup / CutMix work on finished
  clips in tf.data.
  """
  host_only = [name for name, on in (("randaugment_layers", data.randaugment_layers > 0),
                                     ("mixup_alpha", data.mixup_alpha > 0),
                                     ("cutmix_alpha", data.cutmix_alpha > 0)) if on]
  if data.augment_on == "device" and host_only:
    raise DataError(f"config.data.augment_on='device' cannot apply config.data.{host_only[0]}: "
                    "set augment_on to 'auto' or 'host'")
  return data.augment_on != "host" and not host_only


def device_window(data, short_side: int) -> int:
  """The side P that training crop windows are padded to for the device (config.data.device_window).

  A window is at most S * short / lo pixels (S the crop size, lo the smallest random short side,
  short the stored frames' short side), and at most the short side itself.
  """
  if data.device_window:
    return int(data.device_window)
  lo = data.train_short_side_range[0]
  return max(1, min(short_side, -(-data.image_size * short_side // lo)))


def train_fields(data, window: int | None = None) -> tuple[Field, ...]:
  """What a training batch holds; with `window` (the device path), the clips' decoded crop
  windows padded to `window` and the view each gets in the train step (device_augment.py)."""
  if window:
    fields = [Field("video", (data.num_frames, window, window, 3), "uint8", True),
              Field("window", (), "int32", True), Field("flip", (), "int32", True),
              Field("color", (len(augment.COLOR_CHANGES),), "float32", True),
              Field("label", (), "int32", True)]
    return tuple(fields + [Field("index", (), "int64", False),
                           Field("skipped", (len(SKIP_REASONS),), "int64", False)])
  clip = (data.num_frames, data.image_size, data.image_size, 3)
  fields = [Field("video", clip, data.dtype, True), Field("label", (), "int32", True)]
  if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
    fields += [Field("label_mix", (), "int32", True), Field("mix_weight", (), "float32", True)]
  fields += [Field("index", (), "int64", False), Field("skipped", (len(SKIP_REASONS),), "int64", False)]
  return tuple(fields)


def eval_fields(data, num_views: int) -> tuple[Field, ...]:
  """What an evaluation batch holds: every view of each video, a mask, and host bookkeeping."""
  views = (num_views, data.num_frames, data.image_size, data.image_size, 3)
  return (Field("video", views, data.dtype, True), Field("label", (), "int32", True),
          Field("mask", (), "int32", True), Field("error", (), "int32", False),
          Field("index", (), "int64", False), Field("key", (), "bytes", False))


def _blank(fields: tuple[Field, ...], names: tuple[str, ...]) -> dict[str, tf.Tensor]:
  """Per-example zeros of the named fields: what a skipped video or a padding row carries."""
  return {f.name: tf.zeros(f.shape, DTYPES.get(f.dtype, tf.as_dtype(f.dtype)))
          for f in fields if f.name in names}


def train_augment(data) -> augment.TrainAugment:
  return augment.TrainAugment(
      image_size=data.image_size, short_side_range=tuple(data.train_short_side_range),
      flip_prob=data.flip_prob, color_prob=data.color_prob,
      randaugment_layers=data.randaugment_layers, randaugment_magnitude=data.randaugment_magnitude)


def check_config(data) -> None:
  """Configuration mistakes fail here, at start-up, naming the field."""
  if data.sampling not in sampling.SAMPLINGS:
    raise DataError(f"config.data.sampling must be one of {sampling.SAMPLINGS}, got {data.sampling!r}")
  if data.clip_positions not in sampling.CLIP_POSITIONS:
    raise DataError(f"config.data.clip_positions must be one of {sampling.CLIP_POSITIONS}, got "
                    f"{data.clip_positions!r}")
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
  if data.shuffle_buffer < 1:
    raise DataError(f"config.data.shuffle_buffer must be >= 1, got {data.shuffle_buffer}")
  if data.augment_on not in AUGMENT_ON:
    raise DataError(f"config.data.augment_on must be one of {AUGMENT_ON}, got {data.augment_on!r}")
  if data.device_window < 0:
    raise DataError(f"config.data.device_window must be >= 0 (0: from the data), got {data.device_window}")
  augments_on_device(data)
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


def to_output(video: tf.Tensor, dtype: str) -> tf.Tensor:
  """[0, 1] pixels -> what batches carry: uint8 in [0, 255], or floats in [-1, 1]."""
  if dtype == "uint8":
    return tf.cast(tf.round(video * 255.0), tf.uint8)
  return tf.cast(video * 2.0 - 1.0, DTYPES[dtype])


def _guarded(process, fallback, deterministic: bool):
  """Maps `process` over a dataset; an element whose processing raises becomes `fallback(e)`.

  The fallback finds the reason (e.g. which frame files are missing); if even that raises, the
  element is 'undecodable'. Nothing reaches the consumer as an exception.
  """
  def one(element):
    element_ds = tf.data.Dataset.from_tensors(element)
    done = element_ds.map(process).ignore_errors()
    explained = element_ds.map(lambda e: fallback(e, None)).ignore_errors()
    last_resort = element_ds.map(lambda e: fallback(e, tf.constant(errors.UNDECODABLE, tf.int32)))
    return done.concatenate(explained).concatenate(last_resort).take(1)

  def apply(ds: tf.data.Dataset) -> tf.data.Dataset:
    return ds.interleave(one, cycle_length=tf.data.AUTOTUNE, block_length=1,
                         num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return apply


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
  window = (device_window(data, sources.stored_short_side(source))
            if augments_on_device(data) else None)
  fields = train_fields(data, window)
  # Per clip: everything the devices get except what batch-level mixing adds.
  empty = _blank(fields, tuple(f.name for f in fields if f.device
                               and f.name not in ("label_mix", "mix_weight")))

  def finished(jpegs, s_aug):
    return {"video": tf.ensure_shape(to_output(augment.train_clip(jpegs, s_aug, aug), data.dtype),
                                     empty["video"].shape)}

  def windowed(jpegs, s_aug):
    """The crop window, padded for the device; views wider than `window` are shrunk here."""
    view = augment.train_view(jpegs, s_aug, aug)
    frames = augment.decode_window(jpegs, view["crop"])
    side = tf.shape(frames)[1]
    frames, side = tf.cond(side > window, lambda: (tf.cast(tf.round(tf.clip_by_value(
        tf.image.resize(tf.cast(frames, tf.float32), (window, window), method="bicubic"),
        0.0, 255.0)), tf.uint8), tf.constant(window)), lambda: (frames, side))
    frames = tf.pad(frames, [[0, 0], [0, window - side], [0, window - side], [0, 0]])
    return {"video": tf.ensure_shape(frames, empty["video"].shape), "window": side,
            "flip": tf.cast(view["flip"], tf.int32), "color": view["color"]}

  def process(element):
    opened = source.open(element)

    def decode():
      s_sample, s_aug = tf.unstack(tf.random.experimental.stateless_split(
          source.clip_seed(seed, element), 2))
      indices = sampling.train_indices(data.sampling, opened["length"], data.num_frames,
                                       data.stride, s_sample, positions=data.clip_positions)
      jpegs = source.read(opened, indices)
      out = windowed(jpegs, s_aug) if window else finished(jpegs, s_aug)
      return dict(out, label=tf.cast(opened["label"], tf.int32))
    out = tf.cond(opened["error"] == 0, decode, lambda: empty)
    return dict(out, error=opened["error"], index=element["index"])

  def fallback(element, error):
    if error is None:
      error = source.failure(element)
    return dict(empty, error=error, index=element["index"])

  ds = source.train_records(seed=seed, process_index=process_index, process_count=process_count,
                            start=state.position, shuffle_buffer=data.shuffle_buffer,
                            deterministic=data.deterministic, num_epochs=num_epochs)
  ds = _guarded(process, fallback, data.deterministic)(ds)

  def count(skipped, element):
    skipped = skipped + tf.cast(tf.one_hot(element["error"] - 1, len(SKIP_REASONS)), tf.int64)
    return skipped, dict(element, skipped=skipped)

  ds = ds.scan(tf.constant(state.skipped, tf.int64), count)
  ds = ds.filter(_is_good).map(_without("error"))
  ds = ds.batch(batch_size, drop_remainder=True)
  if data.mixup_alpha > 0 or data.cutmix_alpha > 0:
    # Seeded by the batch's first stream position, not a batch counter: a resumed stream (which
    # starts at a position) mixes its batches exactly as the uninterrupted one did.
    mix_seed = tf.constant([seed, process_index + 7], tf.int64)
    ds = ds.map(lambda b: augment.mix_batch(
        b, tf.random.experimental.stateless_fold_in(mix_seed, b["index"][0]),
        data.mixup_alpha, data.cutmix_alpha))
  ds = ds.prefetch(data.prefetch)
  return ds.with_options(_options(data.deterministic))


def eval_views(frames: tf.Tensor, data, num_clips: int, num_crops: int,
               length: tf.Tensor | None = None) -> tf.Tensor:
  """(clips x crops, T, S, S, 3) evaluation views of one video's JPEG frames, as batches carry them.

  `frames` holds every frame of the video, or (with `length`, the video's frame count) a
  callable reading the frames at given indices.
  """
  read = frames if callable(frames) else (lambda indices: tf.gather(frames, indices))
  if length is None:
    length = tf.size(frames)
  indices = sampling.eval_indices(data.sampling, length, data.num_frames, data.stride, num_clips,
                                  positions=data.clip_positions)
  # Each distinct frame is read once: short videos repeat the same clip (docs/sampling.md).
  unique, position = tf.unique(tf.reshape(indices, [-1]))
  video = augment.eval_views(read(unique), tf.reshape(position, indices.shape), data.image_size,
                             data.eval_short_side, num_crops)
  return to_output(video, data.dtype)


def eval_dataset(source: Source, data, *, batch_size: int, num_clips: int, num_crops: int,
                 process_index: int = 0, process_count: int = 1,
                 num_batches: int | None = None) -> tf.data.Dataset:
  """One pass: {'video' (B,V,T,S,S,3), 'label', 'mask', 'error', 'index', 'key'}, V = clips x crops.

  The last batch is padded with mask 0. With `num_batches`, the stream is padded to exactly that
  many batches (multi-host evaluation needs the same count on every host).
  """
  check_config(data)
  empty = _blank(eval_fields(data, num_clips * num_crops), ("video", "label"))

  def process(element):
    opened = source.open(element)

    def decode():
      video = eval_views(lambda indices: source.read(opened, indices), data, num_clips, num_crops,
                         length=opened["length"])
      return {"video": video, "label": tf.cast(opened["label"], tf.int32)}
    out = tf.cond(opened["error"] == 0, decode, lambda: empty)
    return dict(out, error=opened["error"], index=element["index"], key=opened["key"])

  def fallback(element, error):
    if error is None:
      error = source.failure(element)
    return dict(empty, error=error, index=element["index"], key=source.key(element))

  ds = source.eval_records(process_index=process_index, process_count=process_count)
  ds = _guarded(process, fallback, deterministic=True)(ds)
  ds = ds.map(lambda e: dict(e, mask=tf.cast(e["error"] == 0, tf.int32), real=tf.constant(1, tf.int32)))
  padding = dict(empty, error=tf.constant(0, tf.int32), index=tf.constant(-1, tf.int64),
                 key=tf.constant(""), mask=tf.constant(0, tf.int32), real=tf.constant(0, tf.int32))
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


def skip_summary(errors_: np.ndarray) -> dict[str, int]:
  """Counts of eval 'error' codes by reason."""
  counts = np.bincount(np.asarray(errors_).ravel(), minlength=len(SKIP_REASONS) + 1)
  return {reason: int(counts[i + 1]) for i, reason in enumerate(SKIP_REASONS)}
