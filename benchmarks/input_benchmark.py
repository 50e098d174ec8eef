"""Measures the training input pipeline on both video layouts, side by side, in one run.

  python -m benchmarks.input_benchmark [--seconds=12] [--videos=24] [--layouts=frames,dmvr]
      [--json=out.json] [--accelerator_clips_per_s=580] [--baseline=earlier.json]

It writes stand-in videos shaped like prepared Kinetics once, the same JPEG bytes as frame folders
and as DMVR shards (benchmarks/common.py). Then, for each layout:

  1. bytes read per training clip (rchar of /proc/self/io around many batches, after warm-up)
     over the bytes of the JPEG frames the clip decodes;
  2. time and bytes to the first batch after resuming a stream at a saved position;
  3. peak resident memory of a process iterating the pipeline while shuffling over 20,000 (and
     240,000) videos, and for DMVR with shuffle buffers of a few sizes, extrapolated to the
     recipe's 4096 records;
  4. clips/s and host CPU per clip with every core and with one, from a warm and from a cold page
     cache (the data files evicted with posix_fadvise(POSIX_FADV_DONTNEED)), for the recipe's
     pipeline (config.data as recipe.get_config('vit') sets it: uint8 clips, the views finished
     where config.data.augment_on says); once with the views finished on the host in uint8 and in
     float32, to show what each choice costs; and where one clip's time goes, stage by stage;
  5. the host cores it takes to feed one accelerator at a given train-step rate (the computed
     rates of docs/performance.md, and --accelerator_clips_per_s).

With --baseline=earlier.json (what --json wrote in an earlier run, e.g. before a change to the
pipeline), each clips/s row is also given as a ratio to the same row of that run.

The stand-in list and shard sets are longer than the videos written: the frame list cycles over
the same folders, and the DMVR file list names the same shards many times, so an epoch has
20,000 videos while the disk holds a few hundred MB. Memory and resume costs depend on the index
and on the positions, not on how many distinct videos the bytes come from.

The pieces are functions (throughput, resume_cost, peak_rss, stage_times,
run_benchmark, format_report) so tests and notebooks can run them without flags.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from benchmarks import common
from benchmarks.common import cpu_seconds as _cpu_s, io_counters, num_cores, one_core, single_core
from msca_jax import host_memory
from msca_jax.data import augment, frames, pipeline, sampling, sources

# docs/performance.md, "What to expect": clips/s per chip at 50 % MFU, computed from XLA's 857
# GFLOP per ViT-B/16 8x224 training clip and each chip's dense bf16 peak (arithmetic, not measured).
ACCELERATORS = (("H100 SXM", 580.0), ("TPU v5p", 270.0), ("TPU v4", 160.0), ("TPU v5e", 115.0))

RECIPE_SHUFFLE_BUFFER = 4096         # msca_jax/configs/recipe.py: config.data.shuffle_buffer
KINETICS_RECORD_MB = 7.5             # 250 frames x 30 KB: one prepared-Kinetics DMVR record
LAYOUTS = ("frames", "dmvr")


# ---------------------------------------------------------------------------------------------
# Configurations and sources.

def frame_list(stand_in: common.StandIn, num_videos: int) -> str:
  """A list of `num_videos` lines cycling over the stand-in folders (written once)."""
  if num_videos == stand_in.num_videos:
    return frames.list_path(stand_in.frames_root, common.SPLIT)
  path = os.path.join(stand_in.frames_root, f"{common.SPLIT}_x{num_videos}.txt")
  if not os.path.exists(path):
    n = stand_in.num_videos
    labels = min(4, n)
    frames.write_list(path, [(common.folder(i % n), stand_in.frames_per_video, (i % n) % labels)
                             for i in range(num_videos)])
  return path


@dataclasses.dataclass(frozen=True)
class Clip:
  num_frames: int = 8
  stride: int = 32
  image_size: int = 224
  batch_size: int = 16

  def describe(self) -> str:
    return f"{self.num_frames}x{self.image_size} clips at stride {self.stride}, batch {self.batch_size}"


def data_config(layout: str, stand_in: common.StandIn, clip: Clip, *, dtype: str = "uint8",
                shuffle_buffer: int = 16, list_videos: int | None = None,
                augment_on: str | None = None):
  """config.data of the recipe (recipe.get_config('vit').data) reading the stand-in data;
  `augment_on` overrides config.data.augment_on where the pipeline has it."""
  from msca_jax.configs import recipe  # noqa: PLC0415  (imports JAX: only where a config is built)

  data = recipe.get_config("vit").data
  data.num_frames, data.stride, data.image_size = clip.num_frames, clip.stride, clip.image_size
  if clip.image_size != 224:  # the recipe's ranges, scaled to a small test crop
    data.train_short_side_range = (clip.image_size, clip.image_size * 330 // 224)
    data.eval_short_side = clip.image_size
  data.dtype = dtype
  data.shuffle_buffer = shuffle_buffer
  if augment_on is not None and "augment_on" in data:
    data.augment_on = augment_on
  if layout == "frames":
    data.source, data.path = "frames", stand_in.frames_root
    data.train_list = frame_list(stand_in, list_videos or stand_in.num_videos)
  elif layout == "dmvr":
    data.source, data.path = "dmvr", stand_in.dmvr_root
  else:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  return data


def augment_where(data) -> str:
  """'device' when the train step finishes the views (the host only decodes crop windows), else
  'host' (config.data.augment_on, where the pipeline has it)."""
  on_device = getattr(pipeline, "augments_on_device", None)
  return "device" if on_device is not None and "augment_on" in data and on_device(data) else "host"


def layout_source(data, *, dmvr_repeat: int = 1) -> sources.Source:
  """The pipeline's source for `data`; DMVR's file list names every shard `dmvr_repeat` times."""
  if data.source == "frames":
    return sources.make_source(data, common.SPLIT)
  source = sources.dmvr_source(data.path, common.SPLIT)
  if dmvr_repeat > 1:
    source = dataclasses.replace(
        source, files=tuple(source.files) * dmvr_repeat,
        description=f"{source.description}, each listed {dmvr_repeat} times")
  return source


def records_per_epoch(source: sources.Source) -> int:
  if isinstance(source, frames.FrameSource):
    return len(source.videos)
  distinct = sorted(set(source.files))
  per_file = dict(zip(distinct, sources.count_records(distinct)))
  return sum(per_file[f] for f in source.files)


def _status_kb(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return 0


# ---------------------------------------------------------------------------------------------
# The measurements.

def throughput(source: sources.Source, data, *, batch_size: int, seconds: float,
               use_one_core: bool = False, warmup_s: float = 2.0, warmup_batches: int = 2,
               windows: int = 3, seed: int = 0) -> dict:
  """Clips/s of the training pipeline (numpy batches, as the trainer takes them), with the bytes
  read (rchar), storage reads (read_bytes) and process CPU per clip, after a warm-up.

  `seconds` are timed as `windows` consecutive windows: clips_per_s is the best window's rate (on
  a shared machine, the one least slowed by other processes), clips_per_s_overall the whole
  time's; bytes and CPU per clip are over the whole time."""
  ds = pipeline.train_dataset(source, data, batch_size=batch_size, seed=seed)
  if use_one_core:
    ds = single_core(ds)
  with common.cores_context(use_one_core) as repin:
    iterator = pipeline.as_numpy(ds)
    start, batches = time.perf_counter(), 0
    while batches < warmup_batches or time.perf_counter() - start < warmup_s:
      next(iterator)
      batches += 1
    if repin:
      repin()
    io0, cpu0, t0 = io_counters(), _cpu_s(), time.perf_counter()
    clips, window_rates = 0, []
    for _ in range(windows):  # consecutive windows: the best is the least disturbed by others
      w_start, w_clips, w_cpu = time.perf_counter(), 0, _cpu_s()
      while time.perf_counter() - w_start < seconds / windows or w_clips < 2 * batch_size:
        batch = next(iterator)
        w_clips += len(batch["label"])
      w_elapsed = time.perf_counter() - w_start
      window_rates.append({"clips_per_s": w_clips / w_elapsed,
                           "cores_used": (_cpu_s() - w_cpu) / w_elapsed})
      clips += w_clips
    elapsed = time.perf_counter() - t0
    io1, cpu1 = io_counters(), _cpu_s()
  del iterator
  gc.collect()
  best = max(window_rates, key=lambda w: w["clips_per_s"])
  return {"clips_per_s": best["clips_per_s"], "clips_per_s_overall": clips / elapsed,
          "windows": window_rates, "clips": clips, "seconds": elapsed,
          "rchar_per_clip": (io1["rchar"] - io0["rchar"]) / clips,
          "read_bytes_per_clip": (io1["read_bytes"] - io0["read_bytes"]) / clips,
          "cpu_ms_per_clip": 1e3 * (cpu1 - cpu0) / clips,
          "output_bytes_per_clip": int(batch["video"][0].nbytes)}


