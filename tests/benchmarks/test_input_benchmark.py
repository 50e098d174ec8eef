"""The input benchmark on a tiny configuration: every measurement is there, its derived figures
follow from what it measured, the report prints those figures, and the layouts differ as they
should (a frame-folder clip reads about its own frames, a DMVR clip its whole video; a frame-folder
stream resumes anywhere for the same bytes)."""

import json
import os

import pytest
import tensorflow as tf

from benchmarks import common
from benchmarks import input_benchmark as ib
from msca_jax.data import dmvr, frames

TINY = dict(num_videos=3, frames_per_video=40, size=(48, 64))
SETTINGS = ib.Settings(
    videos=3, frames_per_video=40, frame_size=(48, 64), clip=ib.Clip(num_frames=8, stride=4, image_size=32, batch_size=4),
    seconds=0.2, warmup_s=0.0, stage_seconds=0.05, list_videos=120, rss_list_videos=(120,),
    rss_buffers=(2,), rss_batches=2, rss_parallel=2, rss_background=True,
    resume_positions=(0, 10**6), resume_cold=False, resume_epoch_records=6,
    accelerator_clips_per_s=50.0)


@pytest.fixture(scope="module")
def results(run_tiny):
  out, lines = run_tiny(ib, SETTINGS)
  assert any("clips/s" in line for line in lines) and lines[-1].endswith("done")
  return out


def test_stand_in_layouts_hold_the_same_jpegs(cache_dir):
  stand_in = common.stand_in_data(**TINY, cache_dir=cache_dir)
  again = common.stand_in_data(**TINY, cache_dir=cache_dir)
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


def _row(results, layout, cache, cores, recipe=True):
  return next(r for r in results["throughput"] if r["recipe"] == recipe
              and (r["layout"], r["cache"], r["cores"]) == (layout, cache, cores))


def test_every_clips_per_s_row_is_measured(results):
  cores = results["cores"]
  recipe = {(r["layout"], r["cache"], r["cores"]) for r in results["throughput"] if r["recipe"]}
  assert recipe == {(l, c, n) for l in ("frames", "dmvr") for c in ("warm", "cold") for n in (cores, 1)}
  others = {(r["layout"], r["augment"], r["dtype"]) for r in results["throughput"] if not r["recipe"]}
  assert ("frames", "host", "float32") in others  # the effect of sending uint8
  if results["augment_on"] == "device":
    assert ("frames", "host", "uint8") in others  # the effect of finishing views on the device
  for r in results["throughput"]:
    assert r["clips_per_s"] > 0 and r["clips"] >= 8 and r["cpu_ms_per_clip"] > 0
    assert r["clips_per_s"] == max(w["clips_per_s"] for w in r["windows"])
    assert r["clips_per_s_overall"] == pytest.approx(r["clips"] / r["seconds"])
    assert r["per_core"] == pytest.approx(r["clips_per_s"] / r["cores"])
    assert r["clips_per_cpu_s"] == pytest.approx(1e3 / r["cpu_ms_per_clip"])
    assert r["rchar_over_decoded"] == pytest.approx(
        r["rchar_per_clip"] / results["decoded_jpeg_bytes_per_clip"])
    if r["augment"] == "host":  # finished 32 px clips
      assert r["output_bytes_per_clip"] == 8 * 32 * 32 * 3 * (4 if r["dtype"] == "float32" else 1)
    else:  # uint8 crop windows padded to at most the 48 px short side
      assert 8 * 32 * 32 * 3 <= r["output_bytes_per_clip"] <= 8 * 48 * 48 * 3
    if r["cache"] == "cold":
      assert r["eviction"]["files"] == {"frames": 3 * 40, "dmvr": 3}[r["layout"]]  # 3 shards
      assert 0 <= r["eviction"]["core_share"] < 1
  for layout in ("frames", "dmvr"):
    assert results["bytes_per_clip"][layout]["rchar_per_clip"] == _row(
        results, layout, "warm", cores)["rchar_per_clip"]


def test_the_stages_add_up_to_the_one_core_pipeline(results):
  for layout, st in results["stages"].items():
    assert st["read_ms"] > 0 and st["decode_ms"] >= 0 and st["augment_ms"] >= 0
    assert st["pipeline_ms"] == pytest.approx(1e3 / _row(results, layout, "warm", 1)["clips_per_s"])
    host = st["read_ms"] + st["decode_ms"] + (st["augment_ms"] if st["augment"] == "host" else 0)
    assert st["other_ms"] == pytest.approx(max(st["pipeline_ms"] - host, 0.0))


