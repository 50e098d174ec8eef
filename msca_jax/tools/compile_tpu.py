r"""Compiles the trainer's train and eval steps for a TPU slice, on any host: memory, cost, collectives.

    pip install -e '.[tpu-compile]'          # libtpu: the TPU compiler, no TPU needed
    python -m msca_jax.tools.compile_tpu --config=configs/msca_kv.py --topology=v5p-8 \
        --variants=vit,tokenshift,msca_kv --batch_per_chip=8 --config.model.dtype=bfloat16
    python -m msca_jax.tools.compile_tpu --config=configs/msca_kv.py --topology=v5litepod-16 \
        --batch_sweep=8,16,32,64 --remat_sweep --json=sweep.json

--topology is a Cloud name (v4-32, v5litepod-16, v5p-128, v6e-64; v4 and v5p names count
TensorCores, two per chip) or the compiler's notation (v5p:4x4x4, v5e:4x4). What is compiled is
the trainer's own train step (train.trainer.make_train_step: the config's optimiser, loss, device
views, mesh and rules) and eval step (one view per clip), from abstract shapes with the slice's
shardings: nothing is allocated, and a multi-host slice compiles on one host. Per chip it reports
the compiler's memory_analysis against the chip's HBM (an out-of-memory in the compiler is a row
with fits = no), the compiler's cost_analysis `optimal_seconds` (its estimate, a sum of per-op
roofline times: an optimistic bound to compare programs with, not a measured step time), the
clips/s and MFU that estimate implies, the collectives of the optimised program and the compile
time. --batch_sweep gives the largest batch per chip that fits, with and without remat
(--remat_sweep). docs/tpu_compile.md has the chip table's sources and results.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import tempfile
import time
from typing import Any

import jax
from absl import app, flags
from jax.experimental import topologies
from ml_collections import config_flags

from msca_jax import cli, models
from msca_jax.configs import get as load_variant, label
from msca_jax.data import pipeline
from msca_jax.data.decode import DecodeSettings
from msca_jax.errors import UserError
from msca_jax.train import mesh as mesh_lib, optim, trainer
from msca_jax.train import state as state_lib

LIBTPU_PIN = "libtpu==0.0.42.*"   # jax 0.10.2's own pin for jax[tpu] (pyproject.toml's tpu-compile)
INSTALL_HINT = (f"the TPU compiler needs libtpu ({LIBTPU_PIN}): pip install -e '.[tpu-compile]'")
# The learning-rate schedule needs an epoch length; it changes no cost of the step.
STEPS_PER_EPOCH = 1000


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_bytes: int
  bf16_tflops: float
  chips_per_host: int     # of the multi-host slices' VMs (the compiler's topologies agree)
  cores_per_chip: int     # what the Cloud name counts per chip
  cloud: str              # the Cloud name's prefix
  shapes: dict            # chips -> the compiler's topology of the Cloud slice


GiB = 2**30
_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
       256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
# Sources (Cloud TPU system architecture pages) in docs/tpu_compile.md. Their "95 GB" (v5p) is
# GiB (the compiler fits 92.3 GiB per v5p chip); v6e's "32 GB" is taken as GiB likewise.
CHIPS = {
    "v4": Chip(32 * GiB, 275.0, 4, 2, "v4", _3D),
    "v5e": Chip(16 * GiB, 197.0, 4, 1, "v5litepod", _2D),
    "v5p": Chip(95 * GiB, 459.0, 4, 2, "v5p", _3D),
    "v6e": Chip(32 * GiB, 918.0, 4, 1, "v6e", _2D),
}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


class TopologyError(ValueError):
  pass


def known_topologies() -> list[str]:
  return [f"{c.cloud}-{n * c.cores_per_chip}" for c in CHIPS.values() for n in c.shapes]


def parse_topology(name: str) -> tuple[str, str, int]:
  """(generation, the compiler's topology name, chips) of a Cloud name or compiler notation."""
  m = re.fullmatch(r"(v\w+?)-(\d+)", name)
  for gen, chip in CHIPS.items():
    if m and m.group(1) == chip.cloud:
      cores = int(m.group(2))
      chips, rem = divmod(cores, chip.cores_per_chip)
      if not rem and chips in chip.shapes:
        return gen, f"{gen}:{chip.shapes[chips]}", chips
  m = re.fullmatch(r"(v\w+):(\d+(?:x\d+){1,2})", name)
  if m and m.group(1) in CHIPS:
    dims = [int(d) for d in m.group(2).split("x")]
    if len(dims) == len(next(iter(CHIPS[m.group(1)].shapes.values())).split("x")):
      return m.group(1), name, math.prod(dims)
  raise TopologyError(
      f"--topology={name}: unknown TPU slice; known Cloud names: {', '.join(known_topologies())}; "
      f"or the compiler's notation GEN:AxB (v5e, v6e) / GEN:AxBxC (v4, v5p), e.g. v5p:2x2x2")


def topology_devices(gen: str, topology: str) -> list:
  """The compile-only devices of a slice, from libtpu's description of it (no TPU needed)."""
  chip = CHIPS[gen]
  chips = math.prod(int(d) for d in topology.split(":")[1].split("x"))
  # libtpu reads these when it loads; without them it guesses from the host and warns.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{chip.cloud}-{chips * chip.cores_per_chip}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  # Compiling opens no chip: leave libtpu's one-process lock to a run that uses the TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  # v4 and v5p: one device per chip (its two TensorCores as one, as on a Cloud slice).
  extra = {"chip_config_name": "megacore"} if chip.cores_per_chip == 2 else {}
  return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **extra).devices)


