"""Measures the training input pipeline: clips/s, per core, and where the time goes.

  python -m msca_jax.tools.input_benchmark                       # Kinetics-like shards it writes
  python -m msca_jax.tools.input_benchmark --data_dir=DIR --split=train   # your prepared shards

Without --data_dir it writes stand-in shards shaped like prepared Kinetics (25 fps, 340x256
JPEG frames, 10 s videos) into a cache directory once. It then times:
  * the full training pipeline (8x224 by default) with every core, and with one core;
  * its stages, each alone on one core: reading + parsing records, decoding the clip's
    JPEG frames (only the crop window), and augmenting (resize, flip, colour, normalise).
With --accelerator_clips_per_s (a measured train-step rate), it prints the cores that feed it.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from absl import app, flags
import numpy as np
import tensorflow as tf

from configs import common
from msca_jax import host_memory
from msca_jax.data import augment, dmvr, pipeline, sampling, sources

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("data_dir", "", "DMVR shard directory; empty writes stand-in Kinetics shards")
  flags.DEFINE_string("split", "train", "split to read")
  flags.DEFINE_integer("num_frames", 8, "frames per clip")
  flags.DEFINE_integer("stride", 32, "frame stride")
  flags.DEFINE_integer("image_size", 224, "crop size")
  flags.DEFINE_integer("batch_size", 16, "clips per batch")
  flags.DEFINE_float("seconds", 20.0, "seconds per timed measurement")
  flags.DEFINE_integer("stand_in_videos", 48, "videos in the stand-in shards")
  flags.DEFINE_float("accelerator_clips_per_s", 0.0, "a train-step rate to feed (clips/s)")
  flags.DEFINE_string("json", "", "also write the results here")


def stand_in_shards(num_videos: int, seconds: float = 10.0, fps: int = 25, size=(256, 340)) -> str:
  """Prepared-Kinetics look-alikes: smooth moving content (JPEG sizes like real video), 25 fps."""
  root = os.path.join(os.environ.get("MSCA_JAX_CACHE") or os.path.expanduser("~/.cache/msca_jax"),
                      f"input_benchmark-{num_videos}x{int(seconds * fps)}-{size[0]}x{size[1]}")
  if os.path.exists(os.path.join(root, dmvr.LABELS_FILE)):
    return root
  print(f"writing {num_videos} stand-in videos to {root} (once)")
  rng = np.random.default_rng(0)
  h, w = size
  ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
  encode = tf.function(lambda f: tf.map_fn(lambda x: tf.io.encode_jpeg(x, quality=90), f,
                                           fn_output_signature=tf.string))

  def records():
    for i in range(num_videos):
      phase, colour = rng.uniform(0, 6.3, 3), rng.uniform(0.3, 1, 3)
      texture = rng.normal(0, 12, (h, w, 3))
      frames = []
      for t in range(int(seconds * fps)):
        wave = np.stack([np.sin(7 * xs + 5 * ys + phase[c] + t * 0.05) for c in range(3)], -1)
        frames.append(np.clip(128 + 90 * wave * colour + texture, 0, 255).astype(np.uint8))
      jpegs = [bytes(b) for b in encode(np.stack(frames)).numpy()]
      yield dmvr.make_example(jpegs, i % 4, f"class{i % 4}", f"stand_in/{i}")

  tmp = root + ".tmp"
  dmvr.write_labels(tmp, [f"class{i}" for i in range(4)])
  dmvr.write_shards(tmp, "train", records(), num_shards=8)
  os.replace(tmp, root)
  return root


def _rate(iterator, seconds: float, items_per_next: int) -> float:
  next(iterator)  # warm-up: tracing, file opening, buffers
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    count += items_per_next
  return count / (time.perf_counter() - start)


def _single_core(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def main(argv: Sequence[str]) -> None:
  print(host_memory.keep_freed_memory(), flush=True)  # before JAX starts its threads
  del argv
  directory = FLAGS.data_dir or stand_in_shards(FLAGS.stand_in_videos)
  data = common.get_config("vit").data
  data.source, data.path = "dmvr", directory
  data.num_frames, data.stride, data.image_size = FLAGS.num_frames, FLAGS.stride, FLAGS.image_size
  data.shuffle_buffer = 256
  source = sources.dmvr_source(directory, FLAGS.split)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  print(f"input: {source.description}; {FLAGS.num_frames}x{FLAGS.image_size} clips at stride "
        f"{FLAGS.stride}, batch {FLAGS.batch_size}, {cores} cores, {FLAGS.seconds:.0f} s per measurement")
  results = {"cores": cores, "clip": f"{FLAGS.num_frames}x{FLAGS.image_size}", "stride": FLAGS.stride}

  def train(single: bool):
    ds = pipeline.train_dataset(source, data, batch_size=FLAGS.batch_size, seed=0)
    return iter(_single_core(ds) if single else ds)

  results["clips_per_s"] = _rate(train(False), FLAGS.seconds, FLAGS.batch_size)
  results["clips_per_s_one_core"] = _rate(train(True), FLAGS.seconds, FLAGS.batch_size)

  # Stages, each alone on one core, per clip.
  files = list(source.files)
  reads = tf.data.Dataset.from_tensor_slices(files).interleave(
      tf.data.TFRecordDataset, cycle_length=1).map(source.parse).repeat()
  results["read_parse_ms"] = 1e3 / _rate(iter(_single_core(reads)), FLAGS.seconds / 2, 1)
  sample = [r["frames"] for r, _ in zip(reads.as_numpy_iterator(), range(8))]
  results["frames_per_video"] = float(np.mean([len(f) for f in sample]))
  results["kb_per_frame"] = float(np.mean([len(j) for f in sample for j in f]) / 1024)
  print(f"videos: {results['frames_per_video']:.0f} frames on average, "
        f"{results['kb_per_frame']:.1f} KB per JPEG frame")

  aug = pipeline.train_augment(data)

  def sampled(frames, seed):
    indices = sampling.train_indices("dense", tf.size(frames), FLAGS.num_frames, FLAGS.stride, seed)
    return tf.gather(frames, indices)

  def decode(frames, seed):
    jpegs = sampled(frames, seed)
    shape = tf.io.extract_jpeg_shape(jpegs[0])
    window = tf.minimum(shape[0], shape[1]) * FLAGS.image_size // 280  # a typical crop window
    crop = tf.stack([0, 0, window, window])
    return tf.map_fn(lambda b: tf.io.decode_and_crop_jpeg(b, crop, channels=3), jpegs,
                     fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))

  def full(frames, seed):
    return augment.train_clip(sampled(frames, seed), seed, aug)

  def per_clip_ms(fn) -> float:
    ds = reads.enumerate().map(lambda i, r: fn(r["frames"], tf.stack([i, i])))
    return 1e3 / _rate(iter(_single_core(ds)), FLAGS.seconds / 2, 1)

  read_decode = per_clip_ms(decode)
  read_decode_augment = per_clip_ms(full)
  results["decode_ms"] = max(read_decode - results["read_parse_ms"], 0.0)
  results["augment_ms"] = max(read_decode_augment - read_decode, 0.0)
  stages = {"read + parse": results["read_parse_ms"], "decode (crop window)": results["decode_ms"],
            "augment": results["augment_ms"]}
  total = sum(stages.values())

  print(f"\ntraining input, {FLAGS.num_frames}x{FLAGS.image_size}:")
  print(f"  {results['clips_per_s']:8.1f} clips/s on {cores} cores "
        f"({results['clips_per_s'] / cores:.1f} clips/s per core)")
  print(f"  {results['clips_per_s_one_core']:8.1f} clips/s on 1 core")
  print("\nwhere one clip's time goes (each stage alone on one core):")
  for name, ms in stages.items():
    print(f"  {name:22s} {ms:7.2f} ms  {100 * ms / total:5.1f}%")
  if FLAGS.accelerator_clips_per_s:
    need = FLAGS.accelerator_clips_per_s / (results["clips_per_s"] / cores)
    results["cores_to_feed"] = need
    print(f"\nfeeding {FLAGS.accelerator_clips_per_s:.0f} clips/s takes about {need:.1f} cores")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  define_flags()
  app.run(main)