def resume_cost(source: sources.Source, data, *, position: int, batch_size: int,
                seed: int = 0) -> dict:
  """Seconds (building the pipeline included) and bytes read until the first batch of a stream
  resumed at `position` (pipeline.StreamState)."""
  gc.collect()
  io0, t0 = io_counters(), time.perf_counter()
  ds = pipeline.train_dataset(source, data, batch_size=batch_size, seed=seed,
                              state=pipeline.StreamState(position=position))
  build_s = time.perf_counter() - t0
  iterator = pipeline.as_numpy(ds)
  batch = next(iterator)
  seconds = time.perf_counter() - t0
  io1 = io_counters()
  del iterator
  gc.collect()
  return {"position": int(position), "seconds": seconds, "build_s": build_s,
          "rchar": io1["rchar"] - io0["rchar"], "read_bytes": io1["read_bytes"] - io0["read_bytes"],
          "first_index": int(batch["index"].min())}


def stage_times(source: sources.Source, data, *, seconds: float, seed: int = 0) -> dict:
  """ms per clip of each stage, on one core, each timed alone (cumulatively, then differenced):
  read (open, sample, read the clip's JPEG bytes; for DMVR parsing the whole record), decode (the
  8 frames' crop windows at a typical window size), augment (resize, flip, colour, to the output
  dtype)."""
  aug = pipeline.train_augment(data)
  lo, hi = data.train_short_side_range
  records = source.train_records(seed=seed, process_index=0, process_count=1, start=0,
                                 shuffle_buffer=data.shuffle_buffer, deterministic=True)

  def prepare(element):
    opened = source.open(element)
    s_sample, s_aug = tf.unstack(tf.random.experimental.stateless_split(
        source.clip_seed(seed, element), 2))
    indices = sampling.train_indices(data.sampling, opened["length"], data.num_frames,
                                     data.stride, s_sample, positions=data.clip_positions)
    return source.read(opened, indices), s_aug

  def read(element):
    jpegs, _ = prepare(element)
    return tf.reduce_sum(tf.strings.length(jpegs))

  def decode(element):
    jpegs, _ = prepare(element)
    shape = tf.io.extract_jpeg_shape(jpegs[0])
    short = tf.minimum(shape[0], shape[1])
    window = tf.minimum(short, short * data.image_size * 2 // (lo + hi))  # the mean short side
    crop = tf.stack([0, 0, window, window])
    return tf.map_fn(lambda b: tf.io.decode_and_crop_jpeg(b, crop, channels=3), jpegs,
                     fn_output_signature=tf.TensorSpec([None, None, 3], tf.uint8))

  def full(element):
    jpegs, s_aug = prepare(element)
    return pipeline.to_output(augment.train_clip(jpegs, s_aug, aug), data.dtype)

  def ms_per_clip(fn) -> float:
    ds = single_core(records.map(fn))
    with one_core() as repin:
      iterator = iter(ds)
      next(iterator)
      repin()
      count, t0 = 0, time.perf_counter()
      while time.perf_counter() - t0 < seconds or count < 4:
        next(iterator)
        count += 1
      elapsed = time.perf_counter() - t0
    del iterator
    gc.collect()
    return 1e3 * elapsed / count

  read_ms = ms_per_clip(read)
  decode_ms = ms_per_clip(decode)
  full_ms = ms_per_clip(full)
  return {"read_ms": read_ms, "decode_ms": max(decode_ms - read_ms, 0.0),
          "augment_ms": max(full_ms - decode_ms, 0.0), "total_ms": full_ms}


# Peak memory: each configuration in a fresh process (freed memory stays resident in this one:
# host_memory keeps it, as training does), its spec on stdin and its result on stdout's last line.

def _rss_child_main() -> None:
  import ml_collections  # noqa: PLC0415

  spec = json.loads(sys.stdin.read())
  data = ml_collections.ConfigDict(spec["data"])
  gc.collect()
  idle_kb = _status_kb("VmRSS")  # TensorFlow imported, nothing built: the index counts as used
  try:  # resets VmHWM to the current RSS (Linux >= 4.0, own process, no root)
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    hwm_reset = True
  except OSError:
    hwm_reset = False
  samples, stop = [], threading.Event()

  def sample():
    while not stop.is_set():
      samples.append(_status_kb("VmRSS"))
      stop.wait(0.02)
  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  source = layout_source(data, dmvr_repeat=spec["dmvr_repeat"])
  ds = pipeline.train_dataset(source, data, batch_size=spec["batch_size"], seed=0)
  built_kb = _status_kb("VmRSS")
  t0 = time.perf_counter()
  iterator = pipeline.as_numpy(ds)
  next(iterator)
  first_s = time.perf_counter() - t0
  for _ in range(spec["batches"] - 1):
    next(iterator)
  stop.set()
  sampler.join()
  peak_kb = max(max(samples), _status_kb("VmRSS"), _status_kb("VmHWM") if hwm_reset else 0)
  print(json.dumps({"idle_mb": idle_kb / 1024, "built_mb": built_kb / 1024, "peak_mb": peak_kb / 1024,
                    "sampled_peak_mb": max(samples) / 1024, "first_batch_s": first_s,
                    "samples": len(samples), "hwm_reset": hwm_reset,
                    "epoch_records": records_per_epoch(source)}), flush=True)


def peak_rss(specs: Sequence[dict], parallel: int = 2) -> list[dict]:
  """Peak RSS of the pipeline for each spec {'data': config.data as a dict, 'dmvr_repeat',
  'batch_size', 'batches'}, each in its own process (`parallel` at a time; resident memory is
  per process, so they do not disturb each other's figures)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [repo] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # As the trainer does: the malloc options before TensorFlow starts its threads.
  code = ("import sys; from msca_jax import host_memory; "
          "print(host_memory.keep_freed_memory(), file=sys.stderr); "
          "from benchmarks import input_benchmark as b; b._rss_child_main()")

  def one(spec: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", code], env=env, input=json.dumps(spec),
                          capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"memory measurement {spec.get('label', '')!r} failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]), label=spec.get("label", ""))

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    return list(pool.map(one, specs))


def _linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
  """(intercept, slope) of the least-squares line."""
  if len(xs) < 2:
    return float(ys[0]), 0.0
  slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
  return float(intercept), float(slope)


# ---------------------------------------------------------------------------------------------
# The whole benchmark.

@dataclasses.dataclass(frozen=True)
class Settings:
  """What run_benchmark measures; the defaults are the Kinetics-shaped run."""
  layouts: tuple[str, ...] = LAYOUTS
  videos: int = 24
  frames_per_video: int = 250
  frame_size: tuple[int, int] = common.KINETICS_FRAME     # (height, width)
  jpeg_quality: int = 90
  kb_per_frame: float | None = None                # None: 30 KB at 340x256, scaled by area
  clip: Clip = Clip()
  seconds: float = 12.0                            # per clips/s measurement
  warmup_s: float = 3.0
  stage_seconds: float | None = None               # None: seconds / 4; 0: no stage breakdown
  list_videos: int = 20_000                        # videos an epoch shuffles over
  rss_list_videos: tuple[int, ...] = (20_000, 240_000)
  rss_buffers: tuple[int, ...] = (16, 64, 256)
  rss_batches: int = 8
  rss_parallel: int = 2
  throughput_buffer: int = 16                      # DMVR shuffle buffer for clips/s and bytes
  resume_positions: tuple[int, ...] = (0, 100_000, 1_000_000)
  resume_epoch_records: int = 240                  # a DMVR epoch for the resume measurement
  resume_epoch: int = 1
  resume_cold: bool = True
  rss_background: bool = False   # memory processes alongside the timings: faster, disturbs them
  float32: bool = True
  cold: bool = True
  accelerator_clips_per_s: float = 0.0
  cache_dir: str | None = None
  baseline: str | None = None                      # an earlier run's --json to compare clips/s with


class _Run:
  """One benchmark run's data, sources and log; each measurement is a method."""

  def __init__(self, settings: Settings, log: Callable[[str], None]):
    self.settings, self.clip, self.log = settings, settings.clip, log
    self.start = time.perf_counter()
    self.cores = num_cores()
    self.stand_in = common.stand_in_data(settings.videos, settings.frames_per_video, settings.frame_size,
                                  settings.jpeg_quality, settings.kb_per_frame,
                                  cache_dir=settings.cache_dir, log=self.progress)
    self.decoded_per_clip = self.clip.num_frames * self.stand_in.mean_frame_bytes
    # The DMVR shard list repeated until an epoch holds as many videos as the frame list.
    self.epoch_repeat = max(1, math.ceil(settings.list_videos / self.stand_in.num_videos))
    self.files = {layout: self.stand_in.files(layout) for layout in settings.layouts}

  def progress(self, message: str) -> None:
    self.log(f"[{time.perf_counter() - self.start:5.0f} s] {message}")

  def setup(self, layout: str, *, dtype: str = "uint8", shuffle_buffer: int | None = None,
            list_videos: int | None = None, repeat: int | None = None,
            augment_on: str | None = None):
    """(source, config.data) of a layout; DMVR's shard list repeated `repeat` times."""
    data = data_config(layout, self.stand_in, self.clip, dtype=dtype,
                       shuffle_buffer=shuffle_buffer or self.settings.throughput_buffer,
                       list_videos=list_videos or self.settings.list_videos, augment_on=augment_on)
    repeat = self.epoch_repeat if repeat is None else repeat
    return layout_source(data, dmvr_repeat=repeat if layout == "dmvr" else 1), data

  def cache(self, layout: str, state: str):
    """A context in which `layout`'s files are in the page cache ('warm') or kept out ('cold')."""
    return common.page_cache(self.files[layout], state)

  # 1 and 4 ----------------------------------------------------------------------------------

  def throughput(self, layout: str, cache: str, use_one_core: bool, dtype: str = "uint8",
                 augment_on: str | None = None) -> dict:
    """One clips/s row; without `augment_on` the recipe's (the row's 'recipe' is True)."""
    source, data = self.setup(layout, dtype=dtype, augment_on=augment_on)
    where = augment_where(data)
    cores = 1 if use_one_core else self.cores
    self.progress(f"clips/s: {layout}, {dtype}, views finished on the {where}, {cores} "
                  f"core{'s' * (cores > 1)}, {cache} page cache ...")
    with self.cache(layout, cache) as eviction:
      r = throughput(source, data, batch_size=self.clip.batch_size, seconds=self.settings.seconds,
                     use_one_core=use_one_core, warmup_s=self.settings.warmup_s)
    r.update(layout=layout, dtype=dtype, augment=where, recipe=augment_on is None, cache=cache,
             cores=cores, per_core=r["clips_per_s"] / cores,
             clips_per_cpu_s=1e3 / max(r["cpu_ms_per_clip"], 1e-9),
             rchar_over_decoded=r["rchar_per_clip"] / self.decoded_per_clip)
    if eviction is not None:
      r["eviction"] = dict(eviction, core_share=eviction["cpu_s"] / max(r["seconds"], 1e-9))
    self.progress(f"  {r['clips_per_s']:.1f} clips/s, {r['rchar_per_clip'] / 2**20:.3f} MB read per "
                  f"clip ({r['read_bytes_per_clip'] / 2**20:.3f} MB from storage), "
                  f"{r['cpu_ms_per_clip']:.1f} CPU ms per clip")
    return r

  def stages(self, layout: str, seconds: float, one_core_run: dict) -> dict:
    self.progress(f"stages, one core: {layout} ...")
    source, data = self.setup(layout)
    common.warm_page_cache(self.files[layout])
    st = stage_times(source, data, seconds=seconds)
    st["augment"] = one_core_run["augment"]
    st["pipeline_ms"] = 1e3 / one_core_run["clips_per_s"]
    host = st["read_ms"] + st["decode_ms"] + (st["augment_ms"] if st["augment"] == "host" else 0.0)
    st["other_ms"] = max(st["pipeline_ms"] - host, 0.0)
    return st

  # 2 ------------------------------------------------------------------------------------------

  def resume(self, layout: str) -> dict:
    s = self.settings
    if layout == "frames":
      source, data = self.setup("frames")
      positions = list(s.resume_positions)
    else:
      source, data = self.setup("dmvr", repeat=max(1, math.ceil(s.resume_epoch_records /
                                                                self.stand_in.num_videos)))
      epoch_records = records_per_epoch(source)
      positions = [s.resume_epoch * sources.EPOCH_STRIDE + o
                   for o in (0, epoch_records // 2, epoch_records)]
    self.progress(f"resume: {layout} at positions {positions} ...")
    rows = []
    for cache in ("warm", "cold") if s.cold and s.resume_cold else ("warm",):
      for position in positions:
        with self.cache(layout, cache):
          r = resume_cost(source, data, position=position, batch_size=self.clip.batch_size)
        r["cache"] = cache
        if layout == "dmvr":
          r["epoch"], r["offset"] = divmod(position, sources.EPOCH_STRIDE)
        rows.append(r)
        self.progress(f"  {cache} position {position}: {r['seconds']:.2f} s, "
                      f"{r['rchar'] / 2**20:.2f} MB read")
    entry: dict = {"rows": rows}
    if layout == "dmvr":
      entry["epoch_records"] = epoch_records
      for cache in dict.fromkeys(r["cache"] for r in rows):
        first, last = (next(r for r in rows if r["cache"] == cache and r["offset"] == o)
                       for o in (0, epoch_records))
        entry[f"per_record_{cache}"] = {
            "mb": (last["rchar"] - first["rchar"]) / epoch_records / 2**20,
            "s_per_1000": 1000 * (last["seconds"] - first["seconds"]) / epoch_records}
    else:
      for cache in dict.fromkeys(r["cache"] for r in rows):
        mine = [r for r in rows if r["cache"] == cache]
        entry[f"rchar_ratio_to_first_{cache}"] = {
            str(r["position"]): r["rchar"] / max(mine[0]["rchar"], 1) for r in mine}
    return entry

  # 3 ------------------------------------------------------------------------------------------

  def memory(self, background: bool = False) -> Callable[[], dict]:
    """Starts the peak-RSS processes; the returned function waits for them and summarises.
    In the background they run while this process times the other measurements."""
    s = self.settings
    specs = []
    for layout in s.layouts:
      if layout == "frames":
        for n in s.rss_list_videos:
          _, data = self.setup("frames", list_videos=n)
          specs.append({"label": f"frames, {n:,} videos", "layout": "frames", "videos": n,
                        "shuffle_buffer": None, "data": data.to_dict(), "dmvr_repeat": 1})
      else:
        for b in s.rss_buffers:
          _, data = self.setup("dmvr", shuffle_buffer=b)
          specs.append({"label": f"dmvr, buffer {b}", "layout": "dmvr", "shuffle_buffer": b,
                        "videos": self.epoch_repeat * self.stand_in.num_videos,
                        "data": data.to_dict(), "dmvr_repeat": self.epoch_repeat})
    for spec in specs:
      spec.update(batch_size=self.clip.batch_size, batches=s.rss_batches)
    self.progress(f"peak RSS: {len(specs)} processes, {s.rss_parallel} at a time"
                  f"{' (in the background)' if background else ''} ...")
    box: dict = {}

    def measure():
      try:
        box["measured"] = peak_rss(specs, parallel=s.rss_parallel)
      except BaseException as e:  # re-raised by finish()
        box["error"] = e

    if background:
      thread = threading.Thread(target=measure, daemon=True, name="peak_rss")
      thread.start()
    else:
      for layout in s.layouts:
        common.warm_page_cache(self.files[layout])
      measure()

    def finish() -> dict:
      if background:
        thread.join()
      if "error" in box:
        raise box["error"]
      return self._memory_summary(specs, box["measured"])
    return finish

  def _memory_summary(self, specs: Sequence[dict], measured: Sequence[dict]) -> dict:
    rows = [dict(m, layout=spec["layout"], videos=spec["videos"], shuffle_buffer=spec["shuffle_buffer"])
            for spec, m in zip(specs, measured)]
    for m in rows:
      self.progress(f"  {m['label']}: peak {m['peak_mb']:.0f} MB ({m['idle_mb']:.0f} MB idle)")
    memory: dict = {"rows": rows}
    dmvr_rows = [m for m in rows if m["layout"] == "dmvr"]
    if dmvr_rows:
      intercept, slope = _linear_fit([m["shuffle_buffer"] for m in dmvr_rows],
                                     [m["peak_mb"] for m in dmvr_rows])
      memory["dmvr_fit"] = {
          "intercept_mb": intercept, "mb_per_buffered_record": slope,
          "stand_in_record_mb": self.stand_in.mean_record_bytes / 2**20,
          "recipe_buffer": RECIPE_SHUFFLE_BUFFER, "kinetics_record_mb": KINETICS_RECORD_MB,
          "computed_peak_mb_at_recipe_buffer": intercept + slope * RECIPE_SHUFFLE_BUFFER,
          "computed_recipe_buffer_mb": RECIPE_SHUFFLE_BUFFER * KINETICS_RECORD_MB}
    return memory


def feeding_table(runs: Sequence[dict], cores: int, extra_clips_per_s: float = 0.0) -> list[dict]:
  """Cores to feed each accelerator: its clips/s x the host CPU seconds one clip of the recipe's
  pipeline took (all cores). On an idle machine that is its clips/s over the measured clips/s per
  core; unlike that ratio, it holds when other processes share the cores."""
  accelerators = list(ACCELERATORS)
  if extra_clips_per_s:
    accelerators.insert(0, ("--accelerator_clips_per_s", extra_clips_per_s))
  table = []
  for name, rate in accelerators:
    mine = [r for r in runs if r["recipe"] and r["cores"] == cores]
    needed = {f"{r['layout']}_{r['cache']}": rate * r["cpu_ms_per_clip"] / 1e3 for r in mine}
    reads = {r["layout"]: rate * r["rchar_per_clip"] / 2**20 for r in mine if r["cache"] == "warm"}
    table.append({"accelerator": name, "clips_per_s": rate, "cores": needed,
                  "read_mb_per_s": reads})
  return table


def compare_to_baseline(runs: Sequence[dict], path: str) -> dict:
  """Sets each clips/s row's `vs_baseline`: its clips/s over those of the same row (layout, where
  the views are finished, dtype, page cache, cores) in `path`, an earlier run's --json; None where
  that run has no such row."""
  with open(path) as f:
    earlier = json.load(f)

  def key(r):
    return r["layout"], r["augment"], r["dtype"], r["cache"], r["cores"]
  rates = {key(r): r["clips_per_s"] for r in earlier.get("throughput", [])}
  for r in runs:
    r["vs_baseline"] = r["clips_per_s"] / rates[key(r)] if key(r) in rates else None
  return {"path": path, "rows_matched": sum(key(r) in rates for r in runs)}


def run_benchmark(settings: Settings = Settings(), log: Callable[[str], None] = common.log) -> dict:
  """Every measurement, as a JSON-ready dict (format_report prints it)."""
  s = settings
  load_start = common.load_average()
  run = _Run(settings, log)
  stand_in, clip, cores = run.stand_in, run.clip, run.cores
  results: dict = {
      "cores": cores, "clip": dataclasses.asdict(clip), "layouts": list(s.layouts),
      "load_average_start": load_start,
      "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "clip"},
      "stand_in": dict(dataclasses.asdict(stand_in), description=stand_in.describe()),
      "decoded_jpeg_bytes_per_clip": run.decoded_per_clip,
      "cold_method": common.COLD_METHOD,
  }
  run.progress(stand_in.describe() + (" (reused)" if stand_in.reused else ""))
  results["epoch_videos"] = {layout: records_per_epoch(run.setup(layout)[0]) for layout in s.layouts}
  run.progress(f"{clip.describe()}, {cores} cores; an epoch shuffles over "
               + ", ".join(f"{n:,} videos ({l})" for l, n in results["epoch_videos"].items()))
  memory = run.memory(background=True) if s.rss_background else None

  # 4 (and 1: the bytes of the warm all-core runs): warm first, then stages, then cold.
  runs = []
  for layout in s.layouts:
    runs.append(run.throughput(layout, "warm", False))
    runs.append(run.throughput(layout, "warm", True))
  recipe_on = runs[0]["augment"]
  results["augment_on"] = recipe_on
  if s.float32:  # the effect of sending uint8, and of finishing the views on the device
    layout = "frames" if "frames" in s.layouts else s.layouts[0]
    if recipe_on == "device":
      runs.append(run.throughput(layout, "warm", False, augment_on="host"))
    runs.append(run.throughput(layout, "warm", False, dtype="float32",
                               augment_on="host" if recipe_on == "device" else None))
    runs[-1]["recipe"] = False

  def recipe_run(layout, cache, n):
    return next(r for r in runs if r["recipe"] and (r["layout"], r["cache"], r["cores"]) ==
                (layout, cache, n))

  stage_seconds = s.seconds / 4 if s.stage_seconds is None else s.stage_seconds
  if stage_seconds > 0:
    results["stages"] = {layout: run.stages(layout, stage_seconds, recipe_run(layout, "warm", 1))
                         for layout in s.layouts}
  if s.cold:
    for layout in s.layouts:
      runs.append(run.throughput(layout, "cold", False))
      runs.append(run.throughput(layout, "cold", True))
  results["throughput"] = runs
  if s.baseline:
    results["baseline"] = compare_to_baseline(runs, s.baseline)
  results["bytes_per_clip"] = {}
  for layout in s.layouts:
    r = recipe_run(layout, "warm", cores)
    results["bytes_per_clip"][layout] = {
        k: r[k] for k in ("rchar_per_clip", "rchar_over_decoded", "clips", "read_bytes_per_clip")}

  # 2, 3, 5.
  results["resume"] = {layout: run.resume(layout) for layout in s.layouts}
  results["memory"] = (memory or run.memory())()
  results["feeding"] = feeding_table(runs, cores, s.accelerator_clips_per_s)
  results["runtime_s"] = time.perf_counter() - run.start
  results["load_average_end"] = common.load_average()
  run.progress("done")
  return results


# ---------------------------------------------------------------------------------------------
# Report.

def _ratio(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}"


def _mb(n: float) -> str:
  return f"{n / 2**20:.3f}" if n < 10 * 2**20 else f"{n / 2**20:.1f}"


def format_report(results: dict) -> str:
  cores, clip = results["cores"], results["clip"]
  out = []
  add = out.append
  add(f"\nInput pipeline, {clip['num_frames']}x{clip['image_size']} training clips at stride "
      f"{clip['stride']}, batch {clip['batch_size']}, on {cores} cores")
  add(f"data: {results['stand_in']['description']}")
  add("an epoch shuffles over " + ", ".join(f"{n:,} videos ({l})"
                                             for l, n in results["epoch_videos"].items())
      + " (the list / the shard list repeat the stand-in videos)")
  decoded = results["decoded_jpeg_bytes_per_clip"]

  add(f"\n1. Bytes read per training clip (rchar of /proc/self/io over the timed batches, warm page "
      f"cache, {cores} cores) / bytes of the {clip['num_frames']} JPEG frames it decodes "
      f"({decoded / 1024:.0f} KB)")
  rows = []
  for layout, b in results["bytes_per_clip"].items():
    target = ("about 1: its frames" if layout == "frames" else
              f"about {results['stand_in']['frames_per_video'] / clip['num_frames']:.0f}: the video")
    rows.append([layout, b["clips"], _mb(b["rchar_per_clip"]), f"{b['rchar_over_decoded']:.2f}",
                 target])
  add(common.table(["layout", "clips", "MB read / clip", "read / decoded", "expected"], rows))

  add("\n2. Resuming a stream: time (building the pipeline included) and bytes read until the "
      "first batch")
  rows = []
  for layout, entry in results["resume"].items():
    for r in entry["rows"]:
      where = (f"{r['position']:,}" if layout == "frames" else
               f"epoch {r['epoch']} + {r['offset']} of {entry['epoch_records']}")
      first = r["first_index"] % sources.EPOCH_STRIDE if layout == "dmvr" else r["first_index"]
      rows.append([layout, where, r["cache"], f"{r['seconds']:.2f}", f"{r['build_s']:.2f}",
                   _mb(r["rchar"]), _mb(r["read_bytes"]), f"{first:,}"])
  add(common.table(["layout", "position", "page cache", "s", "of which building", "MB read",
              "MB from storage", "first batch's index"], rows, "lllrrrrr"))
  add("  the source (the list, the shard names) is opened before, the same at every position; MB "
      "read includes what the pipeline had read ahead when the first batch arrived")
  if "frames" in results["resume"]:
    for key, ratios in results["resume"]["frames"].items():
      if key.startswith("rchar_ratio_to_first_"):
        add(f"  frames, {key.rsplit('_', 1)[1]}: bytes to the first batch relative to the first "
            "position: " + ", ".join(f"{int(p):,}: {v:.2f}x" for p, v in ratios.items()))
  if "dmvr" in results["resume"]:
    entry = results["resume"]["dmvr"]
    warm = entry["per_record_warm"]
    digits = 1 if warm["mb"] >= 1 else 3
    line = (f"  dmvr: resuming reads the current epoch up to the saved position: about "
            f"{warm['mb']:.{digits}f} MB per record, {warm['s_per_1000']:.1f} s per 1000 records "
            f"(warm page cache)")
    if "per_record_cold" in entry:
      cold = entry["per_record_cold"]
      line += f", {cold['s_per_1000']:.1f} s per 1000 records (cold)"
    add(line)
    add(f"        (position = epoch * EPOCH_STRIDE + offset; the difference between offsets "
        f"{entry['epoch_records']} and 0, per record)")

  add("\n3. Peak resident memory of a process iterating the pipeline (own process each; VmHWM "
      "and VmRSS sampled every 20 ms)")
  rows = []
  for m in results["memory"]["rows"]:
    rows.append([m["layout"], f"{m['videos']:,}", m["shuffle_buffer"] or "-", f"{m['idle_mb']:.0f}",
                 f"{m['built_mb']:.0f}", f"{m['peak_mb']:.0f}", f"{m['peak_mb'] - m['idle_mb']:.0f}",
                 f"{m['first_batch_s']:.1f}"])
  add(common.table(["layout", "videos shuffled", "shuffle buffer", "idle MB", "built MB", "peak MB",
              "peak - idle MB", "first batch s"], rows))
  add(f"  idle: TensorFlow imported, nothing built; built: source (the index) and pipeline made; "
      f"peak: while reading {results['settings']['rss_batches']} batches")
  fit = results["memory"].get("dmvr_fit")
  if fit:
    idle = np.mean([m["idle_mb"] for m in results["memory"]["rows"] if m["layout"] == "dmvr"])
    add(f"  dmvr: peak = {fit['intercept_mb']:.0f} MB + {fit['mb_per_buffered_record']:.2f} MB per "
        f"buffered record (fit; a stand-in record is {fit['stand_in_record_mb']:.2f} MB): besides "
        f"the shuffle buffer, {fit['intercept_mb'] - idle:.0f} MB above idle, records in flight "
        f"in the file interleave and the parallel parse/decode")
    add(f"  computed: the recipe's {fit['recipe_buffer']}-record buffer -> "
        f"{fit['computed_peak_mb_at_recipe_buffer'] / 1024:.1f} GB peak with these records; with "
        f"{fit['kinetics_record_mb']} MB Kinetics records the buffer alone holds "
        f"{fit['recipe_buffer']} x {fit['kinetics_record_mb']} MB = "
        f"{fit['computed_recipe_buffer_mb'] / 1024:.1f} GB")

  baseline = results.get("baseline")
  add(f"\n4. Clips/s (numpy batches as the trainer takes them; the best of 3 consecutive windows "
      f"of {results['settings']['seconds'] / 3:g} s, the whole time's rate is in the JSON; per core = "
      f"clips/s / cores"
      + (f"; vs baseline = clips/s over the same row's of {baseline['path']}" if baseline else "")
      + ")")
  add(f"   the recipe's pipeline finishes the views on the {results['augment_on']}"
      + (" (the host decodes the crop windows and sends them padded, with each clip's flip and "
         "colour values; the train step resizes and colours)" if results["augment_on"] == "device"
         else " (decode, resize, flip, colour in tf.data)"))
  rows = []
  for r in results["throughput"]:
    rows.append([r["layout"], r["augment"] + ("" if r["recipe"] else " *"), r["dtype"], r["cache"],
                 r["cores"], f"{r['clips_per_s']:.1f}", f"{r['per_core']:.1f}"]
                + ([_ratio(r.get("vs_baseline"))] if baseline else [])
                + [f"{r['cpu_ms_per_clip']:.1f}", f"{r['clips_per_cpu_s']:.1f}",
                   _mb(r["rchar_per_clip"]), _mb(r["read_bytes_per_clip"]),
                   f"{r['output_bytes_per_clip'] / 2**20:.2f}"])
  headers = (["layout", "views on", "dtype", "page cache", "cores", "clips/s", "per core"]
             + (["vs baseline"] if baseline else [])
             + ["CPU ms/clip", "clips/CPU-s", "MB read/clip", "MB storage/clip", "MB out/clip"])
  add(common.table(headers, rows, "llll" + "r" * (len(headers) - 4)))
  add("  * not the recipe's setting: for comparison. CPU ms/clip: the process's user + system CPU "
      "(every thread) per clip; clips/CPU-s = 1000 / that. MB out/clip: what a clip sends to the "
      "device.")
  busy = [r for r in results["throughput"] if r["cores"] > 1
          and max(w["cores_used"] for w in r["windows"]) < 0.8 * r["cores"]]
  if busy:
    add(f"  note: {len(busy)} multi-core rows used under {0.8 * cores:.1f} of the {cores} cores "
        "in every window (process CPU / time): other processes or I/O held them back; their "
        "clips/s per core understates, clips/CPU-s does not")
  add(f"  cold: {results['cold_method']}.")
  shares = [r["eviction"]["core_share"] for r in results["throughput"] if "eviction" in r]
  if shares:
    add(f"        The eviction thread used {100 * min(shares):.1f}-{100 * max(shares):.1f} % of one "
        f"core; 'MB storage/clip' (read_bytes) shows what came from the disk.")
  add("  one core: tf.data's private thread pool of one thread and every thread of the process "
      "pinned to one CPU (sched_setaffinity).")
  by = {(r["layout"], r["augment"], r["dtype"], r["cache"], r["cores"]): r
        for r in results["throughput"]}
  u8 = by.get(("frames", "host", "uint8", "warm", cores))
  f32 = by.get(("frames", "host", "float32", "warm", cores))
  dev = by.get(("frames", "device", "uint8", "warm", cores))
  if u8 and f32:
    add(f"  sending uint8 instead of float32 (frames, views on the host, warm, {cores} cores): "
        f"{u8['clips_per_s']:.1f} vs {f32['clips_per_s']:.1f} clips/s "
        f"({u8['clips_per_s'] / f32['clips_per_s']:.2f}x), "
        f"{u8['output_bytes_per_clip'] / 2**20:.2f} vs {f32['output_bytes_per_clip'] / 2**20:.2f} MB "
        f"per clip to the device")
  if u8 and dev:
    add(f"  finishing the views on the device instead of the host (frames, uint8, warm, {cores} "
        f"cores): {dev['clips_per_s']:.1f} vs {u8['clips_per_s']:.1f} clips/s "
        f"({dev['clips_per_s'] / u8['clips_per_s']:.2f}x), {dev['cpu_ms_per_clip']:.1f} vs "
        f"{u8['cpu_ms_per_clip']:.1f} host CPU ms per clip, {dev['output_bytes_per_clip'] / 2**20:.2f}"
        f" vs {u8['output_bytes_per_clip'] / 2**20:.2f} MB per clip to the device")

  if "stages" in results:
    add("\n   Where one clip's time goes, on one core (each stage timed alone, warm page cache; "
        "'other' = the recipe's whole one-core pipeline minus its host stages: guarding, padding, "
        "batching, numpy)")
    rows = []
    for layout, st in results["stages"].items():
      total = st["pipeline_ms"]
      on_device = st.get("augment") == "device"
      for name, key in (("read (+ parse)", "read_ms"), ("decode crop windows", "decode_ms"),
                        ("augment + uint8" + (" (on the device: not in the total)" if on_device
                                              else ""), "augment_ms"), ("other", "other_ms")):
        rows.append([layout, name, f"{st[key]:.2f}", f"{100 * st[key] / total:.0f}%"])
      rows.append([layout, "whole pipeline (the recipe's, one core)", f"{total:.2f}", "100%"])
    add(common.table(["layout", "stage", "ms / clip", "share"], rows, "llrr"))

  add(f"\n5. Host cores to feed one accelerator (computed: its clips/s x the measured host CPU "
      f"seconds per clip of the recipe's pipeline on {cores} cores, views on the "
      f"{results['augment_on']}; on an idle machine the same as its clips/s / clips/s per core)")
  keys = sorted({k for row in results["feeding"] for k in row["cores"]},
                key=lambda k: (k.split("_")[0] != "frames", k))
  layouts = [l for l in results["layouts"] if l in results["feeding"][0]["read_mb_per_s"]]
  rows = [[row["accelerator"], f"{row['clips_per_s']:.0f}"]
          + [f"{row['cores'][k]:.1f}" if k in row["cores"] else "-" for k in keys]
          + [f"{row['read_mb_per_s'][l]:,.0f}" for l in layouts]
          for row in results["feeding"]]
  add(common.table(["accelerator", "clips/s"] + [f"cores: {k.replace('_', ', ')}" for k in keys]
             + [f"MB/s read: {l}" for l in layouts], rows))
  add("  the accelerator rates are docs/performance.md's 'What to expect' (50 % MFU, computed, not "
      "measured); MB/s read = clips/s x the measured MB read per clip (what the storage must deliver)")
  add(f"\nruntime {results['runtime_s']:.0f} s; load average (1 min) {results['load_average_start']:.2f} "
      f"at the start, {results['load_average_end']:.2f} at the end (other processes on the "
      f"{cores} cores would show here and slow the figures)")
  return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Command line.

def define_flags() -> None:
  from absl import flags  # noqa: PLC0415

  flags.DEFINE_float("seconds", 12.0, "seconds per clips/s measurement (stages: a quarter)")
  flags.DEFINE_integer("videos", 24, "stand-in videos written (each 250 frames, 340x256)")
  flags.DEFINE_list("layouts", list(LAYOUTS), "layouts to measure: frames, dmvr")
  flags.DEFINE_string("json", "", "write every number here (default: results.json in the data dir)")
  flags.DEFINE_float("accelerator_clips_per_s", 0.0, "a train-step rate to feed (clips/s)")
  flags.DEFINE_string("cache_dir", "", "where the stand-in data goes (default $MSCA_JAX_CACHE "
                      "or ~/.cache/msca_jax)")
  flags.DEFINE_integer("batch_size", 16, "clips per batch")
  flags.DEFINE_integer("num_frames", 8, "frames per clip")
  flags.DEFINE_integer("stride", 32, "frame stride")
  flags.DEFINE_integer("image_size", 224, "crop size")
  flags.DEFINE_integer("list_videos", 20_000, "videos an epoch shuffles over")
  flags.DEFINE_list("rss_buffers", ["16", "64", "256"], "DMVR shuffle buffers for peak RSS")
  flags.DEFINE_bool("cold", True, "also measure from a cold page cache")
  flags.DEFINE_bool("stages", True, "also time the stages on one core")
  flags.DEFINE_string("baseline", "", "an earlier run's --json: each clips/s row over its own")


def settings_from_flags(f) -> Settings:
  from absl import app  # noqa: PLC0415

  print(host_memory.keep_freed_memory(), flush=True)  # before TensorFlow starts its threads
  for layout in f.layouts:
    if layout not in LAYOUTS:
      raise app.UsageError(f"--layouts: {layout!r} is not one of {LAYOUTS}")
  if f.baseline and not os.path.isfile(f.baseline):
    raise app.UsageError(f"--baseline={f.baseline}: no such file (expected an earlier run's --json)")
  return Settings(
      layouts=tuple(f.layouts), videos=f.videos, seconds=f.seconds,
      clip=Clip(f.num_frames, f.stride, f.image_size, f.batch_size),
      list_videos=f.list_videos, rss_list_videos=tuple(sorted({f.list_videos, 240_000})),
      rss_buffers=tuple(int(b) for b in f.rss_buffers), cold=f.cold,
      stage_seconds=None if f.stages else 0.0,
      accelerator_clips_per_s=f.accelerator_clips_per_s, cache_dir=f.cache_dir or None,
      baseline=f.baseline or None)


if __name__ == "__main__":
  common.run_program(define_flags, settings_from_flags, run_benchmark, format_report,
                     "results.json")