# ------------------------------------------------------------------------------------ one program

def is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def _shape_bytes(text: str) -> int:
  sizes = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
           "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
    if dtype in sizes:
      total += sizes[dtype] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """{kind: {count, bytes}} of an optimised HLO module's collectives (per chip; '-start' of an
  async pair counts once; bytes of each result, the gathered side for all-gather)."""
  out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  pattern = re.compile(r"=\s*(.+?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  for line in hlo_text.splitlines():
    m = pattern.search(line)
    if not m:
      continue
    shape, kind, start = m.groups()
    if start and kind in ("all-gather", "collective-permute") and shape.startswith("("):
      shape = re.findall(r"\w+\[[\d,]*\]", shape)[-1]   # (operand, result): the result
    out[kind]["count"] += 1
    out[kind]["bytes"] += _shape_bytes(shape)
  return {k: v for k, v in out.items() if v["count"]}


def _optimised_hlo(lowered) -> tuple[Any, str, str]:
  """(compiled, optimised HLO text, where it came from): as_text() where the compiler gives it,
  else XLA's dump of the module after optimisations (some libtpu versions fail in as_text)."""
  cache = jax.config.jax_enable_compilation_cache
  # A compile-only executable cannot be read back from JAX's persistent cache: keep it out.
  jax.config.update("jax_enable_compilation_cache", False)
  with tempfile.TemporaryDirectory() as dump:
    try:
      compiled = lowered.compile(compiler_options={"xla_dump_to": dump})
    finally:
      jax.config.update("jax_enable_compilation_cache", cache)
    try:
      return compiled, compiled.as_text(), "compiled.as_text()"
    except Exception:  # pylint: disable=broad-except  (the dump below is the fallback)
      files = sorted(glob.glob(os.path.join(dump, "*after_optimizations.txt")))
      text = "".join(open(f).read() for f in files)
      return compiled, text, "XLA dump after optimisations" if files else "unavailable"


def analyse(lower, chip: Chip, batch_per_chip: int, flops_per_chip: float | None = None) -> dict:
  """lower() + compile: memory by kind vs HBM, the compiler's estimate, collectives; an OOM is a
  result. compile_s counts lowering and compiling."""
  start = time.perf_counter()
  try:
    compiled, hlo, hlo_source = _optimised_hlo(lower())
  except Exception as e:  # pylint: disable=broad-except
    if not is_oom(e):
      raise
    return {"fits": False, "compile_s": time.perf_counter() - start,
            "oom": cli.one_line(str(e))[:400]}
  row: dict[str, Any] = {"fits": True, "compile_s": time.perf_counter() - start}
  ma = compiled.memory_analysis()
  memory = {kind: int(getattr(ma, f"{kind}_size_in_bytes")) for kind in
            ("argument", "output", "temp", "generated_code", "alias")}
  memory["total"] = (memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
                     + memory["generated_code"])
  row.update(memory=memory, hbm_bytes=chip.hbm_bytes, margin_bytes=chip.hbm_bytes - memory["total"])
  if row["margin_bytes"] < 0:
    # Seen on v4, v5e and v6e slices: the compile-only target compiles programs larger than the
    # chip's HBM without rematerialising, so the memory analysis decides.
    row.update(fits=False, over_hbm=True)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  seconds = cost.get("optimal_seconds")
  usable = seconds is not None and math.isfinite(seconds) and seconds > 0
  row["estimate_s"] = seconds if usable else None
  row["estimate_note"] = ("compiler's estimate (cost_analysis optimal_seconds)" if usable else
                          f"no usable compiler's estimate (optimal_seconds = {seconds})")
  row["compiled_flops_per_chip"] = cost.get("flops")
  row["bytes_accessed_per_chip"] = cost.get("bytes accessed")
  if usable:
    row["est_clips_per_s_per_chip"] = batch_per_chip / seconds
    if flops_per_chip:
      row["est_mfu"] = flops_per_chip / seconds / (chip.bf16_tflops * 1e12)
  row["collectives"], row["hlo_source"] = collectives(hlo), hlo_source
  return row


# ------------------------------------------------------------------------------------ a variant

def compile_variant(config, gen: str, devices: list, batch_per_chip: int, *,
                    with_eval: bool = True) -> dict:
  """The trainer's train (and eval) step of `config` on `devices`, compiled from abstract shapes."""
  chip = CHIPS[gen]
  batch = batch_per_chip * len(devices)
  try:
    mesh, rules = mesh_lib.make_mesh(config.mesh, devices), mesh_lib.rules(config.mesh)
  except ValueError as e:  # config.mesh's shape or rules do not fit the slice
    raise UserError(f"{e} (on {len(devices)} chips)") from e
  model = models.build(config.model)
  tx = optim.make_optimizer(config.train, STEPS_PER_EPOCH)
  abstract, shardings = state_lib.abstract_state(model, tx, models.clip_spec(config.model), mesh, rules)
  # The trainer's device path pads crop windows for frames at the preparation tools' short side.
  window = (pipeline.device_window(config.data, DecodeSettings().short_side)
            if pipeline.augments_on_device(config.data) else None)

  def batch_of(fields, size):
    return {f.name: jax.ShapeDtypeStruct((size,) + f.shape, jax.numpy.dtype(f.dtype),
                                         sharding=mesh_lib.batch_sharding(mesh, 1 + len(f.shape)))
            for f in fields if f.device}

  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))
  train_batch = batch_of(pipeline.train_fields(config.data, window), batch)
  step = trainer.make_train_step(config, model, tx, shardings, mesh, rules, window)
  m = config.model
  out = {"variant_config": m.name, "arch": m.variant, "frames": m.num_frames, "image_size": m.image_size,
         "dtype": m.dtype, "remat": bool(m.remat), "batch_per_chip": batch_per_chip,
         "global_batch": batch, "chips": len(devices), "mesh": dict(mesh.shape)}
  flops = model_flops(config, batch, window)
  out["model_flops_per_chip"] = flops / len(devices) if flops else None
  out["train"] = analyse(lambda: step.lower(abstract, train_batch, rng), chip, batch_per_chip,
                         out["model_flops_per_chip"])
  if with_eval:
    eval_step = state_lib.make_eval_step(model, shardings, mesh, rules)
    eval_batch = batch_of(pipeline.eval_fields(config.data, 1), batch)
    out["eval"] = analyse(lambda: eval_step.lower(abstract.params, eval_batch), chip, batch_per_chip)
  return out


