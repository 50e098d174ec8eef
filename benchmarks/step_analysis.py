"""What a compiled step costs: FLOPs, accelerator peaks and MFU, memory, and what its HLO runs.

benchmarks/benchmark.py times steps and reports these next to the times:

    flops = step_analysis.flops(lowered)                          # XLA's cost analysis
    peak, what = step_analysis.peak_for("bfloat16")               # dense TFLOP/s of this device
    step_analysis.throughput(batch, {"median": 0.25}, flops / batch, peak)   # clips/s, TFLOP/s, MFU
    step_analysis.compiled_memory(compiled)                       # argument/output/temp bytes
    step_analysis.hlo_op_counts(compiled.as_text())               # kernels outside fusions
    step_analysis.attention_info(config.model, compiled.as_text())  # cuDNN fused or XLA
"""

from __future__ import annotations

import collections
import re
from typing import Any

import jax

from msca_jax import models
from msca_jax.models import vit as vit_lib

# Dense peak TFLOP/s by device_kind substring; the first match wins, so specific names come
# first. 'float32' is what JAX's DEFAULT precision runs float32 matmuls at: TF32 tensor cores on
# NVIDIA (Ampere and later), one bfloat16 pass on TPU. 'float32_highest' applies when
# jax_default_matmul_precision asks for true float32.
KNOWN_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0, "float32_highest": 51.0}),
    ("H100 NVL", {"bfloat16": 835.0, "float32": 418.0, "float32_highest": 60.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.0, "float32_highest": 67.0}),
    ("H200", {"bfloat16": 989.0, "float32": 494.0, "float32_highest": 67.0}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0, "float32_highest": 19.5}),
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5e", {"bfloat16": 197.0, "float32": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    ("TPU v6 lite", {"bfloat16": 918.0, "float32": 918.0}),
    ("TPU v6e", {"bfloat16": 918.0, "float32": 918.0}),
)
_HIGHEST = ("highest", "float32", "F32_F32_F32")

# Opcodes reported from the compiled HLO, outside fusions: what a layout change or an unfused
# op costs shows up as extra copies, transposes or kernels.
HLO_OPS = ("fusion", "copy", "transpose", "dot", "convolution", "custom-call", "reduce",
           "all-reduce", "while", "conditional")
CUDNN_FMHA = "__cudnn$fmha"
# The attention_impl that XLA runs as plain ops: FLOPs are counted with it (a custom call has none).
XLA_ATTENTION = "xla"


# ------------------------------------------------------------------------------------ devices

def known_peak(device_kind: str, dtype: str, matmul_precision: str | None = None
               ) -> tuple[float | None, str]:
  """(dense peak TFLOP/s or None, what it is) for a jax device_kind and compute dtype."""
  for key, peaks in KNOWN_PEAKS:
    if key.lower() in device_kind.lower():
      name = dtype
      if dtype == "float32" and matmul_precision in _HIGHEST and "float32_highest" in peaks:
        name = "float32_highest"
      if name not in peaks:
        return None, f"no known {dtype} peak for {device_kind}"
      kind = {"float32": "float32 matmuls at DEFAULT precision ("
                         + ("bf16 pass" if "TPU" in key else "TF32") + ")",
              "float32_highest": "true float32 (no tensor cores)"}.get(name, f"{name} dense")
      return peaks[name], f"{device_kind}, {kind}"
  return None, f"unknown peak for device {device_kind!r}"


def peak_for(dtype: str, peak_tflops: float | None = None,
             device: jax.Device | None = None) -> tuple[float | None, str]:
  """known_peak of `device` (default: the first), unless `peak_tflops` is given."""
  if peak_tflops:
    return float(peak_tflops), "--peak_tflops"
  device = device or jax.devices()[0]
  return known_peak(device.device_kind, dtype, jax.config.jax_default_matmul_precision)


def throughput(batch: int, stats: dict | None, flops_per_clip: float | None, peak: float | None,
               prefix: str = "") -> dict[str, Any]:
  """Clips/s, achieved TFLOP/s and MFU of a step of `batch` clips from its time statistics."""
  out: dict[str, Any] = {f"{prefix}clips_per_s": None, f"{prefix}achieved_tflops": None,
                         f"{prefix}mfu": None}
  if not stats or stats["median"] <= 0:
    return out
  out[f"{prefix}clips_per_s"] = batch / stats["median"]
  if flops_per_clip:
    achieved = flops_per_clip * batch / stats["median"] / 1e12
    out[f"{prefix}achieved_tflops"] = achieved
    out[f"{prefix}mfu"] = achieved / peak if peak else None
  return out


