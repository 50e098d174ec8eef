r"""Times the real train and eval steps of several variants side by side.

    python -m benchmarks.benchmark --config=configs/msca_kv.py --batch=8 --dtype=bfloat16
    python -m benchmarks.benchmark --config=configs/msca_kv.py --variants=vit,msca_kv \
        --batch=1 --steps=5 --warmup=1 --eval --json=bench.json
    python -m benchmarks.benchmark --config=configs/vit.py --variants=vit \
        --batch_sweep=8,16,32,64,128 --remat_sweep --dtype=bfloat16

Each variant is a config file under configs/ (`vit`, `tokenshift`, `msca_kv`, ...). It is built
with the argument of --config (`:demo`), the --config.FIELD=VALUE overrides of the command line,
then --batch, --dtype, --remat, --frames, --image_size and --model_variant. The default variants
are vit, tokenshift and the --config file's own.

What is timed is the trainer's own train step (`train.trainer.make_train_step`: the recipe's
optimiser from `config.train`, e.g. clipping + SGD momentum under gradient accumulation, the
trainer's loss `optim.training_loss`, the state donated, sharded over `config.mesh`) on a random
batch in the layout the input stream sends (with `config.data.augment_on`'s device path, the
decoded crop windows that the step resizes, flips and colours; with mixup or CutMix on, the
second label and its weight), and with --eval the evaluation step (forward only, one view).
The analysis of each compiled step (FLOPs, peaks and MFU, memory, HLO) is
benchmarks/step_analysis.py. Per variant:

  compile     lower + compile of the train step, seconds
  step        train-step seconds: median and minimum over --steps after --warmup steps
  vs ViT      the median over rounds of (this step / the baseline's step in the same round); every
              round times one step of each variant in turn (rotating the order), so machine noise
              falls on all alike. The baseline is the first variant (vit when listed)
  FLOPs       XLA's cost analysis of the train step per clip: the model's FLOPs (remat off, XLA
              attention, because a cuDNN custom call counts as 0 FLOPs), forward FLOPs likewise
  TFLOP/s     FLOPs per step / median step time; MFU = that / the device's peak for the compute
              dtype (--peak_tflops, or a table of known devices; blank when unknown, e.g. CPU)
  memory      the device's peak_bytes_in_use when it reports one (GPU/TPU; process-wide, so it
              never goes down from one variant to the next), else the compiled step's
              memory_analysis (arguments + outputs + temporaries - aliased)
  attention   config.model.attention_impl, what it resolves to, and what runs: cuDNN's fused
              kernel when the compiled HLO calls it (GPU), else XLA ops

--batch_sweep=1,2,4,8 runs each variant at each batch instead (with and without remat with
--remat_sweep): throughput per batch, the best batch and the largest that compiles and runs; an
out-of-memory error (XLA RESOURCE_EXHAUSTED) is reported as OOM and ends that variant's sweep.
Output: a fixed-width table, and JSON with --json.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from msca_jax.configs import get as load_variant, label
from msca_jax import cli, host_memory, models, progress
from msca_jax.data import pipeline
from benchmarks import common, step_analysis
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import optim, trainer
from msca_jax.train import state as state_lib
from msca_jax.data.decode import DecodeSettings

# The learning-rate schedule needs an epoch length; it changes no cost of the step.
STEPS_PER_EPOCH = 1000


# ------------------------------------------------------------------------------------ configs

def variant_config(variant: str, arg: str | None = None, overrides: dict[str, Any] | None = None,
                   *, batch: int | None = None, dtype: str | None = None, remat: bool | None = None,
                   frames: int | None = None, image_size: int | None = None,
                   model_variant: str | None = None) -> ml_collections.ConfigDict:
  """configs/<variant>.py's config with `arg`, then the flat `overrides`, then the settings."""
  try:
    config = load_variant(variant, arg)
  except ValueError as e:
    raise ValueError(f"--variants: {e}") from e
  return apply_settings(config, overrides, batch=batch, dtype=dtype, remat=remat, frames=frames,
                        image_size=image_size, model_variant=model_variant)


