"""The comparison tool: trains each variant, tabulates and plots, and reuses finished runs."""

import json
import os

import numpy as np
import pytest
from absl import app, flags

from msca_jax import configs
from msca_jax.errors import UserError
from msca_jax.tools import compare

_demo_config = compare.demo_config


def _tiny(variant, num_epochs, seed):
  config = _demo_config(variant, num_epochs, seed)
  m = config.model
  m.width, m.depth, m.num_heads, m.mlp_dim, m.num_frames = 32, 1, 2, 64, 4
  if m.name == "msca":
    m.shift_div = 2  # 2 heads: one each way
  s = config.data.synthetic
  s.train_size, s.eval_size = 64, 16
  config.data.shuffle_buffer = 64
  config.train.batch_size = config.train.base_batch_size = 16
  config.train.warmup_epochs = 0
  config.eval.batch_size = 16
  return config


@pytest.fixture
def tiny_runs(monkeypatch, tmp_path):
  monkeypatch.setenv("MSCA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(compare, "demo_config", _tiny)
  return tmp_path / "compare"


def test_compare_trains_tabulates_and_plots(tiny_runs):
  workdir = str(tiny_runs)
  os.makedirs(workdir)
  results = compare.compare(workdir, ["vit", "msca_kv"], num_epochs=2)
  assert list(results) == ["vit", "msca_kv"]
  for variant, r in results.items():
    assert r["steps"] == 8  # 2 epochs of 64 // 16
    assert 0 <= r["top1"] <= r["top5"] <= 1
    assert 0 <= r["within_pair_accuracy"] <= 1
    assert [step for step, _ in r["curve"]] == [4, 8]  # one validation per epoch, then the test
    assert os.path.isdir(os.path.join(workdir, variant, "checkpoints", "8"))
  assert results["vit"]["params"] == results["msca_kv"]["params"]
  with open(os.path.join(workdir, "comparison.json")) as f:
    assert json.load(f).keys() == results.keys()
  for name in ("comparison.png", "comparison_curves.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000
  table = compare.format_table(results)
  assert "ViT" in table and "MSCA-KV" in table and "within pair" in table

  # A second call finds the finished runs and only evaluates them again.
  again = compare.compare(workdir, ["vit", "msca_kv"], num_epochs=2)
  for variant in results:
    assert again[variant]["top1"] == results[variant]["top1"]
    assert again[variant]["steps"] == 8


def test_labels_and_unknown_variant():
  assert compare.label("vit") == "ViT" and compare.label("tokenshift") == "TokenShift"
  assert compare.label("msca_kv") == "MSCA-KV"
  assert compare.label("msca_q_patch") == "MSCA-Q (patch)"
  assert compare.label is configs.label   # one table, in msca_jax/configs
  with pytest.raises(app.UsageError, match="--variants: unknown variant .nope.: expected one of vit, tokenshift, msca_q"):
    compare.demo_config("nope", None, 0)


def test_read_metrics_keeps_the_last_line_of_a_step(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for row in ({"step": 2, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9},
                {"step": 2, "train/loss": 1.5}, {"step": 4, "val/top1": 0.5}):
      f.write(json.dumps(row) + "\n")
  assert compare.read_metrics(str(tmp_path)) == [
      {"step": 2, "train/loss": 1.5}, {"step": 4, "train/loss": 0.9, "val/top1": 0.5}]


def test_comparison_plots(tmp_path):
  bars = str(tmp_path / "bars.png")
  compare.plot_accuracy_bars(
      bars, {"ViT": {"top1": 0.45, "within_pair_accuracy": 0.51},
             "MSCA": {"top1": 0.93, "within_pair_accuracy": 0.95}},
      title="synthetic", chance={"within_pair_accuracy": 0.5})
  curves = str(tmp_path / "curves.png")
  compare.plot_accuracy_curves(curves, {"ViT": [(100, 0.3), (0, 0.1)], "MSCA": [(0, 0.1)]})
  for path in (bars, curves):
    with open(path, "rb") as f:
      assert f.read(4) == b"\x89PNG"


def test_flags_are_defined_only_when_asked():
  fv = flags.FlagValues()
  compare.define_flags(fv)
  fv(["compare", "--workdir=/tmp/w", "--variants=vit,msca_q"])
  assert (fv.workdir, fv.variants, fv.num_epochs, fv.seed) == ("/tmp/w", ["vit", "msca_q"], None, 0)
  assert compare.__name__ not in flags.FLAGS.flags_by_module_dict()   # importing it defined none


def test_study_runs_every_seed_once_and_reads_finished_runs(tmp_path, monkeypatch):
  # The study's bookkeeping around the trainer (whose exact resume tests/train/test_trainer.py
  # proves): each (entry, seed) runs once in its own workdir with its own config, a finished run
  # is read back, a run without its result runs again, another config's result is refused.
  workdir = str(tmp_path / "study")
  os.makedirs(workdir)
  calls = []

  def fake_run(config, run_dir, mode):
    moved = config.model.shift_div if config.model.name == "msca" else None
    calls.append((run_dir, config.train.seed, config.train.num_steps, moved, mode))
    os.makedirs(run_dir, exist_ok=True)   # the trainer makes its workdir
    top1 = 0.1 * (config.train.seed + 1)
    return {"step": config.train.num_steps,
            "test": {"test/top1": top1, "test/top5": 1.0, "test/within_pair_accuracy": 0.5}}

  from msca_jax.train import trainer   # study imports it when it runs
  monkeypatch.setattr(trainer, "run", fake_run)
  results = compare.study(workdir, ["vit", "msca_kv_heads2"], seeds=[0, 1], steps=2)
  assert calls == [(os.path.join(workdir, name, f"seed_{seed}"), seed, 2, div, "train_and_evaluate")
                   for name, div in (("vit", None), ("msca_kv_heads2", 2)) for seed in (0, 1)]
  assert [r["top1"] for r in results["msca_kv_heads2"]] == pytest.approx([0.1, 0.2])
  assert [r["config"]["train"]["seed"] for r in results["vit"]] == [0, 1]
  paths = compare.write_study(workdir, results)
  with open(paths["png"], "rb") as f:
    assert f.read(4) == b"\x89PNG"
  with open(paths["md"]) as f:
    assert f.readline().startswith("| model | seeds | steps | top-1 (%)")

  os.remove(os.path.join(workdir, "vit", "seed_1", "result.json"))
  calls.clear()
  again = compare.study(workdir, ["vit", "msca_kv_heads2"], seeds=[0, 1], steps=2)
  assert [c[0] for c in calls] == [os.path.join(workdir, "vit", "seed_1")]
  assert again["msca_kv_heads2"] == results["msca_kv_heads2"] and again["vit"][0] == results["vit"][0]
  assert again["vit"][1]["top1"] == results["vit"][1]["top1"]
  with pytest.raises(UserError, match="vit/seed_0 holds a finished run of another config"):
    compare.study(workdir, ["vit"], seeds=[0], steps=3)


def test_study_statistics_and_entries():
  runs = {"vit": [{"top1": 0.5, "top5": 0.9, "within_pair_accuracy": 0.4, "steps": 10},
                  {"top1": 0.7, "top5": 1.0, "within_pair_accuracy": 0.6, "steps": 10},
                  {"top1": 0.9, "top5": 0.8, "within_pair_accuracy": 0.5, "steps": 10}],
          "msca_kv_heads2": [{"top1": 0.25, "top5": 0.5, "within_pair_accuracy": 0.75, "steps": 4}]}
  summary = compare.summarize(runs)
  vit = summary["vit"]
  assert vit["seeds"] == 3 and vit["steps"] == [10]
  assert vit["top1"] == pytest.approx(0.7) and vit["top1_std"] == pytest.approx(0.2)
  assert vit["top5"] == pytest.approx(0.9) and vit["top5_std"] == pytest.approx(0.1)
  assert vit["within_pair_accuracy_std"] == pytest.approx(0.1)
  assert summary["msca_kv_heads2"]["top1"] == 0.25
  assert np.isnan(summary["msca_kv_heads2"]["top1_std"])   # one seed has no spread
  table = compare.format_study(summary)
  assert "70.0 ± 20.0" in table and "MSCA-KV (2+2)" in table and "25.0 " in table

  assert len(compare.STUDY) == 17   # ViT, TokenShift, 7 head and 7 patch variants, KV 2+2
  two = compare.study_config("msca_kv_heads2", seed=3, steps=5)
  one = compare.study_config("msca_kv", seed=3)
  assert (two.model.num_heads // two.model.shift_div, one.model.num_heads // one.model.shift_div) == (2, 1)
  assert two.train.num_steps == 5 and two.train.seed == 3 and one.train.num_steps == -1
  assert compare.study_config("msca_q_patch", 0).model.msca_axis == "patch"
