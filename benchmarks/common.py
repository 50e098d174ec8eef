"""What the input benchmarks share: stand-in videos shaped like prepared Kinetics, the page cache
(warm, evicted), and what they measure about this process (bytes read, CPU time, cores, one core).

The stand-in videos are 10 s at 25 fps, 340x256 frames, JPEG quality 90, textured moving content
that compresses to about 30 KB a frame, written once into a cache directory (--cache_dir, else
$MSCA_JAX_CACHE, else ~/.cache/msca_jax). Each frame is encoded once and the same JPEG bytes are
stored in both layouts: frame folders (one file per frame and a list, `data.frames`) and DMVR
shards (one record per whole video, `data.dmvr`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import threading
import time
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow as tf

from msca_jax.data import dmvr, frames
from msca_jax.data.decode import DecodeSettings

KINETICS_FRAME = (256, 340)          # (height, width): short side 256, as prepared Kinetics
KINETICS_KB_PER_FRAME = 30.0         # at 340x256, JPEG quality 90
SPLIT = "train"
EVICT_INTERVAL_S = 0.25


def log(message: str) -> None:
  print(message, flush=True)


def run_program(define_flags: Callable[[], None], settings_from_flags: Callable, run: Callable,
                report: Callable[[dict], str], json_name: str) -> None:
  """A benchmark's command line: its flags, its settings from them, the run, its report printed
  and every number it measured written to --json (default: `json_name` beside the stand-in data).
  Bad flags are one `error:` line (msca_jax.cli)."""
  from absl import flags  # noqa: PLC0415
  from msca_jax import cli  # noqa: PLC0415

  def main(argv: Sequence[str]) -> None:
    del argv
    results = run(settings_from_flags(flags.FLAGS))
    print(report(results), flush=True)
    path = flags.FLAGS.json or os.path.join(results["stand_in"]["root"], json_name)
    with open(path, "w") as out:
      json.dump(results, out, indent=1)
    print(f"all numbers: {path}")

  define_flags()
  cli.run(main)


def load_average() -> float:
  return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


# ---------------------------------------------------------------------------------------------
# Stand-in data.

@dataclasses.dataclass(frozen=True)
class StandIn:
  """Stand-in videos stored in both layouts (the same JPEG bytes)."""
  root: str
  num_videos: int
  frames_per_video: int
  height: int
  width: int
  jpeg_quality: int
  fps: float
  mean_frame_bytes: float          # over every frame written
  mean_record_bytes: float         # a serialised DMVR record (one video)
  texture_amplitude: float
  reused: bool = False

  @property
  def frames_root(self) -> str:
    return os.path.join(self.root, "frames")

  @property
  def dmvr_root(self) -> str:
    return os.path.join(self.root, "dmvr")

  def frame_path(self, video: int, index: int) -> str:
    """Frame `index` (0-based) of stand-in video `video`."""
    return os.path.join(self.frames_root, folder(video), frames.FrameNames().name(index))

  def frame_files(self) -> list[str]:
    return [self.frame_path(v, i) for v in range(self.num_videos)
            for i in range(self.frames_per_video)]

  def frame_sizes(self) -> np.ndarray:
    """[videos, frames] JPEG bytes of every frame (a frame file holds exactly its JPEG)."""
    return np.asarray([os.path.getsize(p) for p in self.frame_files()],
                      np.int64).reshape(self.num_videos, self.frames_per_video)

  def dmvr_files(self) -> list[str]:
    return dmvr.list_shards(self.dmvr_root, SPLIT)

  def files(self, layout: str) -> list[str]:
    return self.frame_files() if layout == "frames" else self.dmvr_files()

  def describe(self) -> str:
    seconds = self.frames_per_video / self.fps
    return (f"{self.num_videos} stand-in videos x {self.frames_per_video} frames ({seconds:.1f} s at "
            f"{self.fps:g} fps), {self.width}x{self.height}, JPEG quality {self.jpeg_quality}: "
            f"{self.mean_frame_bytes / 1024:.1f} KB per frame (mean of "
            f"{self.num_videos * self.frames_per_video}), {self.mean_record_bytes / 2**20:.2f} MB per "
            f"DMVR record")


def folder(video: int) -> str:
  return f"v{video:05d}"


def cache_root(cache_dir: str | None = None) -> str:
  return (cache_dir or os.environ.get("MSCA_JAX_CACHE") or os.path.expanduser("~/.cache/msca_jax"))


class Content:
  """Textured moving frames: smooth colour waves drifting in time plus a multi-scale noise texture
  that slides across the frame; `amplitude` sets the texture's strength, hence the JPEG size."""

  def __init__(self, seed: int, height: int, width: int):
    rng = np.random.default_rng(seed)
    self.height, self.width, self.pad = height, width, max(8, min(height, width) // 4)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    base = (7 * xs + 5 * ys)[..., None]
    self.sin, self.cos = np.sin(base), np.cos(base)
    self.phase = rng.uniform(0, 2 * np.pi, 3)
    self.colour = rng.uniform(0.4, 1.0, 3) * 70
    big = (height + 2 * self.pad, width + 2 * self.pad)
    layers = []
    for scale, weight in ((16, 1.0), (4, 0.6), (1, 0.3)):
      small = rng.normal(0, 1, (max(2, big[0] // scale + 1), max(2, big[1] // scale + 1), 3))
      layer = tf.image.resize(small[None].astype(np.float32), big, method="bicubic")[0].numpy()
      layers.append(weight * layer)
    texture = sum(layers)
    self.texture = (texture / texture.std()).astype(np.float32)

  def frame(self, t: int, amplitude: float) -> np.ndarray:
    angle = self.phase + 0.05 * t
    wave = self.sin * np.cos(angle) + self.cos * np.sin(angle)   # sin(base + angle)
    span = 2 * self.pad                                   # the texture's margin
    dy = span - abs(span - t % (2 * span))                # to and fro: no jumps
    dx = span - abs(span - (2 * t) % (2 * span))
    window = self.texture[dy:dy + self.height, dx:dx + self.width]
    return np.clip(128 + self.colour * wave + amplitude * window, 0, 255).astype(np.uint8)


def jpeg(frame: np.ndarray, quality: int) -> bytes:
  return tf.io.encode_jpeg(frame, quality=quality).numpy()


def calibrate_texture(height: int, width: int, quality: int, target_bytes: float) -> float:
  """The texture amplitude whose frames compress to about `target_bytes` (bisection)."""
  content = Content(10_000, height, width)

  def mean_bytes(amplitude):
    return np.mean([len(jpeg(content.frame(t, amplitude), quality)) for t in (0, 40, 80, 120)])

  lo, hi = 0.0, 160.0
  for _ in range(12):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if mean_bytes(mid) < target_bytes else (lo, mid)
  return (lo + hi) / 2


def stand_in_data(num_videos: int = 24, frames_per_video: int = 250,
                  size: tuple[int, int] = KINETICS_FRAME, jpeg_quality: int = 90,
                  kb_per_frame: float | None = None, fps: float = 25.0,
                  cache_dir: str | None = None, log: Callable[[str], None] = log) -> StandIn:
  """Writes (once) `num_videos` stand-in videos as frame folders and as DMVR shards.

  The directory is named by the parameters, so a rerun with the same ones reuses it.
  `kb_per_frame` defaults to 30 KB at 340x256, scaled by area for other sizes.
  """
  height, width = size
  if kb_per_frame is None:
    kb_per_frame = KINETICS_KB_PER_FRAME * height * width / (KINETICS_FRAME[0] * KINETICS_FRAME[1])
  name = (f"stand_in-v2-{num_videos}x{frames_per_video}-{width}x{height}-q{jpeg_quality}-"
          f"{kb_per_frame:g}kb")
  root = os.path.join(cache_root(cache_dir), name)
  stats_path = os.path.join(root, "stand_in.json")
  if os.path.exists(stats_path):
    with open(stats_path) as f:
      return StandIn(root=root, reused=True, **json.load(f))

  log(f"writing {num_videos} stand-in videos to {root} (once; a rerun reuses them)")
  tmp = f"{root}.tmp-{os.getpid()}"
  try:
    stats = _write_stand_in(tmp, num_videos, frames_per_video, height, width, jpeg_quality,
                            kb_per_frame, fps, log)
    os.replace(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return StandIn(root=root, **stats)


def _write_stand_in(tmp: str, num_videos: int, frames_per_video: int, height: int, width: int,
                    jpeg_quality: int, kb_per_frame: float, fps: float,
                    log: Callable[[str], None]) -> dict:
  start = time.perf_counter()
  amplitude = calibrate_texture(height, width, jpeg_quality, kb_per_frame * 1024)
  frames_root, dmvr_root = os.path.join(tmp, "frames"), os.path.join(tmp, "dmvr")
  os.makedirs(frames_root, exist_ok=True)
  num_classes = min(4, num_videos)
  class_names = [f"class{i}" for i in range(num_classes)]
  frame_bytes, record_bytes = [], []

  def records() -> Iterable[bytes]:
    for i in range(num_videos):
      content = Content(i, height, width)
      jpegs = [jpeg(content.frame(t, amplitude), jpeg_quality) for t in range(frames_per_video)]
      frame_bytes.extend(len(j) for j in jpegs)
      frames.write_frames(frames_root, folder(i), jpegs)
      record = dmvr.make_example(jpegs, i % num_classes, class_names[i % num_classes],
                                 f"stand_in/{folder(i)}")
      record_bytes.append(len(record))
      if (i + 1) % max(1, num_videos // 6) == 0 or i + 1 == num_videos:
        log(f"  {i + 1}/{num_videos} videos, {np.mean(frame_bytes) / 1024:.1f} KB per frame so far")
      yield record

  dmvr.write_labels(dmvr_root, class_names)
  dmvr.write_shards(dmvr_root, SPLIT, records(), num_shards=min(8, num_videos))
  frames.write_list(frames.list_path(frames_root, SPLIT),
                    [(folder(i), frames_per_video, i % num_classes) for i in range(num_videos)])
  settings = DecodeSettings(fps=fps, short_side=min(height, width),
                            jpeg_quality=jpeg_quality).as_json()
  frames.write_manifest(frames_root, SPLIT, settings)
  dmvr.write_labels(frames_root, class_names)
  # Beside the shards, as sources.dmvr_source reads them: the frames' settings.
  with open(os.path.join(dmvr_root, f"{SPLIT}.manifest.json"), "w") as f:
    json.dump({"version": 1, "layout": "dmvr", "settings": settings}, f, indent=1)
  stats = dict(num_videos=num_videos, frames_per_video=frames_per_video, height=height,
               width=width, jpeg_quality=jpeg_quality, fps=fps,
               mean_frame_bytes=float(np.mean(frame_bytes)),
               mean_record_bytes=float(np.mean(record_bytes)), texture_amplitude=amplitude)
  with open(os.path.join(tmp, "stand_in.json"), "w") as f:
    json.dump(stats, f, indent=1)
  os.sync()  # clean pages: posix_fadvise can evict them
  log(f"  written in {time.perf_counter() - start:.0f} s")
  return stats


# ---------------------------------------------------------------------------------------------
# The page cache.

def warm_page_cache(paths: Sequence[str]) -> float:
  """Reads every file once so that the measurement finds them in the page cache; seconds taken."""
  start = time.perf_counter()
  for path in paths:
    with open(path, "rb", buffering=0) as f:
      while f.read(1 << 22):
        pass
  return time.perf_counter() - start


def _evict(fds: Sequence[int]) -> None:
  for fd in fds:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


@contextlib.contextmanager
def cold_page_cache(paths: Sequence[str], interval_s: float = EVICT_INTERVAL_S):
  """Evicts `paths` from the page cache on entry and every `interval_s` until exit (with
  interval_s 0, on entry only).

  posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) on every data file (no root needed): the stand-in
  set is small, so without the repeats a measurement would soon read from memory again. Yields a
  dict that gets the eviction thread's rounds and CPU seconds (counted in the process's CPU).
  """
  _allow_open_files(len(paths) + 256)
  fds = [os.open(p, os.O_RDONLY) for p in paths]
  stats = {"rounds": 0, "cpu_s": 0.0, "interval_s": interval_s, "files": len(fds)}
  stop = threading.Event()

  def loop():
    cpu = time.thread_time()
    while not stop.wait(interval_s):
      _evict(fds)
      stats["rounds"] += 1
    stats["cpu_s"] = time.thread_time() - cpu

  try:
    _evict(fds)
    thread = threading.Thread(target=loop, daemon=True, name="evict") if interval_s > 0 else None
    if thread:
      thread.start()
    try:
      yield stats
    finally:
      stop.set()
      if thread:
        thread.join()
  finally:
    for fd in fds:
      os.close(fd)


def page_cache(paths: Sequence[str], state: str):
  """A context in which `paths` are in the page cache ('warm') or kept out of it ('cold'); it
  yields None warm, the eviction's stats cold."""
  if state == "warm":
    warm_page_cache(paths)
    return contextlib.nullcontext(None)
  return cold_page_cache(paths)


COLD_METHOD = (f"every data file evicted from the page cache with posix_fadvise(fd, 0, 0, "
               f"POSIX_FADV_DONTNEED) before the measurement and every {EVICT_INTERVAL_S:g} s "
               f"during it (no root needed); the eviction thread's CPU is included in CPU ms per "
               f"clip")


def _allow_open_files(count: int) -> None:
  """Raises the soft limit on open files towards `count` (up to the hard limit)."""
  try:
    import resource  # noqa: PLC0415  (POSIX only)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
      resource.setrlimit(resource.RLIMIT_NOFILE,
                         (count if hard == resource.RLIM_INFINITY else min(count, hard), hard))
  except (ImportError, ValueError, OSError):
    pass


# ---------------------------------------------------------------------------------------------
# This process: bytes read, CPU, cores, one core.

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


def cores_context(use_one_core: bool):
  """one_core() when asked, else a context that yields None (nothing to re-pin)."""
  return one_core() if use_one_core else contextlib.nullcontext(None)


def single_core(ds: tf.data.Dataset) -> tf.data.Dataset:
  """tf.data's own threads: one (a private pool of one thread, no intra-op parallelism)."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  return ds.with_options(options)


def table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
  """A fixed-width table: the first column left-aligned, the others right (or as `align` says)."""
  text = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(r[i]) for r in text) for i in range(len(headers))]
  align = align or "l" + "r" * (len(headers) - 1)
  lines = []
  for n, row in enumerate(text):
    cells = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)]
    lines.append("  " + "  ".join(cells).rstrip())
    if n == 0:
      lines.append("  " + "  ".join("-" * w for w in widths))
  return "\n".join(lines)