def model_flops(config, batch: int, window: int | None) -> float | None:
  """The step's FLOPs as the project counts them (benchmarks/benchmark.py): XLA's cost analysis of
  the same train step, remat off, lowered for one CPU device (the TPU lowering has none)."""
  twin = config.copy_and_resolve_references()
  twin.model.remat = False
  twin.mesh.shape.update(data=1, fsdp=1, model=1)
  cpu = jax.devices("cpu")[:1]
  mesh, rules = mesh_lib.make_mesh(twin.mesh, cpu), mesh_lib.rules(twin.mesh)
  model = models.build(twin.model)
  tx = optim.make_optimizer(twin.train, STEPS_PER_EPOCH)
  abstract, shardings = state_lib.abstract_state(model, tx, models.clip_spec(twin.model), mesh, rules)
  batch_in = {f.name: jax.ShapeDtypeStruct((batch,) + f.shape, jax.numpy.dtype(f.dtype))
              for f in pipeline.train_fields(twin.data, window) if f.device}
  step = trainer.make_train_step(twin, model, tx, shardings, mesh, rules, window)
  cost = step.lower(abstract, batch_in, jax.eval_shape(lambda: jax.random.key(0))).cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return cost.get("flops")


# ------------------------------------------------------------------------------------ runs

def sweep(configs: dict, gen: str, devices: list, batches: list[int], remats: tuple[bool, ...],
          log=print) -> dict:
  """Each variant (and remat setting) at each batch per chip, ascending, until the first that does
  not fit (the compiler's OOM, or a memory analysis over the chip's HBM)."""
  rows, summary = [], []
  for name, config in configs.items():
    for remat in remats:
      cfg = config.copy_and_resolve_references()
      cfg.model.remat = remat
      fits = []
      for batch in sorted(batches):
        row = dict(variant=name, **compile_variant(cfg, gen, devices, batch, with_eval=False))
        rows.append(row)
        log(format_row(row, "train"))
        if not row["train"]["fits"]:
          break
        fits.append(batch)
      summary.append({"variant": name, "remat": remat, "largest_fitting_batch_per_chip":
                      max(fits) if fits else None,
                      "first_oom": None if rows[-1]["train"]["fits"] else rows[-1]["batch_per_chip"]})
  return {"rows": rows, "summary": summary}