def test_resume_and_memory_are_measured_where_asked(results):
  resume = results["resume"]
  assert [r["position"] for r in resume["frames"]["rows"]] == [0, 10**6]
  for r in resume["frames"]["rows"]:
    assert r["first_index"] == r["position"] and r["rchar"] > 0 and r["seconds"] >= r["build_s"] > 0
  dmvr_rows = resume["dmvr"]["rows"]
  assert [(r["epoch"], r["offset"]) for r in dmvr_rows] == [(1, 0), (1, 3), (1, 6)]
  first, last = dmvr_rows[0], dmvr_rows[-1]
  assert resume["dmvr"]["per_record_warm"]["mb"] == pytest.approx(
      (last["rchar"] - first["rchar"]) / 6 / 2**20)
  assert resume["dmvr"]["per_record_warm"]["mb"] > 0

  memory = results["memory"]
  assert [(m["layout"], m["shuffle_buffer"]) for m in memory["rows"]] == [("frames", None), ("dmvr", 2)]
  for m in memory["rows"]:
    assert m["peak_mb"] >= m["idle_mb"] > 0 and m["samples"] > 0
  assert memory["rows"][0]["epoch_records"] == 120
  fit = memory["dmvr_fit"]
  assert fit["intercept_mb"] == pytest.approx(memory["rows"][1]["peak_mb"])  # one buffer: no slope
  assert fit["computed_recipe_buffer_mb"] == pytest.approx(4096 * 7.5)
  assert fit["computed_peak_mb_at_recipe_buffer"] == pytest.approx(
      fit["intercept_mb"] + 4096 * fit["mb_per_buffered_record"])


def test_feeding_is_the_rate_times_the_measured_cpu(results):
  cores = results["cores"]
  feeding = results["feeding"]
  assert [(f["accelerator"], f["clips_per_s"]) for f in feeding] == (
      [("--accelerator_clips_per_s", 50.0)] + list(ib.ACCELERATORS))
  for f in feeding:
    for layout in ("frames", "dmvr"):
      for cache in ("warm", "cold"):
        assert f["cores"][f"{layout}_{cache}"] == pytest.approx(
            f["clips_per_s"] * _row(results, layout, cache, cores)["cpu_ms_per_clip"] / 1e3)
      assert f["read_mb_per_s"][layout] == pytest.approx(
          f["clips_per_s"] * _row(results, layout, "warm", cores)["rchar_per_clip"] / 2**20)


def test_a_frame_clip_reads_its_frames_and_a_dmvr_clip_its_video(results):
  frames_ratio = results["bytes_per_clip"]["frames"]["rchar_over_decoded"]
  dmvr_ratio = results["bytes_per_clip"]["dmvr"]["rchar_over_decoded"]
  assert 0.9 <= frames_ratio <= 2
  # A tiny DMVR record holds 40 frames for the clip's 8: about 5x (30x at Kinetics' 250). The
  # reads are counted over a timed window of a few records, so a record more or less read at the
  # window's ends moves the ratio (2.96x seen on a loaded 2-core machine).
  assert dmvr_ratio > 2 * frames_ratio


def test_frame_streams_resume_anywhere_for_the_same_bytes(results):
  rows = {r["position"]: r for r in results["resume"]["frames"]["rows"] if r["cache"] == "warm"}
  assert rows[10**6]["rchar"] <= 3 * rows[0]["rchar"]
  assert rows[0]["rchar"] <= 3 * rows[10**6]["rchar"]


def test_the_report_prints_the_measured_figures(results):
  report = ib.format_report(results).splitlines()

  def row(*cells):
    """The report's table line that starts with these cells."""
    return next(line.split() for line in report if line.split()[:len(cells)] == list(cells))

  for layout, b in results["bytes_per_clip"].items():
    assert row(layout, str(b["clips"]))[3] == f"{b['rchar_over_decoded']:.2f}"
  cores = results["cores"]
  for layout in ("frames", "dmvr"):
    for cache in ("warm", "cold"):
      r = _row(results, layout, cache, cores)
      cells = row(layout, r["augment"], "uint8", cache, str(cores))
      assert cells[5:7] == [f"{r['clips_per_s']:.1f}", f"{r['per_core']:.1f}"]
      assert cells[7] == f"{r['cpu_ms_per_clip']:.1f}"
  first = results["feeding"][0]
  assert row("--accelerator_clips_per_s", "50")[2] == f"{first['cores']['frames_cold']:.1f}"
  assert not any("vs baseline" in line for line in report)


def test_a_baseline_run_gives_each_row_its_ratio(results, tmp_path):
  earlier = dict(results, throughput=[dict(r, clips_per_s=2 * r["clips_per_s"])
                                      for r in results["throughput"][1:]])
  path = tmp_path / "earlier.json"
  path.write_text(json.dumps(earlier))
  runs = [dict(r) for r in results["throughput"]]
  assert ib.compare_to_baseline(runs, str(path)) == {"path": str(path),
                                                     "rows_matched": len(runs) - 1}
  assert runs[0]["vs_baseline"] is None  # the earlier run has no such row
  assert all(r["vs_baseline"] == pytest.approx(0.5) for r in runs[1:])
  report = ib.format_report(dict(results, throughput=runs, baseline={"path": str(path)}))
  assert "vs baseline" in report
  line = next(l for l in report.splitlines() if l.split()[5:6] == [f"{runs[1]['clips_per_s']:.1f}"])
  assert line.split()[7] == "0.50"
