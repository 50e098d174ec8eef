"""The benchmark tool: real train/eval steps timed side by side, FLOPs, MFU, memory, OOM, tables."""

import json
import math
import sys

import jax
import pytest
from absl import flags

from msca_jax.train import optim
from benchmarks import benchmark

# 1 block of width 32 with 2 heads; shift_div 2 moves one head each way (as 12/12 in B/16).
TINY = {"model.width": 32, "model.depth": 1, "model.num_heads": 2, "model.mlp_dim": 64,
        "model.patch_size": 8, "model.shift_div": 2}
SETTINGS = dict(batch=2, frames=4, image_size=32)


def _configs(*variants, **settings):
  settings = dict(SETTINGS, **settings)
  return {v: benchmark.variant_config(v, None, TINY, **settings) for v in variants}


@pytest.fixture(scope="module")
def results():
  return benchmark.run_benchmark(_configs("vit", "msca_kv"), steps=2, warmup=1, with_eval=True,
                                 devices=jax.devices()[:1])


def test_results_are_complete_and_sane(results):
  assert results["baseline"] == "vit"
  assert [v["variant"] for v in results["variants"]] == ["vit", "msca_kv"]
  json.loads(json.dumps(results))  # serialisable as it is
  for v in results["variants"]:
    assert v["batch"] == 2 and v["frames"] == 4 and v["image_size"] == 32
    assert v["arch"]["width"] == 32 and v["optimizer"] == "sgd"   # the recipe's optimiser
    assert v["compile_s"] > 0 and v["eval_compile_s"] > 0
    assert len(v["step_s"]["times"]) == 2 and 0 < v["step_s"]["min"] <= v["step_s"]["median"]
    assert v["eval_s"]["median"] > 0
    assert v["clips_per_s"] == pytest.approx(2 / v["step_s"]["median"])
    assert v["flops_per_clip"] > v["forward_flops_per_clip"] > 0
    assert v["achieved_tflops"] == pytest.approx(
        v["flops_per_clip"] * 2 / v["step_s"]["median"] / 1e12)
    attention = v["attention"]   # on CPU: XLA ops, named by what 'auto' resolved to
    assert attention["family"] == "xla" and attention["kernel"] == attention["resolved"] != "cudnn"
    assert v["batch_fields"] == ["color", "flip", "label", "video", "window"]  # device views
    assert v["memory"]["bytes"] > 0 and "memory_analysis" in v["memory"]["source"]
    assert v["peak_tflops"] is None and v["mfu"] is None     # CPU: no known peak
    assert math.isfinite(v["loss"])
    assert v["hlo_ops"]["fusion"] > 0
  vit, msca = results["variants"]
  assert vit["ratio_to_baseline"] == 1.0 and vit["ratio_of_medians"] == 1.0
  assert msca["ratio_to_baseline"] > 0
  assert msca["temporal"]["kind"] == "msca" and vit["temporal"]["kind"] == "none"
  # The models are FLOP-equal: MSCA only selects which frame some heads read.
  assert msca["flops_per_clip"] == pytest.approx(vit["flops_per_clip"], rel=0.01)
  assert msca["forward_flops_per_clip"] == pytest.approx(vit["forward_flops_per_clip"], rel=0.01)


def test_table_and_notes(results):
  table = benchmark.format_table(results)
  lines = table.splitlines()
  assert "vs ViT" in lines[0] and "MFU" in lines[0]
  assert len(lines) == 4 and lines[2].startswith("ViT") and lines[3].startswith("MSCA-KV")
  assert len({len(line) for line in lines}) == 1   # fixed width
  assert lines[2].split()[8] == "1.000"
  notes = benchmark.format_notes(results)
  assert "MFU blank" in notes and "load average" in notes


def test_table_with_mfu_and_blanks():
  v = {"label": "ViT", "batch": 8, "dtype": "bfloat16", "remat": True,
       "attention": {"kernel": "cudnn fused"}, "compile_s": 12.3,
       "step_s": {"median": 0.25, "min": 0.2}, "ratio_to_baseline": 1.0, "clips_per_s": 32.0,
       "eval_s": None, "flops_per_clip": 8.5e11, "achieved_tflops": 27.2, "mfu": 0.0275,
       "memory": {"bytes": 3 * 2**30}}
  table = benchmark.format_table({"baseline": "vit", "variants": [v, dict(v, mfu=None)]})
  first, second = table.splitlines()[2:]
  assert first.split() == ["ViT", "8", "bfloat16", "yes", "cudnn", "fused", "12.3", "250.0", "200.0",
                           "1.000", "32.0", "-", "850.00", "27.2", "2.8%", "3.00"]
  assert second.split()[-2] == "-"


