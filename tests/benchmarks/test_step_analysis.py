"""Step analysis: FLOPs, device peaks and MFU, memory, HLO kernel counts, attention detection."""

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from msca_jax import models
from benchmarks import step_analysis

# 4 heads of 16 channels: a head dimension cuDNN's fused attention accepts.
MODEL = dict(name="vit", variant="Ti/8", width=64, depth=1, num_heads=4, mlp_dim=128)
FMHA_HLO = """ENTRY %main {
  %custom-call.1 = (bf16[2,4,65,16]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
}
"""


def test_known_peaks():
  assert step_analysis.known_peak("NVIDIA H100 80GB HBM3", "bfloat16")[0] == 989
  peak, what = step_analysis.known_peak("NVIDIA H100 80GB HBM3", "float32")
  assert peak == 494 and "TF32" in what                      # JAX's DEFAULT f32 precision on GPU
  assert step_analysis.known_peak("NVIDIA H100 80GB HBM3", "float32", "highest")[0] == 67
  assert step_analysis.known_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756
  assert step_analysis.known_peak("NVIDIA H200", "bfloat16")[0] == 989
  assert step_analysis.known_peak("NVIDIA A100-SXM4-80GB", "bfloat16")[0] == 312
  assert step_analysis.known_peak("TPU v4", "bfloat16")[0] == 275
  assert step_analysis.known_peak("TPU v5 lite", "bfloat16")[0] == 197
  assert step_analysis.known_peak("TPU v5p", "float32")[0] == 459
  assert step_analysis.known_peak("cpu", "float32") == (None, "unknown peak for device 'cpu'")
  assert step_analysis.known_peak("TPU v4", "float16") == (None, "no known float16 peak for TPU v4")
  assert step_analysis.peak_for("float32", 2.5) == (2.5, "--peak_tflops")
  assert step_analysis.peak_for("float32")[0] is None            # the CPU the tests run on


def test_throughput_and_mfu():
  out = step_analysis.throughput(8, {"median": 0.5}, 1e12, peak=32.0)
  assert out == {"clips_per_s": 16.0, "achieved_tflops": 16.0, "mfu": 0.5}
  assert step_analysis.throughput(8, {"median": 0.5}, 1e12, None, "eval_")["eval_mfu"] is None
  assert step_analysis.throughput(8, None, 1e12, 32.0) == {
      "clips_per_s": None, "achieved_tflops": None, "mfu": None}


def test_flops_and_memory_of_a_compiled_computation():
  a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
  lowered = jax.jit(lambda x, y: x @ y).lower(a, b)
  assert step_analysis.flops(lowered) == pytest.approx(2 * 8 * 16 * 4, rel=0.1)
  memory = step_analysis.compiled_memory(lowered.compile())
  assert memory["argument"] == (8 * 16 + 16 * 4) * 4 and memory["output"] == 8 * 4 * 4
  assert memory["total"] == memory["argument"] + memory["output"] + memory["temp"] - memory["alias"]
  report = step_analysis.memory_report(memory, None)
  assert report["bytes"] == memory["total"] and "memory_analysis" in report["source"]
  assert step_analysis.memory_report(memory, 123)["bytes"] == 123
  assert step_analysis.device_peak_bytes() is None               # CPU reports none


def test_hlo_op_counts_skip_fused_computations():
  hlo = """HloModule m

%fused_computation (p: f32[4,8]) -> f32[8,4] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %t = f32[8,4]{1,0} transpose(f32[4,8]{1,0} %p), dimensions={1,0}
}

ENTRY %main (a: f32[4,8], b: f32[8,4]) -> (f32[8,4], f32[4,4]) {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,4]{1,0} parameter(1)
  %fusion = f32[8,4]{1,0} fusion(f32[4,8]{1,0} %a), kind=kLoop, calls=%fused_computation
  %copy.1 = f32[8,4]{0,1} copy(f32[8,4]{1,0} %fusion)
  %dot = f32[4,4]{1,0} dot(f32[4,8]{1,0} %a, f32[8,4]{1,0} %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple = (f32[8,4]{1,0}, f32[4,4]{1,0}) tuple(f32[8,4]{0,1} %copy.1, f32[4,4]{1,0} %dot)
}
"""
  counts = step_analysis.hlo_op_counts(hlo)
  assert counts == {"parameter": 2, "fusion": 1, "copy": 1, "dot": 1, "tuple": 1}


@pytest.mark.parametrize("impl", models.ATTENTION_IMPLS)
@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
def test_attention_is_cudnn_only_when_the_hlo_calls_it(impl, platform):
  config = dict(MODEL, attention_impl=impl, dtype="bfloat16")
  plain = step_analysis.attention_info(config, "ENTRY %main {\n}\n", platform)
  assert plain["config"] == impl and plain["resolved"] in models.ATTENTION_IMPLS
  assert plain["family"] == "xla" and plain["cudnn_fmha_calls"] == 0
  # Anything but cuDNN runs as XLA ops, under the name of what it resolved to.
  assert plain["kernel"] == ("xla" if plain["resolved"] == "cudnn" else plain["resolved"])
  fused = step_analysis.attention_info(config, FMHA_HLO, platform)
  assert fused["kernel"] == "cudnn fused" and fused["family"] == "cudnn"
  assert fused["cudnn_fmha_calls"] == 1 and fused["cudnn_mentions"] == 1


def test_attention_resolution_and_bad_values():
  gpu_bf16 = step_analysis.attention_info(dict(MODEL, dtype="bfloat16"), None, "gpu")
  assert gpu_bf16["resolved"] == "cudnn" and gpu_bf16["kernel"] == "xla"   # asked, not in the HLO
  assert gpu_bf16["cudnn_mentions"] is None
  assert step_analysis.attention_info(dict(MODEL), None, "tpu")["resolved"] == "xla"
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    step_analysis.attention_info(dict(MODEL, attention_impl="flash"), None, "cpu")


def test_flops_are_counted_without_remat_and_with_xla_attention():
  assert step_analysis.XLA_ATTENTION in models.ATTENTION_IMPLS
  m = ml_collections.ConfigDict(dict(MODEL, dtype="bfloat16", remat=False, attention_impl="auto"))
  cpu = step_analysis.attention_info(m, "", "cpu")
  assert step_analysis.flops_model_config(m, cpu) is None                # counts itself
  for attention, remat in ((step_analysis.attention_info(m, "", "gpu"), False),
                           (step_analysis.attention_info(m, FMHA_HLO, "cpu"), False), (cpu, True)):
    m.remat = remat
    twin = step_analysis.flops_model_config(m, attention)
    assert (twin.remat, twin.attention_impl) == (False, "xla")
    assert twin.width == m.width and m.attention_impl == "auto"          # the original untouched
