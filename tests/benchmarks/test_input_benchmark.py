"""The input benchmark on a tiny configuration: every measurement is there, and the layouts differ
as they should (a frame-folder clip reads about its own frames, a DMVR clip its whole video; a
frame-folder stream resumes anywhere for the same bytes)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from msca_jax.data import dmvr, frames
from benchmarks import input_benchmark as ib

TINY = dict(num_videos=3, frames_per_video=40, size=(48, 64))
SETTINGS = ib.Settings(
    videos=3, frames_per_video=40, frame_size=(48, 64), clip=ib.Clip(num_frames=8, stride=4, image_size=32, batch_size=4),
    seconds=0.2, warmup_s=0.0, stage_seconds=0.05, list_videos=120, rss_list_videos=(120,),
    rss_buffers=(2,), rss_batches=2, rss_parallel=2, rss_background=True,
    resume_positions=(0, 10**6), resume_cold=False, resume_epoch_records=6,
    accelerator_clips_per_s=50.0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("input_benchmark"))


@pytest.fixture(scope="module")
def results(cache_dir):
  lines = []
  out = ib.run_benchmark(dataclasses.replace(SETTINGS, cache_dir=cache_dir), log=lines.append)
  assert any("clips/s" in line for line in lines) and lines[-1].endswith("done")
  return json.loads(json.dumps(out))  # what --json writes


def test_stand_in_layouts_hold_the_same_jpegs(cache_dir):
  stand_in = ib.stand_in_data(**TINY, cache_dir=cache_dir)
  again = ib.stand_in_data(**TINY, cache_dir=cache_dir)
  assert again.reused and again.root == stand_in.root
  assert stand_in.mean_frame_bytes > 0 and stand_in.mean_record_bytes > 40 * stand_in.mean_frame_bytes
  videos = frames.read_list(frames.list_path(stand_in.frames_root, "train"))
  assert len(videos) == 3 and set(videos.num_frames) == {40}
  record = next(iter(tf.data.TFRecordDataset(stand_in.dmvr_files())))
  parsed = dmvr.parse_example(record)
  folder = os.path.join(stand_in.frames_root, os.path.basename(parsed["filename"].numpy().decode()))
  with open(os.path.join(folder, frames.FrameNames().name(5)), "rb") as f:
    assert f.read() == parsed["frames"][5].numpy()
  assert frames.read_manifest(stand_in.frames_root, "train")["settings"]["short_side"] == 48


def test_every_measurement_is_there(results):
  cores = results["cores"]
  assert set(results["bytes_per_clip"]) == {"frames", "dmvr"}
  recipe = {(r["layout"], r["cache"], r["cores"]) for r in results["throughput"] if r["recipe"]}
  for layout in ("frames", "dmvr"):
    for cache in ("warm", "cold"):
      assert {(layout, cache, cores), (layout, cache, 1)} <= recipe
  others = {(r["layout"], r["augment"], r["dtype"]) for r in results["throughput"] if not r["recipe"]}
  assert ("frames", "host", "float32") in others  # the effect of sending uint8
  assert results["augment_on"] in ("host", "device")
  if results["augment_on"] == "device":
    assert ("frames", "host", "uint8") in others  # the effect of finishing views on the device
  for r in results["throughput"]:
    assert r["clips_per_s"] > 0 and r["clips"] >= 8 and r["cpu_ms_per_clip"] > 0
    assert r["per_core"] == pytest.approx(r["clips_per_s"] / r["cores"])
    assert r["ratio_to_old_per_core"] == pytest.approx(r["per_core"] / ib.OLD_PER_CORE)
    if r["augment"] == "host":  # finished 32 px clips
      assert r["output_bytes_per_clip"] == 8 * 32 * 32 * 3 * (4 if r["dtype"] == "float32" else 1)
    else:  # uint8 crop windows padded to at most the 48 px short side
      assert 8 * 32 * 32 * 3 <= r["output_bytes_per_clip"] <= 8 * 48 * 48 * 3
    if r["cache"] == "cold":
      assert r["eviction"]["files"] > 0
  assert "posix_fadvise" in results["cold_method"]
  for layout in ("frames", "dmvr"):
    st = results["stages"][layout]
    assert st["read_ms"] > 0 and st["pipeline_ms"] > 0
    assert {"decode_ms", "augment_ms", "other_ms"} <= set(st)

  resume = results["resume"]
  assert [r["position"] for r in resume["frames"]["rows"]] == [0, 10**6]
  for r in resume["frames"]["rows"]:
    assert r["first_index"] == r["position"] and r["rchar"] > 0 and r["seconds"] > 0
  dmvr_rows = resume["dmvr"]["rows"]
  assert [r["offset"] for r in dmvr_rows] == [0, 3, 6]
  assert all(r["epoch"] == 1 for r in dmvr_rows)
  assert resume["dmvr"]["per_record_warm"]["mb"] > 0

  memory = results["memory"]
  assert [(m["layout"], m["shuffle_buffer"]) for m in memory["rows"]] == [("frames", None), ("dmvr", 2)]
  for m in memory["rows"]:
    assert m["peak_mb"] >= m["idle_mb"] > 0 and m["samples"] > 0
  assert memory["rows"][0]["epoch_records"] == 120
  fit = memory["dmvr_fit"]
  assert fit["computed_recipe_buffer_mb"] == pytest.approx(4096 * 7.5)
  assert np.isfinite(fit["computed_peak_mb_at_recipe_buffer"])

  feeding = results["feeding"]
  assert [f["accelerator"] for f in feeding][0] == "--accelerator_clips_per_s"
  assert {f["accelerator"] for f in feeding} >= {"H100 SXM", "TPU v5e"}
  assert set(feeding[0]["cores"]) == {"frames_warm", "frames_cold", "dmvr_warm", "dmvr_cold"}
  warm = next(r for r in results["throughput"]
              if r["recipe"] and (r["layout"], r["cache"], r["cores"]) == ("frames", "warm", cores))
  assert feeding[0]["cores"]["frames_warm"] == pytest.approx(50.0 * warm["cpu_ms_per_clip"] / 1e3)
  assert feeding[0]["read_mb_per_s"]["frames"] == pytest.approx(50.0 * warm["rchar_per_clip"] / 2**20)
  assert warm["clips_per_s"] == max(w["clips_per_s"] for w in warm["windows"])


def test_a_frame_clip_reads_its_frames_and_a_dmvr_clip_its_video(results):
  frames_ratio = results["bytes_per_clip"]["frames"]["rchar_over_decoded"]
  dmvr_ratio = results["bytes_per_clip"]["dmvr"]["rchar_over_decoded"]
  assert 0.9 <= frames_ratio <= 2
  # A tiny DMVR record holds 40 frames for the clip's 8: about 5x (30x at Kinetics' 250).
  assert dmvr_ratio > 3 * frames_ratio


def test_frame_streams_resume_anywhere_for_the_same_bytes(results):
  rows = {r["position"]: r for r in results["resume"]["frames"]["rows"] if r["cache"] == "warm"}
  assert rows[10**6]["rchar"] <= 3 * rows[0]["rchar"]
  assert rows[0]["rchar"] <= 3 * rows[10**6]["rchar"]


def test_report_has_every_table(results):
  report = ib.format_report(results)
  for heading in ("1. Bytes read per training clip", "2. Resuming a stream", "3. Peak resident",
                  "4. Clips/s", "Where one clip's time goes", "5. Host cores to feed"):
    assert heading in report
  assert "resuming reads the current epoch up to the saved position" in report
  assert "computed" in report and "posix_fadvise" in report and "TPU v5e" in report