# ------------------------------------------------------------------------------------ memory

def device_peak_bytes(device: jax.Device | None = None) -> int | None:
  """The device's peak_bytes_in_use (process-wide), or None where it reports none (CPU)."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_memory(compiled) -> dict[str, int] | None:
  """Bytes from the compiled executable's memory_analysis, or None when unavailable."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if ma is None:
    return None
  out = {name: int(getattr(ma, f"{name}_size_in_bytes", 0) or 0)
         for name in ("argument", "output", "temp", "alias", "generated_code")}
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def memory_report(compiled: dict[str, int] | None, device_peak: int | None) -> dict[str, Any]:
  """The bytes to report: the device's peak when it has one, else the compiled step's total."""
  total = (compiled or {}).get("total")
  if device_peak is not None:
    return {"bytes": device_peak, "source": "device peak_bytes_in_use (process-wide)",
            "compiled_total": total}
  return {"bytes": total, "source": "compiled memory_analysis "
          "(arguments + outputs + temporaries - aliased)", "compiled_total": total}


# ------------------------------------------------------------------------------------ XLA

def flops(stage) -> float:
  """XLA's FLOP count of a lowered or compiled computation (0 where it has none)."""
  cost = stage.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else {}
  return float(dict(cost or {}).get("flops", 0.0))


def hlo_op_counts(hlo_text: str) -> dict[str, int]:
  """Opcode counts of an HLO module's instructions outside fused computations.

  A fusion is one kernel: the ops inside it (found through the fusions' `calls=`) cost no extra
  memory traffic, so only the instructions of the other computations are counted.
  """
  fused = set(re.findall(r"\sfusion\(.*?calls=%?([\w.\-]+)", hlo_text))
  instruction = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.+?\s([a-z][a-z0-9\-]*)\(")
  header = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)")
  counts: collections.Counter = collections.Counter()
  skip = False
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      m = header.match(line)
      skip = bool(m) and m.group(1) in fused
      continue
    if not skip:
      m = instruction.match(line)
      if m:
        counts[m.group(1)] += 1
  return dict(counts)


def attention_info(model_config, hlo_text: str | None,
                   platform: str | None = None) -> dict[str, Any]:
  """What config.model.attention_impl asks for, resolves to, and what the compiled HLO runs.

  'kernel' is 'cudnn fused' when the HLO calls cuDNN's fused attention; otherwise XLA ops run,
  named by the resolved implementation (any value of models.ATTENTION_IMPLS but 'cudnn'), or
  'xla' when cuDNN was asked for and XLA did not use it. 'family' is 'cudnn' or 'xla'.
  """
  requested = model_config.get("attention_impl") or "auto"
  if requested not in models.ATTENTION_IMPLS:
    raise ValueError(f"config.model.attention_impl: expected one of {models.ATTENTION_IMPLS}, "
                     f"got {requested!r}")
  arch = models.architecture(model_config)
  dtype = models.DTYPES[model_config.get("dtype") or "float32"]
  resolved = vit_lib.attention_implementation(requested, platform or jax.default_backend(), dtype,
                                              arch["width"] // arch["num_heads"])
  # Each fused-attention custom call appears once as an instruction and once in its target name.
  cudnn_calls = len(re.findall(r"custom_call_target=\"__cudnn\$fmha", hlo_text or ""))
  if cudnn_calls:
    kernel = "cudnn fused"
  else:
    kernel = XLA_ATTENTION if resolved == "cudnn" else resolved
  return {"config": requested, "resolved": resolved, "kernel": kernel,
          "family": "cudnn" if cudnn_calls else "xla", "cudnn_fmha_calls": cudnn_calls,
          "cudnn_mentions": hlo_text.count(CUDNN_FMHA) if hlo_text is not None else None}


def flops_model_config(model_config, attention: dict[str, Any]):
  """The model config to count FLOPs with, or None when it is `model_config` itself.

  A cuDNN custom call counts 0 FLOPs and remat adds recomputation, so the model's FLOPs are
  counted on the same step with XLA attention and remat off.
  """
  if not (model_config.get("remat") or attention["resolved"] == "cudnn"
          or attention["family"] == "cudnn"):
    return None
  twin = model_config.copy_and_resolve_references()
  twin.remat, twin.attention_impl = False, XLA_ATTENTION
  return twin
