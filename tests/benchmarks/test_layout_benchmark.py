"""The layout benchmark on tiny data: every read path reads the same bytes, frame files and packed
shards read about their clip's frames and nothing else, and ArrayRecord is reported as skipped
when array_record cannot be imported (it is measured only where it can)."""

import contextlib
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import layout_benchmark as lb

TINY = lb.Settings(videos=3, frames_per_video=40, frame_size=(48, 64), videos_per_shard=2,
                   stride=4, seconds=0.1, warmup_s=0.05, bytes_clips=24, min_clips=48,
                   scaling_records=(), rounds=1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("layout_benchmark"))


@contextlib.contextmanager
def no_array_record():
  """array_record made unimportable (None in sys.modules makes `import` raise ImportError)."""
  saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] == "array_record"}
  for name in ("array_record", "array_record.python", "array_record.python.array_record_module",
               "array_record.python.array_record_data_source"):
    sys.modules[name] = None
  try:
    yield
  finally:
    for name in [k for k in sys.modules if k.split(".")[0] == "array_record"]:
      del sys.modules[name]
    sys.modules.update(saved)


@pytest.fixture(scope="module")
def results(cache_dir):
  lines = []
  with no_array_record():
    assert lb.import_array_record() is None
    out = lb.run_benchmark(dataclasses.replace(TINY, cache_dir=cache_dir), log=lines.append)
  assert lines[-1] == "done"
  assert lb.ARRAYRECORD_MISSING in lines
  report = lb.format_report(out)
  assert "(a) frames" in report and "(c) packed" in report and lb.ARRAYRECORD_MISSING in report
  return json.loads(json.dumps(out))  # what --json writes


def test_frames_and_packed_read_about_their_frames(results):
  variants = results["variants"]
  assert {"frames", "frames+check", "packed", "packed-python"} <= set(variants)
  for name in ("frames", "packed", "packed-python"):
    assert variants[name]["bytes"]["clips"] == TINY.bytes_clips
    assert 0.99 <= variants[name]["bytes"]["rchar_ratio"] <= 1.5, (name, variants[name]["bytes"])
  assert variants["frames"]["label"] == "(a)" and variants["packed"]["label"] == "(c)"
  cores = results["environment"]["cores"]
  for v in variants.values():
    kinds = {(t["cache"], t["cores"]) for t in v["throughput"]}
    assert {("warm", cores), ("warm", 1), ("cold", cores), ("cold", 1)} <= kinds
    assert all(t["clips_per_s"] > 0 for t in v["throughput"])
  assert set(results["layouts"]) == {"frames", "packed"}
  frames_k400 = results["layouts"]["frames"]["kinetics400"]
  packed_k400 = results["layouts"]["packed"]["kinetics400"]
  assert frames_k400["files"] >= 240_000 * 250 > packed_k400["files"]


def test_arrayrecord_is_reported_as_skipped(results):
  assert results["skipped"]["arrayrecord"] == lb.ARRAYRECORD_MISSING
  assert not any(v["layout"] == "arrayrecord" for v in results["variants"].values())
  assert results["environment"]["array_record"] is None


def test_layouts_hold_the_same_bytes(cache_dir, results):
  stand_in = lb.stand_in_data(TINY.videos, TINY.frames_per_video, TINY.frame_size,
                              videos_per_shard=TINY.videos_per_shard, cache_dir=cache_dir,
                              with_arrayrecord=False)
  assert stand_in.reused
  clips = lb.clip_list(stand_in, num_frames=8, stride=TINY.stride, min_clips=TINY.min_clips)
  # Every (video, start) pair once per cycle, the same list on every call.
  assert len(clips) % (TINY.videos * (TINY.frames_per_video - 7 * TINY.stride)) == 0
  again = lb.clip_list(stand_in, num_frames=8, stride=TINY.stride, min_clips=TINY.min_clips)
  np.testing.assert_array_equal(clips.indices, again.indices)
  paths = {p.name: p for p in lb.read_paths(stand_in, 8, ar=None)}
  try:
    video, indices = int(clips.videos[5]), clips.indices[5]
    expected = []
    for i in indices:
      name = os.path.join(stand_in.frames_root, f"v{video:05d}", f"img_{i + 1:05d}.jpg")
      with open(name, "rb") as f:
        expected.append(f.read())
    assert paths["packed-python"].read(video, indices) == expected
    assert sum(map(len, expected)) == clips.frame_bytes[5]
    tf_read = paths["frames"].tf_map(tf.constant(video, tf.int64), tf.constant(indices))
    assert [bytes(b) for b in tf_read.numpy()] == expected
  finally:
    lb.close_paths(list(paths.values()))


def test_arrayrecord_when_installed(cache_dir, results):
  """Where array_record is importable, the same stand-in gets ArrayRecord shards and is measured."""
  if lb.import_array_record() is None:
    pytest.skip("array_record not installed")
  settings = dataclasses.replace(TINY, cold=False, scaling_records=(1000,), scaling_reads=100,
                                 paths=lb.ARRAYRECORD_PATHS, cache_dir=cache_dir)
  out = lb.run_benchmark(settings, log=lambda _: None)
  assert not out["skipped"] and out["stand_in"]["reused"]
  assert out["variants"]["arrayrecord"]["bytes"]["clips"] == TINY.bytes_clips
  assert set(out["variants"]) == set(lb.ARRAYRECORD_PATHS)
  for v in out["variants"].values():
    assert v["throughput"][0]["clips_per_s"] > 0 and v["bytes"]["rchar_ratio"] > 0.99
  assert out["arrayrecord_scaling"][0]["records_in_file"] == 1000
