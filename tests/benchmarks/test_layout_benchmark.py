"""The layout benchmark on tiny data: both read paths read exactly a clip's frames, every
measurement has its row, and the report prints the figures the run measured."""

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import common
from benchmarks import layout_benchmark as lb

TINY = lb.Settings(videos=3, frames_per_video=40, frame_size=(48, 64), stride=4, seconds=0.1,
                   warmup_s=0.05, bytes_clips=24, min_clips=48, rounds=2)


@pytest.fixture(scope="module")
def results(run_tiny):
  out, lines = run_tiny(lb, TINY)
  assert lines[-1] == "done"
  return out


def test_a_clip_reads_its_frames_and_nothing_else(results):
  variants = results["variants"]
  assert set(variants) == {"frames", "frames+check"}
  for v in variants.values():
    assert v["bytes"]["clips"] == TINY.bytes_clips
    assert 0.99 <= v["bytes"]["rchar_ratio"] <= 1.5, v["bytes"]
    assert v["bytes"]["rchar_per_clip"] == pytest.approx(
        v["bytes"]["rchar_ratio"] * v["bytes"]["frame_bytes_per_clip"])


def test_every_rate_is_the_best_of_its_rounds(results):
  cores = results["environment"]["cores"]
  for v in results["variants"].values():
    assert {(t["cache"], t["cores"]) for t in v["throughput"]} == {
        ("warm", cores), ("warm", 1), ("cold", cores), ("cold", 1)}
    for t in v["throughput"]:
      assert len(t["rounds"]) == TINY.rounds
      assert t["clips_per_s"] == max(r["clips_per_s"] for r in t["rounds"]) > 0
      assert t["cpu_ms_per_clip"] == min(r["cpu_ms_per_clip"] for r in t["rounds"]) > 0
      assert t["clips"] / t["seconds"] == pytest.approx(t["clips_per_s"])
      if t["cache"] == "cold":
        assert t["eviction"]["files"] == TINY.videos * TINY.frames_per_video
  k400 = results["kinetics400"]
  assert k400["files"] >= 240_000 * 250 and k400["inodes"] > k400["files"]
  assert results["disk"]["files"] == TINY.videos * TINY.frames_per_video
  assert results["disk"]["allocated_bytes_per_frame_byte"] >= 1


def test_the_report_prints_the_measured_figures(results):
  report = lb.format_report(results)
  cores = results["environment"]["cores"]
  for name, v in results["variants"].items():
    by = {(t["cache"], t["cores"]): t for t in v["throughput"]}
    row = next(line.split() for line in report.splitlines() if line.split()[:1] == [name])
    assert row[1:5] == [f"{by[k]['clips_per_s']:.0f}" for k in
                        (("warm", cores), ("warm", 1), ("cold", cores), ("cold", 1))]
    assert row[7] == f"{v['bytes']['rchar_ratio']:.2f}"
  assert f"{results['kinetics400']['files']:,} files" in report


def test_the_clip_list_is_seeded_and_reads_the_frame_files(cache_dir, results):
  stand_in = common.stand_in_data(TINY.videos, TINY.frames_per_video, TINY.frame_size,
                                  cache_dir=cache_dir)
  assert stand_in.reused
  clips = lb.clip_list(stand_in, num_frames=8, stride=TINY.stride, min_clips=TINY.min_clips)
  # Every (video, start) pair once per cycle, the same list on every call.
  assert len(clips) % (TINY.videos * (TINY.frames_per_video - 7 * TINY.stride)) == 0
  again = lb.clip_list(stand_in, num_frames=8, stride=TINY.stride, min_clips=TINY.min_clips)
  np.testing.assert_array_equal(clips.indices, again.indices)
  video, indices = int(clips.videos[5]), clips.indices[5]
  expected = []
  for i in indices:
    with open(stand_in.frame_path(video, int(i)), "rb") as f:
      expected.append(f.read())
  assert sum(map(len, expected)) == clips.frame_bytes[5]
  for name in lb.PATHS:
    read = lb.read_path(stand_in, name)(tf.constant(video, tf.int64), tf.constant(indices))
    assert [bytes(b) for b in read.numpy()] == expected