def apply_settings(config, overrides=None, *, batch=None, dtype=None, remat=None, frames=None,
                   image_size=None, model_variant=None) -> ml_collections.ConfigDict:
  """A copy of `config` with flat overrides ({'model.width': 32}) and the benchmark's settings."""
  config = config.copy_and_resolve_references()
  if overrides:
    config.update_from_flattened_dict(dict(overrides))
  m = config.model
  for field, value in (("dtype", dtype), ("remat", remat), ("num_frames", frames),
                       ("image_size", image_size), ("variant", model_variant)):
    if value is not None:
      m[field] = value
  if frames is not None:
    config.data.num_frames = frames
  if image_size is not None:
    config.data.image_size = image_size
  if batch is not None:
    config.train.batch_size = batch
  return config


# ------------------------------------------------------------------------------------ devices

def is_oom(error: BaseException) -> bool:
  """True for XLA's out-of-memory errors (RESOURCE_EXHAUSTED) and host MemoryError."""
  if isinstance(error, MemoryError):
    return True
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ------------------------------------------------------------------------------------ one variant

def _compile(lowered):
  """Compiles a lowered step (a seam the tests replace to simulate running out of memory)."""
  return lowered.compile()


@dataclasses.dataclass
class Bench:
  """One variant's compiled steps, live state and random batch."""
  name: str
  config: Any
  batch_size: int
  train: Callable
  state: Any
  batch: dict
  rng: Any
  info: dict
  evaluate: Callable | None = None
  eval_batch: dict | None = None
  last_metrics: dict | None = None

  def train_once(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.train(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - start
    self.last_metrics = metrics
    return elapsed

  def eval_once(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.evaluate(self.state.params, self.eval_batch))
    return time.perf_counter() - start


def _training_window(config) -> int | None:
  """The padded crop window of the trainer's batches when the device finishes the views
  (data/stream.py), for frames stored at the preparation tools' short side."""
  data = config.data
  if not pipeline.augments_on_device(data):
    return None
  return pipeline.device_window(data, DecodeSettings().short_side)


def random_batch(config, fields: Sequence[pipeline.Field], batch: int, mesh, seed: int) -> dict:
  """Random values for the device fields of a batch layout (pipeline.train_fields / eval_fields),
  as the input stream would send them, placed on `mesh`."""
  local = batch // jax.process_count()
  rng = np.random.default_rng(seed)
  data = config.data
  out: dict[str, np.ndarray] = {}
  for field in fields:
    if not field.device:
      continue
    shape = (local,) + field.shape
    dtype = np.dtype(jax.numpy.dtype(field.dtype))
    if field.name == "video" and np.issubdtype(dtype, np.integer):
      out[field.name] = rng.integers(0, 256, shape).astype(dtype)
    elif field.name == "video":    # float clips arrive in [-1, 1]
      out[field.name] = rng.uniform(-1, 1, shape).astype(dtype)
    elif field.name == "window":   # the recipe's range of windows, up to the padded side
      side = next(f for f in fields if f.name == "video").shape[1]
      lo, hi = data.train_short_side_range
      out[field.name] = rng.integers(max(1, side * lo // hi), side + 1, shape).astype(dtype)
    elif field.name == "flip":
      out[field.name] = rng.integers(0, 2, shape).astype(dtype)
    elif field.name == "color":    # every change applied: the most work the step can do
      out[field.name] = np.tile(np.array([1.2, 1.5, 0.9, 0.1], dtype), (local, 1))
    elif field.name in ("label", "label_mix"):
      out[field.name] = rng.integers(0, config.model.num_classes, shape).astype(dtype)
    elif field.name == "mix_weight":
      out[field.name] = rng.uniform(0, 1, shape).astype(dtype)
    elif field.name == "mask":
      out[field.name] = np.ones(shape, dtype)
    else:
      raise AssertionError(f"no random values for batch field {field.name!r}")
  return mesh_lib.global_batch(out, mesh)


def prepare(name: str, config, *, with_eval: bool = False, devices: Sequence[jax.Device] | None = None,
            seed: int = 0) -> Bench:
  """Builds, lowers and compiles a variant's train (and eval) step; analyses cost and memory.

  The train step is the trainer's own (trainer.make_train_step), on a random batch in the
  layout the trainer's input stream sends for this config (mixup's label fields included).
  """
  batch = int(config.train.batch_size)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = mesh_lib.rules(config.mesh)
  mesh_lib.check_batch_size(batch, mesh, "--batch")
  model = models.build(config.model)
  tx = optim.make_optimizer(config.train, STEPS_PER_EPOCH)
  state, shardings = state_lib.create(model, tx, models.clip_spec(config.model), mesh, rules,
                                      jax.random.key(seed))
  window = _training_window(config)
  step = trainer.make_train_step(config, model, tx, shardings, mesh, rules, window)
  data = random_batch(config, pipeline.train_fields(config.data, window), batch, mesh, seed)
  rng = jax.random.key(seed + 1)

  start = time.perf_counter()
  lowered = step.lower(state, data, rng)
  compiled = _compile(lowered)
  compile_s = time.perf_counter() - start
  hlo = compiled.as_text()
  attention = step_analysis.attention_info(config.model, hlo)

  # The model's FLOPs, whatever runs them (step_analysis.flops_model_config).
  m = config.model
  twin_config = step_analysis.flops_model_config(m, attention)
  twin = model if twin_config is None else models.build(twin_config)
  lowered_twin = lowered if twin is model else trainer.make_train_step(
      config, twin, tx, shardings, mesh, rules, window).lower(state, data, rng)
  info = {
      "variant": name, "label": label(name), "model": m.name, "arch": models.architecture(m),
      "temporal": dataclasses.asdict(model.temporal), "batch": batch, "dtype": m.dtype,
      "remat": bool(m.remat), "frames": m.num_frames, "image_size": m.image_size,
      "model_variant": m.variant, "optimizer": config.train.optimizer,
      "grad_accum_steps": int(config.train.grad_accum_steps),
      "batch_fields": sorted(data),
      "devices": int(mesh.devices.size), "mesh": dict(mesh.shape),
      "attention": attention, "compile_s": compile_s,
      "flops_per_clip": step_analysis.flops(lowered_twin) / batch,
      "flops_source": "XLA cost analysis of the train step" + (
          " (counted with remat off and XLA attention)" if twin is not model else ""),
      "compiled_flops_per_device": step_analysis.flops(compiled),
      "compiled_memory": step_analysis.compiled_memory(compiled),
      "hlo_ops": {op: n for op, n in step_analysis.hlo_op_counts(hlo).items()
                  if op in step_analysis.HLO_OPS},
  }
  bench = Bench(name=name, config=config, batch_size=batch, train=compiled, state=state,
                batch=data, rng=rng, info=info)
  if with_eval:
    eval_step = state_lib.make_eval_step(model, shardings, mesh, rules)
    eval_batch = random_batch(config, pipeline.eval_fields(config.data, 1), batch, mesh, seed + 2)
    start = time.perf_counter()
    bench.evaluate = _compile(eval_step.lower(state.params, eval_batch))
    info["eval_compile_s"] = time.perf_counter() - start
    eval_lowered = (state_lib.make_eval_step(twin, shardings, mesh, rules).lower(state.params, eval_batch)
                    if twin is not model else eval_step.lower(state.params, eval_batch))
    info["forward_flops_per_clip"] = step_analysis.flops(eval_lowered) / batch
    bench.eval_batch = eval_batch
  return bench


# ------------------------------------------------------------------------------------ timing

def _stats(times: Sequence[float]) -> dict | None:
  if not times:
    return None
  return {"median": float(statistics.median(times)), "min": float(min(times)),
          "max": float(max(times)), "times": [float(t) for t in times]}


def _rounds(benches: list[Bench], repeats: int, run: Callable[[Bench], float]) -> dict[str, list[float]]:
  """`repeats` rounds; each times one call per variant, starting at a different variant."""
  times = {b.name: [] for b in benches}
  n = len(benches)
  for r in range(repeats):
    for b in benches[r % n:] + benches[:r % n]:
      times[b.name].append(run(b))
  return times


def run_benchmark(configs: dict[str, Any], *, steps: int = 10, warmup: int = 2, with_eval: bool = False,
                  peak_tflops: float | None = None, devices: Sequence[jax.Device] | None = None,
                  log: Callable[[str], None] = lambda s: None) -> dict:
  """Compiles every variant, then times them in interleaved rounds; returns the results dict."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
  load_before = os.getloadavg()
  benches = []
  for name, config in configs.items():
    log(f"compiling {label(name)} ...")
    benches.append(prepare(name, config, with_eval=with_eval, devices=devices))
    log(f"  {label(name)}: compiled in {benches[-1].info['compile_s']:.1f} s")
  for b in benches:
    for _ in range(warmup):
      b.train_once()
      if with_eval:
        b.eval_once()
  log(f"timing {steps} rounds of {len(benches)} variant(s) ...")
  train_times = _rounds(benches, steps, Bench.train_once)
  eval_times = _rounds(benches, steps, Bench.eval_once) if with_eval else {}
  device_peak = step_analysis.device_peak_bytes()
  baseline = benches[0].name
  results = []
  for b in benches:
    info = dict(b.info)
    peak, peak_source = step_analysis.peak_for(info["dtype"], peak_tflops)
    info["peak_tflops"], info["peak_source"] = peak, peak_source
    info["step_s"] = _stats(train_times[b.name])
    info.update(step_analysis.throughput(b.batch_size, info["step_s"], info["flops_per_clip"], peak))
    info["eval_s"] = _stats(eval_times.get(b.name, []))
    info.update(step_analysis.throughput(b.batch_size, info["eval_s"], info.get("forward_flops_per_clip"),
                                         peak, "eval_"))
    paired = [t / base for t, base in zip(train_times[b.name], train_times[baseline])]
    info["ratio_to_baseline"] = float(statistics.median(paired))
    info["ratio_of_medians"] = info["step_s"]["median"] / statistics.median(train_times[baseline])
    info["memory"] = step_analysis.memory_report(info["compiled_memory"], device_peak)
    metrics = jax.device_get(b.last_metrics) if b.last_metrics is not None else {}
    info["loss"] = float(metrics["loss"]) if "loss" in metrics else None
    results.append(info)
  return {"device": _device_info(), "baseline": baseline, "steps": steps, "warmup": warmup,
          "load_before": list(load_before), "load_after": list(os.getloadavg()),
          "variants": results}


def _device_info() -> dict:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "count": jax.device_count(),
          "processes": jax.process_count(), "jax": jax.__version__,
          "cpu_cores": common.num_cores()}


def batch_sweep(configs: dict[str, Any], batches: Sequence[int], *, remats: Sequence[bool] = (False,),
                steps: int = 3, warmup: int = 1, peak_tflops: float | None = None,
                devices: Sequence[jax.Device] | None = None,
                log: Callable[[str], None] = lambda s: None) -> dict:
  """Each variant (and remat setting) at each batch, ascending, until the first OOM."""
  rows, summary = [], []
  for name, config in configs.items():
    for remat in remats:
      ok = []
      stop = False
      for batch in sorted(batches):
        row: dict[str, Any] = {"variant": name, "label": label(name), "remat": bool(remat), "batch": batch}
        rows.append(row)
        if stop:
          row["status"] = "skipped"
          continue
        cfg = apply_settings(config, batch=batch, remat=bool(remat))
        bench = None
        try:
          bench = prepare(name, cfg, devices=devices)
          for _ in range(warmup):
            bench.train_once()
          times = [bench.train_once() for _ in range(steps)]
        except Exception as e:  # pylint: disable=broad-except
          if is_oom(e):
            row["status"] = "OOM"
            row["error"] = str(e).splitlines()[0][:300]
            stop = True
            log(f"{label(name)} remat={remat} batch {batch}: OOM")
          elif isinstance(e, ValueError) and "--batch" in str(e):
            row["status"] = "skipped"
            row["error"] = str(e)
          else:
            raise
        else:
          info = bench.info
          peak, peak_source = step_analysis.peak_for(info["dtype"], peak_tflops)
          row.update(status="ok", compile_s=info["compile_s"], step_s=_stats(times),
                     flops_per_clip=info["flops_per_clip"], peak_tflops=peak, peak_source=peak_source,
                     dtype=info["dtype"], attention=info["attention"]["kernel"],
                     memory=step_analysis.memory_report(info["compiled_memory"],
                                                               step_analysis.device_peak_bytes()))
          row.update(step_analysis.throughput(batch, row["step_s"], info["flops_per_clip"], peak))
          ok.append(row)
          log(f"{label(name)} remat={remat} batch {batch}: {row['step_s']['median'] * 1e3:.1f} ms, "
              f"{row['clips_per_s']:.2f} clips/s")
        finally:
          del bench
          gc.collect()
      best = max(ok, key=lambda r: r["clips_per_s"]) if ok else None
      summary.append({"variant": name, "label": label(name), "remat": bool(remat),
                      "largest_batch": max((r["batch"] for r in ok), default=None),
                      "best_batch": best["batch"] if best else None,
                      "best_clips_per_s": best["clips_per_s"] if best else None,
                      "best_mfu": best["mfu"] if best else None,
                      "first_oom_batch": next((r["batch"] for r in rows if r["variant"] == name
                                               and r["remat"] == bool(remat) and r.get("status") == "OOM"),
                                              None)})
  return {"device": _device_info(), "rows": rows, "summary": summary}


# ------------------------------------------------------------------------------------ tables

def _num(value, fmt: str, scale: float = 1.0) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "-"
  return format(value * scale, fmt)


def _rate(value) -> str:
  return "-" if value is None else progress.format_rate(value)


def _gib(value) -> str:
  return "-" if value is None else progress.format_rate(value / 2**30)


def format_table(results: dict) -> str:
  """The fixed-width comparison table of run_benchmark's results."""
  columns = (("variant", 14, "<"), ("batch", 5, ">"), ("dtype", 8, "<"), ("remat", 5, "<"),
             ("attention", 11, "<"), ("compile s", 9, ">"), ("step ms", 10, ">"), ("min ms", 10, ">"),
             ("vs " + label(results["baseline"]), 8, ">"), ("clips/s", 8, ">"), ("eval ms", 9, ">"),
             ("GFLOP/clip", 10, ">"), ("TFLOP/s", 8, ">"), ("MFU", 6, ">"), ("mem GiB", 7, ">"))
  header = " ".join(format(name, f"{align}{width}") for name, width, align in columns)
  lines = [header, "-" * len(header)]
  for v in results["variants"]:
    step = v["step_s"] or {}
    values = (v["label"], v["batch"], v["dtype"], "yes" if v["remat"] else "no",
              v["attention"]["kernel"], _num(v["compile_s"], ".1f"), _num(step.get("median"), ".1f", 1e3),
              _num(step.get("min"), ".1f", 1e3), _num(v.get("ratio_to_baseline"), ".3f"),
              _rate(v.get("clips_per_s")),
              _num((v.get("eval_s") or {}).get("median"), ".1f", 1e3),
              _num(v["flops_per_clip"], ".2f", 1e-9), _rate(v.get("achieved_tflops")),
              _num(v.get("mfu"), ".1%"), _gib(v["memory"]["bytes"]))
    lines.append(" ".join(format(str(value), f"{align}{width}")
                          for value, (_, width, align) in zip(values, columns)))
  return "\n".join(lines)


def format_notes(results: dict) -> str:
  d = results["device"]
  v0 = results["variants"][0]
  notes = [f"device: {d['count']} x {d['device_kind']} ({d['platform']}), {d['cpu_cores']} host cores, "
           f"jax {d['jax']}",
           "peak: " + (f"{v0['peak_tflops']:g} TFLOP/s ({v0['peak_source']})" if v0["peak_tflops"]
                       else f"{v0['peak_source']}: MFU blank (pass --peak_tflops)"),
           f"memory: {v0['memory']['source']}",
           f"FLOPs: {v0['flops_source']}",
           f"timing: {results['warmup']} warm-up step(s), then {results['steps']} interleaved rounds; "
           f"vs {label(results['baseline'])} = median of per-round ratios",
           "load average: before {:.2f} {:.2f} {:.2f}, after {:.2f} {:.2f} {:.2f}".format(
               *results["load_before"], *results["load_after"])]
  return "\n".join(notes)


def format_sweep(sweep: dict) -> str:
  columns = (("variant", 14, "<"), ("remat", 5, "<"), ("batch", 6, ">"), ("status", 8, "<"),
             ("step ms", 10, ">"), ("clips/s", 9, ">"), ("TFLOP/s", 8, ">"), ("MFU", 6, ">"),
             ("mem GiB", 7, ">"))
  header = " ".join(format(name, f"{align}{width}") for name, width, align in columns)
  lines = [header, "-" * len(header)]
  for r in sweep["rows"]:
    ok = r["status"] == "ok"
    values = (r["label"], "yes" if r["remat"] else "no", r["batch"], r["status"],
              _num(r["step_s"]["median"], ".1f", 1e3) if ok else "-",
              _rate(r.get("clips_per_s")), _rate(r.get("achieved_tflops")),
              _num(r.get("mfu"), ".1%"), _gib(r["memory"]["bytes"]) if ok else "-")
    lines.append(" ".join(format(str(value), f"{align}{width}")
                          for value, (_, width, align) in zip(values, columns)))
  lines.append("")
  for s in sweep["summary"]:
    lines.append(f"{s['label']}, remat {'on' if s['remat'] else 'off'}: largest batch that runs "
                 f"{s['largest_batch'] if s['largest_batch'] is not None else 'none'}"
                 + (f" (OOM at {s['first_oom_batch']})" if s["first_oom_batch"] else "")
                 + (f"; best throughput {s['best_clips_per_s']:.4g} clips/s at batch {s['best_batch']}"
                    if s["best_batch"] is not None else ""))
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ command line

def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py.",
                                  flag_values=flag_values)
  flags.DEFINE_list("variants", None, "Config names under configs/ (default: vit, tokenshift and "
                    "the --config file's); the first is the baseline of the ratios.",
                    flag_values=flag_values)
  flags.DEFINE_integer("batch", 8, "Clips per train step (global).", flag_values=flag_values)
  flags.DEFINE_enum("dtype", None, list(models.DTYPES), "Compute dtype (default: the config's).",
                    flag_values=flag_values)
  flags.DEFINE_bool("remat", None, "Rematerialise each block (default: the config's).",
                    flag_values=flag_values)
  flags.DEFINE_integer("frames", None, "Frames per clip (default: the config's).", flag_values=flag_values)
  flags.DEFINE_integer("image_size", None, "Frame size (default: the config's).", flag_values=flag_values)
  flags.DEFINE_string("model_variant", None, "ViT size, e.g. B/16 (default: the config's).",
                      flag_values=flag_values)
  flags.DEFINE_integer("steps", 10, "Timed steps (rounds) per variant.", flag_values=flag_values)
  flags.DEFINE_integer("warmup", 2, "Untimed steps per variant first.", flag_values=flag_values)
  flags.DEFINE_float("peak_tflops", None, "Device peak TFLOP/s for the MFU (default: known devices).",
                     flag_values=flag_values)
  flags.DEFINE_string("json", "", "Also write the results here.", flag_values=flag_values)
  flags.DEFINE_bool("eval", False, "Also time the eval step (forward, one view).", flag_values=flag_values)
  flags.DEFINE_list("batch_sweep", [], "Batches to sweep instead of the comparison, e.g. 1,2,4,8.",
                    flag_values=flag_values)
  flags.DEFINE_bool("remat_sweep", False, "In the batch sweep, try remat off and on.",
                    flag_values=flag_values)


def configs_from_flags(fv: flags.FlagValues) -> dict[str, Any]:
  config = fv.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/msca_kv.py")
  path = config_flags.get_config_filename(fv["config"])
  path, _, arg = path.partition(":") if ":" in os.path.basename(path) else (path, "", "")
  own = os.path.splitext(os.path.basename(path))[0]
  variants = fv.variants or list(dict.fromkeys(["vit", "tokenshift", own]))
  overrides = config_flags.get_override_values(fv["config"])
  settings = dict(batch=fv.batch, dtype=fv.dtype, remat=fv.remat, frames=fv.frames,
                  image_size=fv.image_size, model_variant=fv.model_variant)
  out = {}
  for name in variants:
    if name == own:  # the config as given (it may live outside configs/)
      out[name] = apply_settings(config, None, **settings)
    else:
      try:
        out[name] = variant_config(name, arg or None, overrides, **settings)
      except ValueError as e:
        raise app.UsageError(str(e)) from e
  return out


def _print(message: str) -> None:
  print(message, flush=True)


def run_from_flags(fv: flags.FlagValues = flags.FLAGS) -> dict:
  configs = configs_from_flags(fv)
  first = next(iter(configs.values())).model
  _print(f"benchmark: {', '.join(label(n) for n in configs)}; {first.variant} "
         f"{first.num_frames}x{first.image_size}, batch {fv.batch}, {first.dtype}, remat {first.remat}, "
         f"on {jax.device_count()} x {jax.devices()[0].device_kind}; load average "
         + " ".join(f"{x:.2f}" for x in os.getloadavg()))
  if fv.batch_sweep:
    batches = [int(b) for b in fv.batch_sweep]
    results = batch_sweep(configs, batches, remats=(False, True) if fv.remat_sweep else (bool(first.remat),),
                          steps=fv.steps, warmup=fv.warmup, peak_tflops=fv.peak_tflops, log=_print)
    _print("")
    _print(format_sweep(results))
  else:
    results = run_benchmark(configs, steps=fv.steps, warmup=fv.warmup, with_eval=fv.eval,
                            peak_tflops=fv.peak_tflops, log=_print)
    _print("")
    _print(format_table(results))
    _print(format_notes(results))
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
    _print(f"wrote {fv.json}")
  return results


def main(argv):
  print(host_memory.keep_freed_memory(), flush=True)  # before JAX starts its threads
  del argv
  run_from_flags(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