def _gib(n) -> str:
  return "-" if n is None else f"{n / GiB:.3g}"


VARIANT_WIDTH = 16  # "MSCA-QKV (patch)"
HEADER = (f"{'variant':<{VARIANT_WIDTH}} {'step':<5} {'remat':<5} {'clips/chip':>10} {'fits':<4} "
          f"{'args':>6} {'outs':>6} {'temps':>6} {'code':>5} {'alias':>6} {'total':>6} {'HBM':>6} {'margin':>7} "
          f"{'est. s':>8} {'est. clips/s':>12} {'est. MFU':>8} {'compile s':>9}  collectives")


def format_row(row: dict, step: str) -> str:
  r = row[step]
  verdict = "yes" if r["fits"] else "over" if r.get("over_hbm") else "OOM"
  head = (f"{label(row['variant']):<{VARIANT_WIDTH}} {step:<5} "
          f"{'yes' if row['remat'] else 'no':<5} {row['batch_per_chip']:>10} {verdict:<4} ")
  if verdict == "OOM":  # the compiler refused it: no memory analysis, its message instead
    return head + f"compile {r['compile_s']:.0f} s; {r['oom'][:160]}"
  m = r["memory"]
  coll = ", ".join(f"{k} {v['count']} ({_gib(v['bytes'])} GiB)" for k, v in r["collectives"].items())
  est = r["estimate_s"]
  return head + (f"{_gib(m['argument']):>6} {_gib(m['output']):>6} {_gib(m['temp']):>6} "
                 f"{_gib(m['generated_code']):>5} {_gib(m['alias']):>6} {_gib(m['total']):>6} "
                 f"{_gib(r['hbm_bytes']):>6} {_gib(r['margin_bytes']):>7} "
                 f"{'none' if est is None else format(est, '.4f'):>8} "
                 f"{format(r['est_clips_per_s_per_chip'], '.1f') if est else '-':>12} "
                 f"{format(r['est_mfu'], '.1%') if r.get('est_mfu') else '-':>8} "
                 f"{r['compile_s']:>9.0f}  {coll or 'none'}")


def notes(gen: str, topology: str, devices: list) -> str:
  chip = CHIPS[gen]
  hosts = len({d.process_index for d in devices})
  return (f"{topology}: {len(devices)} chips x {devices[0].device_kind}, {hosts} host(s) of "
          f"{len(devices) // hosts}; HBM {_gib(chip.hbm_bytes)} GiB and bf16 peak "
          f"{chip.bf16_tflops:g} TFLOP/s per chip (docs/tpu_compile.md); memory in GiB per chip; "
          f"est. = the compiler's estimate (cost_analysis optimal_seconds), not a measurement; "
          f"jax {jax.__version__}, libtpu {importlib.metadata.version('libtpu')}")