class _Lowered(Exception):
  """Stops prepare() after lowering: what is checked is traced, nothing needs compiling."""


@pytest.mark.parametrize("data, fields", [
    ({"data.mixup_alpha": 0.8}, ["label", "label_mix", "mix_weight", "video"]),
    ({"data.augment_on": "host"}, ["label", "video"])])
def test_the_random_batch_takes_the_trainers_path(monkeypatch, data, fields):
  seen = []

  def recording_loss(train_cfg):
    loss_fn = real_loss(train_cfg)

    def wrapped(logits, batch):
      seen.append(sorted(batch))
      return loss_fn(logits, batch)
    return wrapped

  def stop(lowered):
    raise _Lowered()

  real_loss = optim.training_loss
  monkeypatch.setattr(optim, "training_loss", recording_loss)   # the trainer's step calls it
  monkeypatch.setattr(benchmark, "_compile", stop)
  config = benchmark.variant_config("vit", None, dict(TINY, **data), **SETTINGS)
  with pytest.raises(_Lowered):
    benchmark.prepare("vit", config, devices=jax.devices()[:1])
  assert seen == [fields]   # mixup's second label reaches the trainer's loss


def test_oom_ends_the_sweep_and_is_reported(monkeypatch):
  real, calls = benchmark._compile, []

  def compile_or_oom(lowered):
    calls.append(1)
    if len(calls) > 1:
      raise jax.errors.JaxRuntimeError(
          "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.")
    return real(lowered)

  monkeypatch.setattr(benchmark, "_compile", compile_or_oom)
  sweep = benchmark.batch_sweep(_configs("vit"), [4, 1, 2], steps=1, warmup=0,
                                devices=jax.devices()[:1])
  assert [(r["batch"], r["status"]) for r in sweep["rows"]] == [(1, "ok"), (2, "OOM"), (4, "skipped")]
  assert "RESOURCE_EXHAUSTED" in sweep["rows"][1]["error"]
  assert len(calls) == 2                                     # nothing tried after the OOM
  summary, = sweep["summary"]
  assert summary["largest_batch"] == 1 and summary["best_batch"] == 1
  assert summary["first_oom_batch"] == 2
  table = benchmark.format_sweep(sweep)
  assert "OOM" in table and "largest batch that runs 1 (OOM at 2)" in table


def test_other_errors_are_not_hidden(monkeypatch):
  def broken(lowered):
    raise jax.errors.JaxRuntimeError("INTERNAL: something else")
  monkeypatch.setattr(benchmark, "_compile", broken)
  with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
    benchmark.batch_sweep(_configs("vit"), [1], steps=1, warmup=0, devices=jax.devices()[:1])


def test_is_oom():
  assert benchmark.is_oom(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory"))
  assert benchmark.is_oom(RuntimeError("CUDA error: out of memory"))
  assert benchmark.is_oom(MemoryError())
  assert not benchmark.is_oom(ValueError("bad shape"))


def test_configs_from_the_command_line(monkeypatch):
  argv = ["benchmark", "--config=configs/msca_kv.py", "--config.model.width=32",
          "--config.model.shift_div=2", "--batch=3", "--dtype=bfloat16", "--remat", "--frames=4",
          "--image_size=64", "--model_variant=S/16"]
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  benchmark.define_flags(fv)
  fv(argv)
  configs = benchmark.configs_from_flags(fv)
  assert list(configs) == ["vit", "tokenshift", "msca_kv"]   # the default variants
  for name, config in configs.items():
    m = config.model
    assert m.name == {"vit": "vit", "tokenshift": "tokenshift", "msca_kv": "msca"}[name]
    assert (m.width, m.shift_div, m.dtype, m.remat) == (32, 2, "bfloat16", True)
    assert (m.num_frames, m.image_size, m.variant) == (4, 64, "S/16")
    assert (config.data.num_frames, config.data.image_size) == (4, 64)
    assert config.train.batch_size == 3
  assert configs["msca_kv"].model.msca_targets == "kv"


def test_demo_argument_reaches_every_variant(monkeypatch):
  argv = ["benchmark", "--config=configs/msca_kv.py:demo", "--variants=vit,msca_qkv"]
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  benchmark.define_flags(fv)
  fv(argv)
  configs = benchmark.configs_from_flags(fv)
  assert list(configs) == ["vit", "msca_qkv"]
  assert all(c.model.width == 64 and c.model.image_size == 32 for c in configs.values())
  assert configs["msca_qkv"].model.msca_targets == "qkv"
  with pytest.raises(ValueError, match="unknown variant .nope."):
    benchmark.variant_config("nope")
