"""Random access to a training clip's frames in three storage layouts, measured side by side.

  python -m benchmarks.layout_benchmark [--seconds=5] [--videos=24] [--json=out.json]
      [--rounds=2] [--cache_dir=/tmp/layout_benchmark] [--nocold] [--paths=frames,packed]

Why: training reads clips, not videos. A Kinetics clip is 8 frames at stride 32 out of ~250 frames
of ~30 KB each, so a layout with random access by frame reads ~240 KB per clip where a
whole-video record reads ~7.5 MB. The project stores training videos as one JPEG file per frame
plus a list file (`data.frames`: `FrameSource.read` is 8 `tf.io.read_file` per clip, graph ops
only); its issue asked to choose the random-access mechanism by measurement, with ArrayRecord as
the named alternative. This tool measures only the reading of the bytes of a clip's 8 frames:
decoding, augmentation and batching come after and are the same whatever the layout.

The same stand-in frames (Kinetics-shaped: 340x256 JPEG at quality 90, textured to ~30 KB a frame)
are written once in three layouts under --cache_dir:

  (a) frames       one file per frame and a list (`data.frames`). Read by tf.data over clip indices
                   -> `FrameSource.open` (without the frame-count check) -> `FrameSource.read`:
                   8 ReadFile ops, no Python per clip. `frames+check` is the same with the
                   recipe's default `check_frame_counts` (one directory listing per clip).
  (b) arrayrecord  ArrayRecord shards, one record per frame, group_size:1 and uncompressed (JPEG
                   does not compress; each record is its own chunk, so a random read reads only
                   that record), with an index of (shard, first record, frame count) per video.
                   Read by tf.data -> tf.numpy_function -> ArrayRecordReader.read([8 positions])
                   (reader options readahead_buffer_size:0,max_parallelism:0, the reader's advice
                   for random access), the way a tf.data user feeds a Python random-access source;
                   `arrayrecord-python` is the same reader in a plain Python loop and
                   `arrayrecord-datasource-python` is ArrayRecordDataSource.__getitems__ (Grain's
                   API: global record keys) in a plain Python loop, and
                   `arrayrecord-each-python` is 8 calls of read([1 position]), all for reference.
                   A read of several positions goes through ArrayRecord's thread pool, and each
                   read call walks a table with an entry per chunk of the file, so the cost of a
                   call against the records in a file is measured too (arrayrecord_scaling).
  (c) packed       one file per shard of videos holding the concatenated JPEG bytes, and an
                   offsets index. Read by tf.data -> tf.numpy_function -> 8 os.pread (the files
                   opened with POSIX_FADV_RANDOM: no readahead of the unread neighbours);
                   `packed-python` is the same reads in a plain Python loop.

For each: clips/s from a warm page cache and from a cold one, with every core and with one
(tf.data's private thread pool of one thread and no intra-op parallelism, and the process pinned
to one CPU), each measured --rounds times interleaved and the best kept (other processes on a
shared machine disturb single runs); process CPU per clip on one core, the steadier number; bytes
the process read per clip (rchar of /proc/self/io) over the bytes of the clip's JPEG frames, and,
from a cold cache, the bytes fetched from storage (read_bytes, readahead included) over the same.
Files and inodes for Kinetics-400 (240k videos x 250 frames) are computed, not measured, and so is
whether the read path works on gs:// as it is.

Cold means evicted: posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) on every data file (it works
without root, on clean pages of files this user can open), once before a finite run and, during a
throughput run, again every 0.25 s from a separate process (so that it takes no GIL from the
measured one). The clip list is fixed and seeded, the same for every layout, and is made of
permutations of every (video, start) pair, so a frame is read again only after a whole cycle.

array_record is optional: it is imported lazily, and when it is missing the tool says so and
measures the rest. The tool imports only tensorflow, numpy, absl and `msca_jax.data.frames` (no
JAX), so it runs in any environment with TensorFlow and, for (b), array-record.

The pieces are functions (stand_in_data, clip_list, read_paths, finite_bytes, throughput,
arrayrecord_scaling, run_benchmark, format_report) so tests can run them without flags.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from msca_jax.data import frames
from benchmarks import common
from benchmarks.common import cpu_seconds as _cpu_s, io_counters, num_cores, one_core

KINETICS_FRAME = (256, 340)          # (height, width): short side 256, as prepared Kinetics
KINETICS_KB_PER_FRAME = 30.0         # at 340x256, JPEG quality 90
KINETICS_VIDEOS = 240_000            # Kinetics-400 train, rounded
KINETICS_FRAMES = 250                # 10 s at 25 fps
KINETICS_SHARDS = 1024               # for (b) and (c): ~1.7 GiB, ~234 videos, ~58.6k frames each
SPLIT = "train"
ARRAYRECORD_WRITER_OPTIONS = "group_size:1,uncompressed"
ARRAYRECORD_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
ARRAYRECORD_MISSING = "array_record not installed (pip install array-record) — skipped"
EVICT_INTERVAL_S = 0.25
BATCH = 32                           # clips per tf.data batch (amortises the Python iterator)
LAYOUTS = ("frames", "arrayrecord", "packed")

GCS = {
    "frames": "yes: tf.io.read_file goes through TensorFlow's gs:// file system (per frame a "
              "request for its bytes, and one for its size unless the stat cache has it); the "
              "list is read with tf.io.gfile",
    "arrayrecord": "reading, yes with array_record >= 0.8.3 (Nov 2025): ArrayRecordReader opens "
                   "gs:// paths itself with riegeli's GcsReader (google-cloud-cpp, its own "
                   "credentials, not TensorFlow's file system); older versions read local paths "
                   "only (FdReader), so gs:// needs a FUSE mount (gcsfuse). The writer writes "
                   "local files only: write, then copy to the bucket",
    "packed": "no, needs code: os.pread reads local files; on gs:// the reader would use "
              "tf.io.gfile.GFile(path).seek(offset) + read(size) (a ranged GET per frame), or a "
              "FUSE mount",
}


def _log(message: str) -> None:
  print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# ArrayRecord, optional.

def import_array_record():
  """(array_record_module, array_record_data_source, version), or None when not importable."""
  try:
    from array_record.python import array_record_data_source  # noqa: PLC0415
    from array_record.python import array_record_module  # noqa: PLC0415
  except ImportError:
    return None
  try:
    from importlib import metadata  # noqa: PLC0415
    version = metadata.version("array_record")
  except Exception:  # noqa: BLE001 - the version is only reported
    version = "unknown"
  return array_record_module, array_record_data_source, version


def _version_at_least(version: str, wanted: tuple[int, ...]) -> bool | None:
  try:
    parts = tuple(int(p) for p in version.split(".")[:len(wanted)])
  except ValueError:
    return None
  return parts >= wanted


# ---------------------------------------------------------------------------------------------
# Stand-in data, written once in the three layouts.

@dataclasses.dataclass(frozen=True)
class StandIn:
  """Stand-in videos: the same JPEG bytes as frame files, packed shards and ArrayRecord shards."""
  root: str
  num_videos: int
  frames_per_video: int
  height: int
  width: int
  jpeg_quality: int
  videos_per_shard: int
  mean_frame_bytes: float
  reused: bool = False

  @property
  def frames_root(self) -> str:
    return os.path.join(self.root, "frames")

  @property
  def packed_root(self) -> str:
    return os.path.join(self.root, "packed")

  @property
  def arrayrecord_root(self) -> str:
    return os.path.join(self.root, "arrayrecord")

  @property
  def num_shards(self) -> int:
    return -(-self.num_videos // self.videos_per_shard)

  def frame_sizes(self) -> np.ndarray:
    """[videos, frames] JPEG bytes of every frame."""
    return np.load(os.path.join(self.root, "frame_sizes.npy"))

  def files(self, layout: str) -> list[str]:
    """The data files of a layout (what the cold measurements evict)."""
    if layout == "frames":
      names = frames.FrameNames()
      return [os.path.join(self.frames_root, _folder(v), names.name(i))
              for v in range(self.num_videos) for i in range(self.frames_per_video)]
    root = self.packed_root if layout == "packed" else self.arrayrecord_root
    return [os.path.join(root, _shard_name(layout, s)) for s in range(self.num_shards)]

  def describe(self) -> str:
    return (f"{self.num_videos} videos x {self.frames_per_video} frames of "
            f"{self.width}x{self.height} JPEG at quality {self.jpeg_quality}, "
            f"mean {self.mean_frame_bytes / 1024:.1f} KB a frame, {self.videos_per_shard} videos "
            f"a shard for (b) and (c), under {self.root}")


def _folder(video: int) -> str:
  return f"v{video:05d}"


def _shard_name(layout: str, shard: int) -> str:
  return f"shard-{shard:05d}." + ("array_record" if layout == "arrayrecord" else "bin")


class _Content:
  """Textured moving frames: a colour wave drifting in time plus a multi-scale noise texture that
  slides across the frame; `amplitude` sets the texture's strength, hence the JPEG size."""

  def __init__(self, seed: int, height: int, width: int):
    rng = np.random.default_rng(seed)
    self.height, self.width, self.pad = height, width, max(8, min(height, width) // 4)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    self.base = (7 * xs + 5 * ys)[..., None] + rng.uniform(0, 2 * np.pi, 3)
    self.colour = rng.uniform(0.4, 1.0, 3) * 70
    big = (height + 2 * self.pad, width + 2 * self.pad)
    texture = 0
    for scale, weight in ((16, 1.0), (4, 0.6), (1, 0.3)):
      small = rng.normal(0, 1, (max(2, big[0] // scale + 1), max(2, big[1] // scale + 1), 3))
      texture = texture + weight * tf.image.resize(small[None].astype(np.float32), big,
                                                   method="bicubic")[0].numpy()
    self.texture = (texture / texture.std()).astype(np.float32)

  def frame(self, t: int, amplitude: float) -> np.ndarray:
    span = 2 * self.pad
    dy = span - abs(span - t % (2 * span))            # to and fro, no jumps
    dx = span - abs(span - (2 * t) % (2 * span))
    window = self.texture[dy:dy + self.height, dx:dx + self.width]
    wave = np.sin(self.base + 0.05 * t)
    return np.clip(128 + self.colour * wave + amplitude * window, 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> bytes:
  return tf.io.encode_jpeg(image, quality=quality).numpy()


def _calibrate(height: int, width: int, quality: int, target_bytes: float) -> float:
  """The texture amplitude whose frames compress to about `target_bytes` (bisection)."""
  content = _Content(10_000, height, width)
  lo, hi = 0.0, 160.0
  for _ in range(10):
    mid = (lo + hi) / 2
    size = np.mean([len(_jpeg(content.frame(t, mid), quality)) for t in (0, 50, 100)])
    lo, hi = (mid, hi) if size < target_bytes else (lo, mid)
  return (lo + hi) / 2


def _read_frames(stand_in_root: str, video: int, count: int) -> list[bytes]:
  names = frames.FrameNames()
  folder = os.path.join(stand_in_root, "frames", _folder(video))
  out = []
  for i in range(count):
    with open(os.path.join(folder, names.name(i)), "rb") as f:
      out.append(f.read())
  return out


def _write_packed(root: str, num_videos: int, frames_per_video: int, videos_per_shard: int) -> None:
  """Shard files of concatenated JPEGs; index.npz: per video its shard and the position of its
  first offset k in `offsets` (frames + 1 offsets a video: frame i is offsets[k+i]:offsets[k+i+1])."""
  tmp = os.path.join(root, f"packed.tmp-{os.getpid()}")
  os.makedirs(tmp, exist_ok=True)
  shard_of, first, offsets = [], [], []
  for s in range(-(-num_videos // videos_per_shard)):
    with open(os.path.join(tmp, _shard_name("packed", s)), "wb") as f:
      position = 0
      for v in range(s * videos_per_shard, min(num_videos, (s + 1) * videos_per_shard)):
        shard_of.append(s)
        first.append(len(offsets))
        for data in _read_frames(root, v, frames_per_video):
          offsets.append(position)
          f.write(data)
          position += len(data)
        offsets.append(position)
  np.savez(os.path.join(tmp, "index.npz"), shard=np.asarray(shard_of, np.int32),
           first=np.asarray(first, np.int64), offsets=np.asarray(offsets, np.int64))
  os.replace(tmp, os.path.join(root, "packed"))


def _write_arrayrecord(root: str, num_videos: int, frames_per_video: int,
                       videos_per_shard: int, module) -> None:
  """ArrayRecord shards, one record per frame; index.npz: per video its shard, its first record
  in the shard, its first global record key (ArrayRecordDataSource numbering) and its frames."""
  tmp = os.path.join(root, f"arrayrecord.tmp-{os.getpid()}")
  os.makedirs(tmp, exist_ok=True)
  shard_of, first, global_first, count = [], [], [], []
  total = 0
  for s in range(-(-num_videos // videos_per_shard)):
    writer = module.ArrayRecordWriter(os.path.join(tmp, _shard_name("arrayrecord", s)),
                                      ARRAYRECORD_WRITER_OPTIONS)
    position = 0
    for v in range(s * videos_per_shard, min(num_videos, (s + 1) * videos_per_shard)):
      jpegs = _read_frames(root, v, frames_per_video)
      shard_of.append(s)
      first.append(position)
      global_first.append(total)
      count.append(len(jpegs))
      for data in jpegs:
        writer.write(data)
      position += len(jpegs)
      total += len(jpegs)
    writer.close()
  np.savez(os.path.join(tmp, "index.npz"), shard=np.asarray(shard_of, np.int32),
           first=np.asarray(first, np.int64), global_first=np.asarray(global_first, np.int64),
           count=np.asarray(count, np.int32))
  os.replace(tmp, os.path.join(root, "arrayrecord"))


def stand_in_data(num_videos: int = 24, frames_per_video: int = KINETICS_FRAMES,
                  size: tuple[int, int] = KINETICS_FRAME, jpeg_quality: int = 90,
                  videos_per_shard: int = 6, cache_dir: str = "/tmp/layout_benchmark",
                  with_arrayrecord: bool = True,
                  log: Callable[[str], None] = _log) -> StandIn:
  """Writes (once) the stand-in videos as frame files, then the same bytes as packed shards and,
  when array_record is importable and `with_arrayrecord`, as ArrayRecord shards.

  The directory is named by the parameters, so a rerun with the same ones reuses it (and adds the
  ArrayRecord shards if they are missing). ~30 KB a frame at 340x256, scaled by area otherwise.
  """
  height, width = size
  kb = KINETICS_KB_PER_FRAME * height * width / (KINETICS_FRAME[0] * KINETICS_FRAME[1])
  name = (f"layout_benchmark-v1-{num_videos}x{frames_per_video}-{width}x{height}-"
          f"q{jpeg_quality}-s{videos_per_shard}")
  root = os.path.join(cache_dir, name)
  stats_path = os.path.join(root, "stand_in.json")
  reused = os.path.exists(stats_path)
  if not reused:
    if os.path.exists(root):  # an interrupted earlier write
      shutil.rmtree(root)
    log(f"writing {num_videos} stand-in videos to {root} (once; a rerun reuses them)")
    start = time.perf_counter()
    amplitude = _calibrate(height, width, jpeg_quality, kb * 1024)
    frames_tmp = os.path.join(root, f"frames.tmp-{os.getpid()}")
    os.makedirs(frames_tmp, exist_ok=True)
    sizes = np.zeros((num_videos, frames_per_video), np.int64)
    for v in range(num_videos):
      content = _Content(v, height, width)
      jpegs = [_jpeg(content.frame(t, amplitude), jpeg_quality) for t in range(frames_per_video)]
      sizes[v] = [len(j) for j in jpegs]
      frames.write_frames(frames_tmp, _folder(v), jpegs)
      if (v + 1) % max(1, num_videos // 4) == 0 or v + 1 == num_videos:
        log(f"  {v + 1}/{num_videos} videos, {sizes[:v + 1].mean() / 1024:.1f} KB a frame so far")
    frames.write_list(frames.list_path(frames_tmp, SPLIT),
                      [(_folder(v), frames_per_video, 0) for v in range(num_videos)])
    os.replace(frames_tmp, os.path.join(root, "frames"))
    np.save(os.path.join(root, "frame_sizes.npy"), sizes)
    _write_packed(root, num_videos, frames_per_video, videos_per_shard)
    stats = dict(num_videos=num_videos, frames_per_video=frames_per_video, height=height,
                 width=width, jpeg_quality=jpeg_quality, videos_per_shard=videos_per_shard,
                 mean_frame_bytes=float(sizes.mean()))
    os.sync()
    with open(stats_path + ".tmp", "w") as f:
      json.dump(stats, f, indent=1)
    os.replace(stats_path + ".tmp", stats_path)
    log(f"  written in {time.perf_counter() - start:.0f} s")
  with open(stats_path) as f:
    stand_in = StandIn(root=root, reused=reused, **json.load(f))
  ar = import_array_record() if with_arrayrecord else None
  if ar is not None and not os.path.exists(os.path.join(stand_in.arrayrecord_root, "index.npz")):
    log(f"writing the ArrayRecord shards ({ARRAYRECORD_WRITER_OPTIONS}) from the frame files")
    _write_arrayrecord(root, num_videos, frames_per_video, videos_per_shard, ar[0])
    os.sync()
  return stand_in


# ---------------------------------------------------------------------------------------------
# The clips and the read paths.

@dataclasses.dataclass(frozen=True)
class Clips:
  videos: np.ndarray        # [N] int32
  indices: np.ndarray       # [N, T] int32 frame indices (0-based)
  frame_bytes: np.ndarray   # [N] int64: the JPEG bytes of each clip's frames

  def __len__(self) -> int:
    return len(self.videos)


def clip_list(stand_in: StandIn, *, num_frames: int = 8, stride: int = 32, min_clips: int = 2048,
              seed: int = 0) -> Clips:
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


ARRAYRECORD_PATHS = ("arrayrecord", "arrayrecord-python", "arrayrecord-each-python",
                     "arrayrecord-datasource-python")


@dataclasses.dataclass
class ReadPath:
  """One way of reading clips: `tf_map` (video, indices) -> [T] string tensor for tf.data, or
  `read` (video, indices) -> list of bytes for a Python loop."""
  name: str
  layout: str
  label: str
  how: str
  gil: str
  files: list[str]
  tf_map: Callable | None = None
  read: Callable | None = None
  close: Callable[[], None] = lambda: None   # shared by the paths of a layout: close_paths


def close_paths(paths: Sequence[ReadPath]) -> None:
  """Closes the readers and files the paths hold (each layout's once)."""
  done = set()
  for path in paths:
    if id(path.close) not in done:
      done.add(id(path.close))
      path.close()


def _numpy_map(read: Callable, num_frames: int) -> Callable:
  def call(video, indices):
    return np.array(read(int(video), indices), dtype=object)

  @tf.autograph.experimental.do_not_convert
  def fn(video, indices):
    out = tf.numpy_function(call, [video, indices], tf.string, name="read_clip")
    out.set_shape([num_frames])
    return out
  return fn


def read_paths(stand_in: StandIn, num_frames: int, ar=None) -> list[ReadPath]:
  """The read paths to measure; ArrayRecord's only when `ar` (import_array_record()) is given."""
  paths = []
  videos = frames.read_list(frames.list_path(stand_in.frames_root, SPLIT))
  for check in (False, True):
    source = frames.FrameSource(stand_in.frames_root, videos, ["stand_in"],
                                check_frame_counts=check)

    @tf.autograph.experimental.do_not_convert  # graph ops only: nothing to convert
    def frames_map(video, indices, source=source):
      return source.read(source.open({"video": video}), indices)
    paths.append(ReadPath(
        name="frames+check" if check else "frames", layout="frames", label="(a)",
        how=("tf.data: FrameSource.open (check_frame_counts: 1 listing) + read: 8 ReadFile"
             if check else "tf.data: FrameSource.read: 8 ReadFile ops"),
        gil="no", files=stand_in.files("frames"), tf_map=frames_map))

  if ar is not None:
    module, data_source, _ = ar
    index = np.load(os.path.join(stand_in.arrayrecord_root, "index.npz"))
    ar_shard, ar_first, global_first = index["shard"], index["first"], index["global_first"]
    ar_files = stand_in.files("arrayrecord")
    readers = [module.ArrayRecordReader(p, ARRAYRECORD_READER_OPTIONS,
                                        file_reader_buffer_size=32768) for p in ar_files]

    def ar_read(video, indices):
      return readers[ar_shard[video]].read([int(ar_first[video] + i) for i in indices])
    source = data_source.ArrayRecordDataSource(ar_files)

    def ds_read(video, indices):
      return source.__getitems__([int(global_first[video] + i) for i in indices])

    def ar_close():
      while readers:
        readers.pop().close()
      source.__exit__(None, None, None)
    common = dict(layout="arrayrecord", label="(b)", files=ar_files, close=ar_close)
    paths.append(ReadPath(name="arrayrecord", how="tf.data: numpy_function: "
                          "ArrayRecordReader.read([8 positions])",
                          gil="callback holds it; released in read()",
                          tf_map=_numpy_map(ar_read, num_frames), read=ar_read, **common))
    paths.append(ReadPath(name="arrayrecord-python", how="Python loop: ArrayRecordReader.read",
                          gil="one Python thread", read=ar_read, **common))

    def ar_read_each(video, indices):
      reader, base = readers[ar_shard[video]], int(ar_first[video])
      return [reader.read([base + int(i)])[0] for i in indices]
    paths.append(ReadPath(name="arrayrecord-each-python",
                          how="Python loop: 8 x ArrayRecordReader.read([1 position])",
                          gil="one Python thread", read=ar_read_each, **common))
    paths.append(ReadPath(name="arrayrecord-datasource-python",
                          how="Python loop: ArrayRecordDataSource.__getitems__",
                          gil="one Python thread (+ a pool per call)", read=ds_read,
                          **common))

  index = np.load(os.path.join(stand_in.packed_root, "index.npz"))
  shard, first, offsets = index["shard"], index["first"], index["offsets"]
  shard_files = stand_in.files("packed")
  fds = [os.open(p, os.O_RDONLY) for p in shard_files]
  for fd in fds:  # random reads: no kernel readahead of the neighbouring (unread) frames
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)

  def packed_read(video, indices):
    fd, base = fds[shard[video]], first[video]
    out = []
    for i in indices:
      begin = int(offsets[base + i])
      out.append(os.pread(fd, int(offsets[base + i + 1]) - begin, begin))
    return out

  def packed_close():
    while fds:
      os.close(fds.pop())
  common = dict(layout="packed", label="(c)", files=shard_files, close=packed_close)
  paths.append(ReadPath(name="packed", how="tf.data: numpy_function: 8 os.pread",
                        gil="callback holds it; released in pread", read=packed_read,
                        tf_map=_numpy_map(packed_read, num_frames), **common))
  paths.append(ReadPath(name="packed-python", how="Python loop: 8 os.pread",
                        gil="one Python thread", read=packed_read, **common))
  return paths


# ---------------------------------------------------------------------------------------------
# Process measurements.

def warm_page_cache(paths: Sequence[str]) -> None:
  for path in paths:
    with open(path, "rb", buffering=0) as f:
      while f.read(1 << 22):
        pass


def evict(paths: Sequence[str]) -> None:
  """Drops the files' pages from the page cache (posix_fadvise DONTNEED: no root needed)."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


_EVICTOR = r"""
import json, os, resource, select, sys, time
paths = json.loads(sys.stdin.readline())
interval = float(sys.argv[1])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = len(paths) + 64
if soft < want and (hard == resource.RLIM_INFINITY or hard >= want):
  resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
fds = []
try:
  fds = [os.open(p, os.O_RDONLY) for p in paths]
except OSError:
  for fd in fds:
    os.close(fd)
  fds = None
def evict():
  if fds is not None:
    for fd in fds:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
evict()
print("ready", flush=True)
rounds = 1
while not select.select([sys.stdin], [], [], interval)[0]:
  evict()
  rounds += 1
t = os.times()
print(json.dumps({"rounds": rounds, "cpu_s": t.user + t.system}), flush=True)
"""


@contextlib.contextmanager
def cold_page_cache(paths: Sequence[str], interval_s: float = EVICT_INTERVAL_S):
  """Evicts `paths` on entry and every `interval_s` until exit, from a child process (no GIL taken
  from this one). Yields a dict that gets the child's eviction rounds and CPU seconds."""
  stats = {"interval_s": interval_s, "files": len(paths)}
  child = subprocess.Popen([sys.executable, "-c", _EVICTOR, str(interval_s)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    child.stdin.write(json.dumps(list(paths)) + "\n")
    child.stdin.flush()
    if child.stdout.readline().strip() != "ready":
      raise RuntimeError("the page-cache evictor did not start")
    yield stats
  finally:
    child.stdin.close()
    line = child.stdout.readline()
    child.wait()
    with contextlib.suppress(ValueError):
      stats.update(json.loads(line))


def _dataset(path: ReadPath, clips: Clips, *, repeat: bool, single_core: bool,
             limit: int | None = None) -> tf.data.Dataset:
  n = len(clips) if limit is None else limit
  ds = tf.data.Dataset.from_tensor_slices((clips.videos[:n], clips.indices[:n]))
  if repeat:
    ds = ds.repeat()
  ds = ds.map(path.tf_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.batch(BATCH).prefetch(tf.data.AUTOTUNE)
  return common.single_core(ds) if single_core else ds


def _clip_counts(path: ReadPath, clips: Clips, *, single_core: bool) -> Iterator[int]:
  """An endless stream of 'this many clips were read', from tf.data or from a Python loop."""
  if path.tf_map is not None:
    for batch in _dataset(path, clips, repeat=True, single_core=single_core):
      yield int(batch.shape[0])
  else:
    n, i = len(clips), 0
    while True:
      path.read(int(clips.videos[i % n]), clips.indices[i % n])
      i += 1
      yield 1


def finite_bytes(path: ReadPath, clips: Clips, num_clips: int, *, cold: bool) -> dict:
  """Reads the first `num_clips` clips once (none repeats a frame) and counts the bytes: rchar
  (what the read calls returned) and read_bytes (what storage delivered) over the frames' bytes.
  `cold` evicts the layout's files first; otherwise they are read into the page cache first."""
  num_clips = min(num_clips, len(clips))
  batches = None
  if path.tf_map is not None:  # traced before the counting
    batches = iter(_dataset(path, clips, repeat=False, single_core=False, limit=num_clips))
  if cold:
    evict(path.files)
  else:
    warm_page_cache(path.files)
  io0 = io_counters()
  if batches is not None:
    read = sum(int(batch.shape[0]) for batch in batches)
    assert read == num_clips, (read, num_clips)
  else:
    for i in range(num_clips):
      path.read(int(clips.videos[i]), clips.indices[i])
  io1 = io_counters()
  frame_bytes = float(clips.frame_bytes[:num_clips].sum())
  return {"clips": num_clips, "frame_bytes_per_clip": frame_bytes / num_clips,
          "rchar_per_clip": (io1["rchar"] - io0["rchar"]) / num_clips,
          "rchar_ratio": (io1["rchar"] - io0["rchar"]) / frame_bytes,
          "read_bytes_per_clip": (io1["read_bytes"] - io0["read_bytes"]) / num_clips,
          "read_bytes_ratio": (io1["read_bytes"] - io0["read_bytes"]) / frame_bytes}


def throughput(path: ReadPath, clips: Clips, *, seconds: float, use_one_core: bool, cold: bool,
               warmup_s: float = 1.0) -> dict:
  """Clips/s over `seconds` after a warm-up, with process CPU, rchar and read_bytes per clip."""
  if not cold:
    warm_page_cache(path.files)
  with cold_page_cache(path.files) if cold else contextlib.nullcontext({}) as evictor:
    with one_core() if use_one_core else contextlib.nullcontext(None) as repin:
      counts = _clip_counts(path, clips, single_core=use_one_core)
      start = time.perf_counter()
      while time.perf_counter() - start < warmup_s:
        next(counts)
      if repin:
        repin()
      io0, cpu0, t0 = io_counters(), _cpu_s(), time.perf_counter()
      read = 0
      while time.perf_counter() - t0 < seconds or read < 2:
        read += next(counts)
      elapsed = time.perf_counter() - t0
      io1, cpu1 = io_counters(), _cpu_s()
      counts.close()
      del counts
  frame_bytes = float(clips.frame_bytes.mean())
  return {"cache": "cold" if cold else "warm", "cores": 1 if use_one_core else num_cores(),
          "clips_per_s": read / elapsed, "clips": read, "seconds": elapsed,
          "cpu_ms_per_clip": 1e3 * (cpu1 - cpu0) / read,
          "rchar_ratio": (io1["rchar"] - io0["rchar"]) / read / frame_bytes,
          "read_bytes_ratio": (io1["read_bytes"] - io0["read_bytes"]) / read / frame_bytes,
          "evictor": dict(evictor) if cold else None}


def arrayrecord_scaling(module, directory: str,
                        records: Sequence[int] = (1_500, 15_000, 58_600, 240_000),
                        reads: int = 1000, seed: int = 0) -> list[dict]:
  """Microseconds per ArrayRecordReader.read([8 positions]) and per read([1 position]) (warm,
  16-byte records, one Python thread) against the records in the file. A read of several
  positions hands them to ArrayRecord's global thread pool, and every read call builds a table
  with one entry per chunk of the whole file, so what a clip costs grows with the shard
  (Kinetics in 1024 shards: ~58.6k records a shard)."""
  rng = np.random.default_rng(seed)
  out = []
  for n in records:
    path = os.path.join(directory, f"scaling-{n}.array_record")
    if not os.path.exists(path):
      writer = module.ArrayRecordWriter(path + ".tmp", ARRAYRECORD_WRITER_OPTIONS)
      for i in range(n):
        writer.write(i.to_bytes(8, "little") * 2)
      writer.close()
      os.replace(path + ".tmp", path)
    reader = module.ArrayRecordReader(path, ARRAYRECORD_READER_OPTIONS,
                                      file_reader_buffer_size=32768)
    positions = [sorted(rng.choice(n, 8, replace=False).tolist()) for _ in range(reads)]
    for p in positions[:50]:
      reader.read(p)
    t0, c0 = time.perf_counter(), _cpu_s()
    for p in positions:
      reader.read(p)
    t1, c1 = time.perf_counter(), _cpu_s()
    for p in positions:
      reader.read(p[:1])
    t2, c2 = time.perf_counter(), _cpu_s()
    reader.close()
    out.append({"records_in_file": n, "file_bytes": os.path.getsize(path),
                "us_per_read_of_8": 1e6 * (t1 - t0) / reads,
                "cpu_us_per_read_of_8": 1e6 * (c1 - c0) / reads,
                "us_per_read_of_1": 1e6 * (t2 - t1) / reads,
                "cpu_us_per_read_of_1": 1e6 * (c2 - c1) / reads})
  return out


# ---------------------------------------------------------------------------------------------
# Storage facts: files, inodes, bytes on disk, index memory for Kinetics-400.

def disk_facts(stand_in: StandIn, layout: str) -> dict:
  files = stand_in.files(layout)
  sizes = [os.stat(p) for p in files]
  frame_total = float(stand_in.frame_sizes().sum())
  apparent = sum(s.st_size for s in sizes)
  allocated = sum(s.st_blocks * 512 for s in sizes)
  return {"files": len(files), "apparent_bytes_per_frame_byte": apparent / frame_total,
          "allocated_bytes_per_frame_byte": allocated / frame_total,
          "overhead_bytes_per_frame": (apparent - frame_total) /
                                      (stand_in.num_videos * stand_in.frames_per_video)}


def kinetics_facts(layout: str) -> dict:
  frames_total = KINETICS_VIDEOS * KINETICS_FRAMES
  if layout == "frames":
    return {"files": frames_total + 3, "inodes": frames_total + KINETICS_VIDEOS + 4,
            "detail": f"{frames_total:,} frame files + {KINETICS_VIDEOS:,} folders + list, "
                      "manifest, labels",
            "index_memory": f"~{KINETICS_VIDEOS * 100 / 1e6:.0f} MB list in memory; the frame "
                            "index is the file system's directories"}
  if layout == "arrayrecord":
    return {"files": KINETICS_SHARDS + 1, "inodes": KINETICS_SHARDS + 2,
            "detail": f"{KINETICS_SHARDS} shards (~{frames_total // KINETICS_SHARDS:,} records "
                      "each) + the video index",
            "index_memory": f"~{frames_total * 8 / 1e6:.0f} MB: each open reader holds 8 bytes "
                            "per chunk (= per frame at group_size:1), all shards open; "
                            "index_storage_option:offloaded reads it from disk instead"}
  return {"files": KINETICS_SHARDS + 1, "inodes": KINETICS_SHARDS + 2,
          "detail": f"{KINETICS_SHARDS} shards + the offsets index",
          "index_memory": f"~{frames_total * 8 / 1e6:.0f} MB of int64 offsets "
                          f"(~{frames_total * 4 / 1e6:.0f} MB as int32 offsets within a video)"}


# ---------------------------------------------------------------------------------------------
# The whole run.

@dataclasses.dataclass(frozen=True)
class Settings:
  videos: int = 24
  frames_per_video: int = KINETICS_FRAMES
  frame_size: tuple[int, int] = KINETICS_FRAME
  jpeg_quality: int = 90
  videos_per_shard: int = 6
  num_frames: int = 8
  stride: int = 32
  seconds: float = 5.0
  warmup_s: float = 1.0
  bytes_clips: int = 256
  min_clips: int = 2048
  cold: bool = True
  arrayrecord: bool = True            # measure it when importable
  scaling_records: tuple[int, ...] = (1_500, 15_000, 58_600, 240_000)
  rounds: int = 2                     # every measurement this many times, interleaved: best kept
  scaling_reads: int = 1000
  paths: tuple[str, ...] = ()         # read paths to measure by name; () for all
  cache_dir: str = "/tmp/layout_benchmark"
  seed: int = 0


def run_benchmark(settings: Settings = Settings(), log: Callable[[str], None] = _log) -> dict:
  ar = import_array_record() if settings.arrayrecord else None
  skipped = {}
  if ar is None:
    skipped["arrayrecord"] = (ARRAYRECORD_MISSING if settings.arrayrecord
                              else "not requested (--noarrayrecord) — skipped")
    log(skipped["arrayrecord"])
  stand_in = stand_in_data(settings.videos, settings.frames_per_video, settings.frame_size,
                           settings.jpeg_quality, settings.videos_per_shard, settings.cache_dir,
                           with_arrayrecord=ar is not None, log=log)
  log(f"stand-in: {stand_in.describe()}")
  log(f"mean frame: {stand_in.mean_frame_bytes / 1024:.1f} KB ({stand_in.mean_frame_bytes:.0f} B)")
  clips = clip_list(stand_in, num_frames=settings.num_frames, stride=settings.stride,
                    min_clips=settings.min_clips, seed=settings.seed)
  log(f"{len(clips)} clips of {settings.num_frames} frames at stride {settings.stride} "
      f"(seed {settings.seed}), {clips.frame_bytes.mean() / 1024:.0f} KB of JPEG a clip; "
      f"{num_cores()} cores; load average {os.getloadavg()[0]:.2f} (other processes disturb "
      "the rates)")
  loadavg_start = os.getloadavg()[0]
  all_paths = read_paths(stand_in, settings.num_frames, ar)
  paths = all_paths
  if settings.paths:
    unknown = set(settings.paths) - {p.name for p in paths} - set(ARRAYRECORD_PATHS)
    if unknown:
      close_paths(all_paths)
      raise ValueError(f"unknown read paths {sorted(unknown)}")
    paths = [p for p in paths if p.name in settings.paths]
  variants = {}
  caches = ("warm", "cold") if settings.cold else ("warm",)
  try:
    for path in paths:
      variants[path.name] = {"layout": path.layout, "label": path.label, "how": path.how,
                             "gil": path.gil, "throughput": []}
      variants[path.name]["bytes"] = finite_bytes(path, clips, settings.bytes_clips, cold=False)
      if settings.cold:
        variants[path.name]["cold_bytes"] = finite_bytes(path, clips, settings.bytes_clips,
                                                         cold=True)
    runs = {}
    for round_ in range(settings.rounds):
      for cache in caches:
        for use_one_core in (False, True):
          for path in paths:
            result = throughput(path, clips, seconds=settings.seconds,
                                use_one_core=use_one_core, cold=cache == "cold",
                                warmup_s=settings.warmup_s)
            runs.setdefault((path.name, cache, use_one_core), []).append(result)
            evictor = result["evictor"] or {}
            log(f"  round {round_ + 1} {path.name:30s} {cache} {result['cores']} core(s): "
                f"{result['clips_per_s']:7.0f} clips/s, {result['cpu_ms_per_clip']:.2f} ms CPU "
                f"a clip, storage/frame bytes {result['read_bytes_ratio']:.2f}"
                + (f", evictor CPU {evictor.get('cpu_s', 0):.2f} s" if evictor else "")
                + f", load {os.getloadavg()[0]:.1f}")
    for (name, cache, use_one_core), results in runs.items():
      best = max(results, key=lambda r: r["clips_per_s"])
      variants[name]["throughput"].append(
          {**best, "cpu_ms_per_clip": min(r["cpu_ms_per_clip"] for r in results),
           "rounds": [{k: r[k] for k in ("clips_per_s", "cpu_ms_per_clip", "read_bytes_ratio")}
                      for r in results]})
  finally:
    close_paths(all_paths)
  scaling = None
  if ar is not None and settings.scaling_records:
    scaling = arrayrecord_scaling(ar[0], stand_in.root, settings.scaling_records,
                                  reads=settings.scaling_reads)
  layouts = {}
  for layout in LAYOUTS:
    if layout == "arrayrecord" and ar is None:
      continue
    layouts[layout] = {"disk": disk_facts(stand_in, layout), "kinetics400": kinetics_facts(layout),
                       "gcs": GCS[layout]}
  if ar is not None:
    ok = _version_at_least(ar[2], (0, 8, 3))
    layouts["arrayrecord"]["gcs"] += (f" (installed: {ar[2]}, "
                                      + ("reads gs:// directly" if ok else "local paths only")
                                      + ")")
  result = {
      "settings": {**dataclasses.asdict(settings), "batch": BATCH,
                   "arrayrecord_writer_options": ARRAYRECORD_WRITER_OPTIONS,
                   "arrayrecord_reader_options": ARRAYRECORD_READER_OPTIONS,
                   "evict_interval_s": EVICT_INTERVAL_S},
      "stand_in": dataclasses.asdict(stand_in),
      "clips": {"count": len(clips), "frame_bytes_per_clip": float(clips.frame_bytes.mean())},
      "environment": {"cores": num_cores(), "python": sys.version.split()[0],
                      "tensorflow": tf.__version__,
                      "array_record": ar[2] if ar is not None else None,
                      "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg()[0]},
      "variants": variants, "skipped": skipped, "layouts": layouts,
      "arrayrecord_scaling": scaling,
      "cold_method": "posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) on every data file, once "
                     f"before a finite run and every {EVICT_INTERVAL_S} s from a child process "
                     "during a throughput run (no root needed)",
  }
  log("done")
  return result


def format_report(results: dict) -> str:
  cores = results["environment"]["cores"]
  settings = results["settings"]
  env = results["environment"]
  lines = [f"Random access to a clip's bytes ({settings['num_frames']} frames at stride "
           f"{settings['stride']}, {results['clips']['frame_bytes_per_clip'] / 1024:.0f} KB "
           f"of JPEG a clip, mean frame {results['stand_in']['mean_frame_bytes'] / 1024:.1f} KB; decode "
           f"not included). {cores} cores; best of {settings['rounds']} rounds of "
           f"{settings['seconds']:g} s; load average {env['loadavg_start']:.1f} at the start, "
           f"{env['loadavg_end']:.1f} at the end.", ""]
  header = (f"{'':4s}{'read path':31s}{'warm':>7s}{'warm':>7s}{'cold':>7s}{'cold':>7s}"
            f"{'CPU ms/clip':>13s}{'rchar/':>8s}{'storage/':>10s}  GIL")
  lines += [header,
            f"{'':35s}{f'{cores}c':>7s}{'1c':>7s}{f'{cores}c':>7s}{'1c':>7s}{'warm':>7s}"
            f"{'cold':>6s}{'frames':>8s}{'frames':>10s}",
            f"{'':35s}{'clips/s':>14s}{'clips/s':>14s}{'1 core':>13s}", "-" * 118]
  for name, v in results["variants"].items():
    by = {(t["cache"], t["cores"]): t for t in v["throughput"]}

    def rate(cache, n):
      t = by.get((cache, n))
      return f"{t['clips_per_s']:7.0f}" if t else f"{'-':>7s}"

    def cpu(cache, width):
      t = by.get((cache, 1))
      return f"{t['cpu_ms_per_clip']:{width}.2f}" if t else f"{'-':>{width}s}"
    storage = v.get("cold_bytes", {}).get("read_bytes_ratio")
    storage = f"{storage:10.2f}" if storage is not None else f"{'-':>10s}"
    lines.append(f"{v['label']:4s}{name:31s}{rate('warm', cores)}{rate('warm', 1)}"
                 f"{rate('cold', cores)}{rate('cold', 1)}{cpu('warm', 7)}{cpu('cold', 6)}"
                 f"{v['bytes']['rchar_ratio']:8.2f}{storage}  {v['gil']}")
  for name, why in results["skipped"].items():
    lines.append(f"{'(b)':4s}{name:31s}{why}")
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
  for name, v in results["variants"].items():
    lines.append(f"  {name}: {v['how']}")
  lines.append("")
  lines.append(f"{'layout':13s}{'K400 files':>12s}{'K400 inodes':>13s}{'disk/frames':>13s}"
               f"{'+B/frame':>10s}")
  for layout, facts in results["layouts"].items():
    k, d = facts["kinetics400"], facts["disk"]
    lines.append(f"{layout:13s}{k['files']:12,d}{k['inodes']:13,d}"
                 f"{d['allocated_bytes_per_frame_byte']:13.3f}"
                 f"{d['overhead_bytes_per_frame']:10.0f}")
  lines.append("  K400: 240k videos x 250 frames, computed. disk/frames: allocated blocks over "
               "JPEG bytes (stand-in); +B/frame: file bytes beyond the JPEGs, per frame.")
  for layout, facts in results["layouts"].items():
    k = facts["kinetics400"]
    lines.append(f"  {layout}: {k['detail']}; index memory {k['index_memory']}")
  lines += ["", "gs:// without extra code:"]
  for layout, facts in results["layouts"].items():
    lines.append(f"  {layout}: {facts['gcs']}")
  if results["arrayrecord_scaling"]:
    per_shard = results["stand_in"]["videos_per_shard"] * results["stand_in"]["frames_per_video"]
    lines += ["", "ArrayRecordReader.read against records in the file (warm, 16-byte records, "
              "one Python thread; wall / process CPU microseconds a call; the stand-in's shards "
              f"hold {per_shard:,} records, Kinetics in {KINETICS_SHARDS} shards "
              f"~{KINETICS_VIDEOS * KINETICS_FRAMES // KINETICS_SHARDS:,}):"]
    for s in results["arrayrecord_scaling"]:
      lines.append(f"  {s['records_in_file']:>9,d} records: read([8 positions]) "
                   f"{s['us_per_read_of_8']:7.0f} / {s['cpu_us_per_read_of_8']:5.0f} us, "
                   f"read([1 position]) {s['us_per_read_of_1']:6.0f} / "
                   f"{s['cpu_us_per_read_of_1']:5.0f} us")
  return "\n".join(lines)


def define_flags() -> None:
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_float("seconds", 5.0, "Seconds per throughput measurement (after a 1 s warm-up).")
  flags.DEFINE_integer("rounds", 2, "Rounds of every measurement, interleaved; the best is kept "
                       "(other processes on the machine disturb single runs).")
  flags.DEFINE_integer("videos", 24, "Stand-in videos (250 frames of 340x256 each).")
  flags.DEFINE_integer("videos_per_shard", 6, "Videos per shard for (b) and (c).")
  flags.DEFINE_string("json", "", "Where to write every number (default: in the cache dir).")
  flags.DEFINE_string("cache_dir", "/tmp/layout_benchmark", "Where the stand-in data is written.")
  flags.DEFINE_bool("cold", True, "Also measure from a cold page cache.")
  flags.DEFINE_bool("arrayrecord", True, "Measure ArrayRecord when array_record is importable.")
  flags.DEFINE_list("paths", [], "Read paths to measure (default all): frames, frames+check, "
                    "arrayrecord, arrayrecord-python, arrayrecord-each-python, "
                    "arrayrecord-datasource-python, packed, packed-python.")


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # noqa: PLC0415
  f = flags.FLAGS
  settings = Settings(videos=f.videos, videos_per_shard=f.videos_per_shard, seconds=f.seconds,
                      rounds=f.rounds,
                      cold=f.cold, arrayrecord=f.arrayrecord, cache_dir=f.cache_dir,
                      paths=tuple(f.paths))
  results = run_benchmark(settings)
  print(format_report(results), flush=True)
  path = f.json or os.path.join(results["stand_in"]["root"], "results.json")
  with open(path, "w") as out:
    json.dump(results, out, indent=1)
  print(f"all numbers: {path}")


if __name__ == "__main__":
  from absl import app  # noqa: PLC0415

  define_flags()
  app.run(main)