# ------------------------------------------------------------------------------------ command line

def define_flags() -> None:
  """The command line's flags (defined when run as a program: other tools define --config too)."""
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/msca_kv.py.")
  flags.DEFINE_string("topology", None, "TPU slice: a Cloud name (v5p-8, v5litepod-16, v4-32, "
                      "v6e-64) or the compiler's notation (v5p:2x2x2).")
  flags.DEFINE_list("variants", None, "Config names under configs/ (default: the --config file's).")
  flags.DEFINE_integer("batch_per_chip", 8, "Clips per chip per train step (global batch / chips).")
  flags.DEFINE_list("batch_sweep", [], "Clips per chip to sweep instead, e.g. 8,16,32,64.")
  flags.DEFINE_bool("remat_sweep", False, "In the sweep, try remat off and on.")
  flags.DEFINE_bool("eval", True, "Also compile the eval step (one view per clip; not in sweeps).")
  flags.DEFINE_string("json", "", "Also write the results here.")


FLAGS = flags.FLAGS


def configs_from_flags() -> dict:
  path = config_flags.get_config_filename(FLAGS["config"])
  path, _, arg = path.partition(":") if ":" in os.path.basename(path) else (path, "", "")
  own = os.path.splitext(os.path.basename(path))[0]
  overrides = config_flags.get_override_values(FLAGS["config"])
  out = {}
  for name in FLAGS.variants or [own]:
    if name == own:  # the config as given (it may live outside configs/)
      out[name] = FLAGS.config
      continue
    try:
      config = load_variant(name, arg or None)
    except ValueError as e:
      raise app.UsageError(f"--variants: {e}") from e
    config.update_from_flattened_dict(dict(overrides))
    out[name] = config
  return out


def main(argv) -> None:
  del argv
  if importlib.util.find_spec("libtpu") is None:
    cli.exit_user_error(INSTALL_HINT)
  if FLAGS.config is None or not FLAGS.topology:
    raise app.UsageError("--config and --topology are required, e.g. --config=configs/msca_kv.py "
                         "--topology=v5p-8")
  try:
    batches = [int(b) for b in FLAGS.batch_sweep]
  except ValueError as e:
    raise app.UsageError(f"--batch_sweep: expected clips per chip, e.g. 8,16,32; {e}") from e
  if FLAGS.batch_per_chip < 1 or any(b < 1 for b in batches):
    raise app.UsageError("--batch_per_chip and --batch_sweep: clips per chip must be positive")
  gen, topology, _ = parse_topology(FLAGS.topology)
  configs = configs_from_flags()
  jax.config.update("jax_platforms", "cpu")   # the host's own backend; the slice is compile-only
  devices = topology_devices(gen, topology)
  print(notes(gen, topology, devices), flush=True)
  print(HEADER, flush=True)
  if batches:
    remats = (False, True) if FLAGS.remat_sweep else (bool(next(iter(configs.values())).model.remat),)
    results = sweep(configs, gen, devices, batches, remats)
    for s in results["summary"]:
      print(f"{label(s['variant'])}, remat {'on' if s['remat'] else 'off'}: largest batch per chip "
            f"that fits {s['largest_fitting_batch_per_chip']}"
            + (f" (does not fit at {s['first_oom']})" if s["first_oom"] else
               " (every batch of the sweep fits)"))
  else:
    results = {"rows": []}
    for name, config in configs.items():
      row = dict(variant=name, **compile_variant(config, gen, devices, FLAGS.batch_per_chip,
                                                 with_eval=FLAGS.eval))
      results["rows"].append(row)
      for step in ("train", "eval"):
        if step in row:
          print(format_row(row, step), flush=True)
    base = results["rows"][0]["train"].get("estimate_s")
    for row in results["rows"][1:]:
      if base and row["train"].get("estimate_s"):
        print(f"{label(row['variant'])} / {label(results['rows'][0]['variant'])}: "
              f"{row['train']['estimate_s'] / base:.3f}x by the compiler's estimate")
  chip = {k: v for k, v in dataclasses.asdict(CHIPS[gen]).items() if k != "shapes"}
  results.update(topology=topology, requested=FLAGS.topology, chip=chip,
                 notes=notes(gen, topology, devices))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(results, f, indent=2, default=str)
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, user_errors=(TopologyError,))
