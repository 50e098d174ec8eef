"""Random access to a training clip's frames in the frame-folder layout, read alone.

  python -m benchmarks.layout_benchmark [--seconds=5] [--videos=24] [--json=out.json]
      [--rounds=2] [--cache_dir=DIR] [--nocold]

Why: training reads clips, not videos. A Kinetics clip is 8 frames at stride 32 out of ~250 frames
of ~30 KB each, so a layout with random access by frame reads ~240 KB per clip where a
whole-video record reads ~7.5 MB. The project stores training videos as one JPEG file per frame
plus a list file (`data.frames`: `FrameSource.read` is 8 `tf.io.read_file` per clip, graph ops
only). This tool measures only the reading of the bytes of a clip's 8 frames: decoding,
augmentation and batching come after and are the same whatever the layout (the whole pipeline is
input_benchmark's). What the packed and ArrayRecord layouts measured against it is in
docs/data.md#why-frame-folders.

The stand-in frames are benchmarks/common.py's (the same data input_benchmark writes). Two read
paths: `frames`, tf.data over clip indices -> `FrameSource.open` (without the frame-count check)
-> `FrameSource.read`, 8 ReadFile ops and no Python per clip; `frames+check`, the same with the
recipe's default `check_frame_counts` (one directory listing per clip).

For each: clips/s from a warm page cache and from a cold one, with every core and with one
(tf.data's private thread pool of one thread and no intra-op parallelism, and the process pinned
to one CPU), each measured --rounds times interleaved and the best kept (other processes disturb
single runs); process CPU per clip on one core, the steadier number; bytes the process read per
clip (rchar of /proc/self/io) over the bytes of the clip's JPEG frames, and, from a cold cache,
the bytes fetched from storage (read_bytes, readahead included) over the same. Files and inodes
for Kinetics-400 (240k videos x 250 frames) are computed, not measured.

The clip list is fixed and seeded, and is made of permutations of every (video, start) pair, so a
frame is read again only after a whole cycle.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from benchmarks import common
from benchmarks.common import cpu_seconds as _cpu_s, io_counters, num_cores
from msca_jax.data import frames

KINETICS_VIDEOS = 240_000            # Kinetics-400 train, rounded
KINETICS_FRAMES = 250                # 10 s at 25 fps
BATCH = 32                           # clips per tf.data batch (amortises the Python iterator)
PATHS = {"frames": "tf.data: FrameSource.read: 8 ReadFile ops",
         "frames+check": "tf.data: FrameSource.open (check_frame_counts: 1 listing) + read: "
                         "8 ReadFile"}


# ---------------------------------------------------------------------------------------------
# The clips and the read paths.

@dataclasses.dataclass(frozen=True)
class Clips:
  videos: np.ndarray        # [N] int32
  indices: np.ndarray       # [N, T] int32 frame indices (0-based)
  frame_bytes: np.ndarray   # [N] int64: the JPEG bytes of each clip's frames

  def __len__(self) -> int:
    return len(self.videos)


def clip_list(stand_in: common.StandIn, *, num_frames: int = 8, stride: int = 32,
              min_clips: int = 2048, seed: int = 0) -> Clips:
  """Seeded clips: permutations of every (video, start) pair, repeated up to `min_clips`, so a
  frame is read again only after a whole cycle. Starts leave room for the clip when the video is
  long enough; frame indices wrap around the video (as the reference samples) when it is not."""
  num_videos, length = stand_in.num_videos, stand_in.frames_per_video
  starts = max(1, length - (num_frames - 1) * stride)
  pairs = np.stack(np.meshgrid(np.arange(num_videos), np.arange(starts), indexing="ij"),
                   -1).reshape(-1, 2)
  rng = np.random.default_rng(seed)
  cycles = [pairs[rng.permutation(len(pairs))] for _ in range(-(-min_clips // len(pairs)))]
  chosen = np.concatenate(cycles)
  videos = chosen[:, 0].astype(np.int32)
  indices = ((chosen[:, 1:2] + stride * np.arange(num_frames)[None]) % length).astype(np.int32)
  sizes = stand_in.frame_sizes()
  return Clips(videos=videos, indices=indices,
               frame_bytes=sizes[videos[:, None], indices].sum(1))


def read_path(stand_in: common.StandIn, name: str) -> Callable:
  """(video, indices) -> the [T] JPEG strings of a clip, in graph ops, for the read path `name`."""
  videos = frames.read_list(frames.list_path(stand_in.frames_root, common.SPLIT))
  source = frames.FrameSource(stand_in.frames_root, videos, ["stand_in"],
                              check_frame_counts=name == "frames+check")

  @tf.autograph.experimental.do_not_convert  # graph ops only: nothing to convert
  def read(video, indices):
    return source.read(source.open({"video": video}), indices)
  return read


def _dataset(read: Callable, clips: Clips, *, repeat: bool, single_core: bool,
             limit: int | None = None) -> tf.data.Dataset:
  n = len(clips) if limit is None else limit
  ds = tf.data.Dataset.from_tensor_slices((clips.videos[:n], clips.indices[:n]))
  if repeat:
    ds = ds.repeat()
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(BATCH).prefetch(tf.data.AUTOTUNE)
  return common.single_core(ds) if single_core else ds


# ---------------------------------------------------------------------------------------------
# The measurements.

def finite_bytes(read: Callable, files: Sequence[str], clips: Clips, num_clips: int, *,
                 cold: bool) -> dict:
  """Reads the first `num_clips` clips once (none repeats a frame) and counts the bytes: rchar
  (what the read calls returned) and read_bytes (what storage delivered) over the frames' bytes.
  `cold` evicts the files first; otherwise they are read into the page cache first."""
  num_clips = min(num_clips, len(clips))
  batches = iter(_dataset(read, clips, repeat=False, single_core=False, limit=num_clips))
  with common.cold_page_cache(files, interval_s=0) if cold else common.page_cache(files, "warm"):
    io0 = io_counters()
    count = sum(int(batch.shape[0]) for batch in batches)
    io1 = io_counters()
  assert count == num_clips, (count, num_clips)
  frame_bytes = float(clips.frame_bytes[:num_clips].sum())
  return {"clips": num_clips, "frame_bytes_per_clip": frame_bytes / num_clips,
          "rchar_per_clip": (io1["rchar"] - io0["rchar"]) / num_clips,
          "rchar_ratio": (io1["rchar"] - io0["rchar"]) / frame_bytes,
          "read_bytes_per_clip": (io1["read_bytes"] - io0["read_bytes"]) / num_clips,
          "read_bytes_ratio": (io1["read_bytes"] - io0["read_bytes"]) / frame_bytes}


def throughput(read: Callable, files: Sequence[str], clips: Clips, *, seconds: float,
               use_one_core: bool, cold: bool, warmup_s: float = 1.0) -> dict:
  """Clips/s over `seconds` after a warm-up, with process CPU, rchar and read_bytes per clip."""
  with common.page_cache(files, "cold" if cold else "warm") as eviction:
    with common.cores_context(use_one_core) as repin:
      batches = iter(_dataset(read, clips, repeat=True, single_core=use_one_core))
      start = time.perf_counter()
      while time.perf_counter() - start < warmup_s:
        next(batches)
      if repin:
        repin()
      io0, cpu0, t0 = io_counters(), _cpu_s(), time.perf_counter()
      count = 0
      while time.perf_counter() - t0 < seconds or count < 2:
        count += int(next(batches).shape[0])
      elapsed = time.perf_counter() - t0
      io1, cpu1 = io_counters(), _cpu_s()
      del batches
  frame_bytes = float(clips.frame_bytes.mean())
  return {"cache": "cold" if cold else "warm", "cores": 1 if use_one_core else num_cores(),
          "clips_per_s": count / elapsed, "clips": count, "seconds": elapsed,
          "cpu_ms_per_clip": 1e3 * (cpu1 - cpu0) / count,
          "rchar_ratio": (io1["rchar"] - io0["rchar"]) / count / frame_bytes,
          "read_bytes_ratio": (io1["read_bytes"] - io0["read_bytes"]) / count / frame_bytes,
          "eviction": dict(eviction) if cold else None}


def disk_facts(stand_in: common.StandIn) -> dict:
  """Bytes on disk of the frame files against their JPEG bytes (the stand-in)."""
  stats = [os.stat(p) for p in stand_in.frame_files()]
  frame_total = float(stand_in.frame_sizes().sum())
  return {"files": len(stats),
          "allocated_bytes_per_frame_byte": sum(s.st_blocks * 512 for s in stats) / frame_total}


def kinetics_facts() -> dict:
  """Files, inodes and list memory of Kinetics-400 as frame folders (computed)."""
  frames_total = KINETICS_VIDEOS * KINETICS_FRAMES
  return {"files": frames_total + 3, "inodes": frames_total + KINETICS_VIDEOS + 4,
          "detail": f"{frames_total:,} frame files + {KINETICS_VIDEOS:,} folders + list, "
                    "manifest, labels",
          "index_memory": f"~{KINETICS_VIDEOS * 100 / 1e6:.0f} MB list in memory; the frame "
                          "index is the file system's directories"}


# ---------------------------------------------------------------------------------------------
# The whole run.

@dataclasses.dataclass(frozen=True)
class Settings:
  videos: int = 24
  frames_per_video: int = KINETICS_FRAMES
  frame_size: tuple[int, int] = common.KINETICS_FRAME
  jpeg_quality: int = 90
  num_frames: int = 8
  stride: int = 32
  seconds: float = 5.0
  warmup_s: float = 1.0
  bytes_clips: int = 256
  min_clips: int = 2048
  cold: bool = True
  rounds: int = 2                     # every measurement this many times, interleaved: best kept
  cache_dir: str | None = None
  seed: int = 0


def run_benchmark(settings: Settings = Settings(), log: Callable[[str], None] = common.log) -> dict:
  s = settings
  stand_in = common.stand_in_data(s.videos, s.frames_per_video, s.frame_size, s.jpeg_quality,
                                  cache_dir=s.cache_dir, log=log)
  log(f"stand-in: {stand_in.describe()}")
  clips = clip_list(stand_in, num_frames=s.num_frames, stride=s.stride, min_clips=s.min_clips,
                    seed=s.seed)
  log(f"{len(clips)} clips of {s.num_frames} frames at stride {s.stride} (seed {s.seed}), "
      f"{clips.frame_bytes.mean() / 1024:.0f} KB of JPEG a clip; {num_cores()} cores; load average "
      f"{common.load_average():.2f} (other processes disturb the rates)")
  load_start = common.load_average()
  files = stand_in.frame_files()
  reads = {name: read_path(stand_in, name) for name in PATHS}
  variants = {}
  for name, read in reads.items():
    variants[name] = {"how": PATHS[name], "throughput": [],
                      "bytes": finite_bytes(read, files, clips, s.bytes_clips, cold=False)}
    if s.cold:
      variants[name]["cold_bytes"] = finite_bytes(read, files, clips, s.bytes_clips, cold=True)
  runs = {}
  for round_ in range(s.rounds):
    for cache in ("warm", "cold") if s.cold else ("warm",):
      for use_one_core in (False, True):
        for name, read in reads.items():
          result = throughput(read, files, clips, seconds=s.seconds, use_one_core=use_one_core,
                              cold=cache == "cold", warmup_s=s.warmup_s)
          runs.setdefault((name, cache, use_one_core), []).append(result)
          log(f"  round {round_ + 1} {name:14s} {cache} {result['cores']} core(s): "
              f"{result['clips_per_s']:7.0f} clips/s, {result['cpu_ms_per_clip']:.2f} ms CPU a "
              f"clip, storage/frame bytes {result['read_bytes_ratio']:.2f}, load "
              f"{common.load_average():.1f}")
  for (name, _, _), results in runs.items():
    best = max(results, key=lambda r: r["clips_per_s"])
    variants[name]["throughput"].append(
        {**best, "cpu_ms_per_clip": min(r["cpu_ms_per_clip"] for r in results),
         "rounds": [{k: r[k] for k in ("clips_per_s", "cpu_ms_per_clip", "read_bytes_ratio")}
                    for r in results]})
  log("done")
  return {
      "settings": {**dataclasses.asdict(s), "batch": BATCH,
                   "evict_interval_s": common.EVICT_INTERVAL_S},
      "stand_in": dataclasses.asdict(stand_in),
      "clips": {"count": len(clips), "frame_bytes_per_clip": float(clips.frame_bytes.mean())},
      "environment": {"cores": num_cores(), "python": sys.version.split()[0],
                      "tensorflow": tf.__version__, "loadavg_start": load_start,
                      "loadavg_end": common.load_average()},
      "variants": variants, "disk": disk_facts(stand_in), "kinetics400": kinetics_facts(),
      "cold_method": common.COLD_METHOD,
  }


def format_report(results: dict) -> str:
  cores = results["environment"]["cores"]
  settings, env = results["settings"], results["environment"]
  lines = [f"Random access to a clip's bytes ({settings['num_frames']} frames at stride "
           f"{settings['stride']}, {results['clips']['frame_bytes_per_clip'] / 1024:.0f} KB "
           f"of JPEG a clip, mean frame {results['stand_in']['mean_frame_bytes'] / 1024:.1f} KB; "
           f"decode not included). {cores} cores; best of {settings['rounds']} rounds of "
           f"{settings['seconds']:g} s; load average {env['loadavg_start']:.1f} at the start, "
           f"{env['loadavg_end']:.1f} at the end.", ""]
  rows = []
  for name, v in results["variants"].items():
    by = {(t["cache"], t["cores"]): t for t in v["throughput"]}
    rate = [f"{by[k]['clips_per_s']:.0f}" if k in by else "-"
            for k in (("warm", cores), ("warm", 1), ("cold", cores), ("cold", 1))]
    cpu = [f"{by[k]['cpu_ms_per_clip']:.2f}" if k in by else "-" for k in (("warm", 1), ("cold", 1))]
    storage = v.get("cold_bytes", {}).get("read_bytes_ratio")
    rows.append([name, *rate, *cpu, f"{v['bytes']['rchar_ratio']:.2f}",
                 "-" if storage is None else f"{storage:.2f}"])
  lines.append(common.table(
      ["read path", f"warm {cores}c clips/s", "warm 1c clips/s", f"cold {cores}c clips/s",
       "cold 1c clips/s", "CPU ms/clip warm 1c", "cold 1c", "rchar/frames", "storage/frames"],
      rows))
  k, d = results["kinetics400"], results["disk"]
  lines += ["",
            "  clips/s: the best round. 1c: tf.data's private pool of 1 thread and no intra-op "
            "parallelism, and the process pinned to one CPU.",
            "  CPU ms/clip: process CPU per clip on one core (the least of the rounds): 1000 / it "
            "is clips/s per core when nothing else runs.",
            "  rchar/frames: bytes returned by read calls (/proc/self/io rchar) over the clip's "
            "JPEG bytes, warm.",
            "  storage/frames: bytes fetched from storage (/proc/self/io read_bytes, readahead "
            "included) over the clip's JPEG bytes, from an evicted cache.",
            f"  cold: {results['cold_method']}.", ""]
  lines += [f"  {name}: {v['how']}" for name, v in results["variants"].items()]
  lines += ["",
            f"Kinetics-400 (240k videos x 250 frames, computed): {k['files']:,} files, "
            f"{k['inodes']:,} inodes ({k['detail']}); index memory {k['index_memory']}",
            f"on disk (stand-in): {d['allocated_bytes_per_frame_byte']:.3f} bytes allocated per "
            f"JPEG byte over {d['files']} frame files"]
  return "\n".join(lines)


def define_flags() -> None:
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_float("seconds", 5.0, "Seconds per throughput measurement (after a 1 s warm-up).")
  flags.DEFINE_integer("rounds", 2, "Rounds of every measurement, interleaved; the best is kept "
                       "(other processes on the host disturb single runs).")
  flags.DEFINE_integer("videos", 24, "Stand-in videos (250 frames of 340x256 each).")
  flags.DEFINE_string("json", "", "Where to write every number (default: in the data dir).")
  flags.DEFINE_string("cache_dir", "", "Where the stand-in data goes (default $MSCA_JAX_CACHE "
                      "or ~/.cache/msca_jax).")
  flags.DEFINE_bool("cold", True, "Also measure from a cold page cache.")


def settings_from_flags(f) -> Settings:
  return Settings(videos=f.videos, seconds=f.seconds, rounds=f.rounds, cold=f.cold,
                  cache_dir=f.cache_dir or None)


if __name__ == "__main__":
  common.run_program(define_flags, settings_from_flags, run_benchmark, format_report,
                     "layout_results.json")
