"""TPU compilation on a CPU host (docs/tpu_compile.md): slice names, the optimised program's
collectives, the message without libtpu, and a small model's train step compiled for a single-host
and a multi-host slice, with an impossible batch reported as an out-of-memory result."""

import dataclasses
import importlib.util

import pytest

from msca_jax import configs
from msca_jax.tools import compile_tpu

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the TPU compiler) is not "
                                  "installed: pip install -e '.[tpu-compile]'")
# tests/train/test_trainer.py's tiny MSCA-KV: two heads, one takes K/V from each neighbour frame.
TINY = {"model.depth": 1, "model.width": 32, "model.num_heads": 2, "model.mlp_dim": 64,
        "model.num_frames": 4, "model.shift_div": 2}


def test_cloud_names_count_tensorcores_and_compiler_names_pass_through():
  assert compile_tpu.parse_topology("v5p-8") == ("v5p", "v5p:2x2x1", 4)
  assert compile_tpu.parse_topology("v5p-128") == ("v5p", "v5p:4x4x4", 64)
  assert compile_tpu.parse_topology("v4-32") == ("v4", "v4:2x2x4", 16)
  assert compile_tpu.parse_topology("v5litepod-16") == ("v5e", "v5e:4x4", 16)
  assert compile_tpu.parse_topology("v6e-64") == ("v6e", "v6e:8x8", 64)
  assert compile_tpu.parse_topology("v5p:2x2x2") == ("v5p", "v5p:2x2x2", 8)
  assert compile_tpu.parse_topology("v5e:2x4") == ("v5e", "v5e:2x4", 8)


@pytest.mark.parametrize("name", ["v9-8", "v5p-6", "v5p-3", "v5e:2x2x2", "v5p:2x2", "tpu"])
def test_an_unknown_slice_lists_the_known_ones(name):
  with pytest.raises(compile_tpu.TopologyError) as error:
    compile_tpu.parse_topology(name)
  message = str(error.value)
  assert message.startswith(f"--topology={name}: unknown TPU slice")
  assert "v5p-128" in message and "v5litepod-16" in message and "v5p:2x2x2" in message


def test_collectives_of_an_optimised_program():
  hlo = """ENTRY %main {
  %all-reduce-start = (f32[1024]{0}, bf16[8,64]{1,0}) all-reduce-start(%a, %b), replica_groups={{0,1}}
  %all-reduce-done = (f32[1024]{0}, bf16[8,64]{1,0}) all-reduce-done(%all-reduce-start)
  %all-gather-start = (f32[16,32]{1,0}, f32[64,32]{1,0}) all-gather-start(%p), dimensions={0}
  %all-gather-done = f32[64,32]{1,0} all-gather-done(%all-gather-start)
  %reduce-scatter.3 = f32[16,32]{1,0} reduce-scatter(%g), dimensions={0}
  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_all_reduce_like
}"""
  assert compile_tpu.collectives(hlo) == {
      "all-reduce": {"count": 1, "bytes": 1024 * 4 + 8 * 64 * 2},
      "all-gather": {"count": 1, "bytes": 64 * 32 * 4},
      "reduce-scatter": {"count": 1, "bytes": 16 * 32 * 4}}


def test_the_optimised_program_comes_from_xla_dump_where_as_text_fails():
  import jax
  import jax.numpy as jnp
  lowered = jax.jit(lambda x: jnp.sin(x) * 2).lower(jnp.ones(4))

  class NoText:  # as libtpu 0.0.52's executables: as_text() fails (RET_CHECK ... async-update)
    def as_text(self):
      raise RuntimeError("RET_CHECK failure")

  class Lowered:
    def compile(self, compiler_options):
      lowered.compile(compiler_options=compiler_options)
      return NoText()

  _, text, source = compile_tpu._optimised_hlo(Lowered())
  assert source == "XLA dump after optimisations"
  assert "ENTRY" in text and "sine" in text


def test_without_libtpu_one_line_says_what_to_install(monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(compile_tpu.importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(SystemExit) as exit_:
    compile_tpu.main([])
  assert exit_.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and "pip install -e '.[tpu-compile]'" in err[0]


def _tiny(**mesh):
  config = configs.get("msca_kv", "demo")
  config.update_from_flattened_dict(TINY)
  config.mesh.shape.update(**mesh)
  return config


@needs_libtpu
def test_a_single_host_slice_compiles_the_train_and_eval_steps_data_parallel():
  gen, topology, chips = compile_tpu.parse_topology("v5e:2x2")
  devices = compile_tpu.topology_devices(gen, topology)
  assert len(devices) == chips == 4 and {d.process_index for d in devices} == {0}
  out = compile_tpu.compile_variant(_tiny(), gen, devices, batch_per_chip=2)
  assert out["mesh"] == {"data": 4, "fsdp": 1, "model": 1} and out["global_batch"] == 8
  for step in ("train", "eval"):
    row = out[step]
    m = row["memory"]
    assert row["fits"] and row["hbm_bytes"] == 16 * 2**30
    assert m["argument"] > 0 and m["output"] > 0 and m["generated_code"] > 0
    assert 0 < m["total"] < 2**30 and row["margin_bytes"] == row["hbm_bytes"] - m["total"]
  train = out["train"]["memory"]
  # The backward pass keeps activations; the state is donated (the new one takes its buffers).
  assert train["temp"] > 0 and 0 < train["alias"] <= train["output"]
  assert "all-reduce" in out["train"]["collectives"]        # the gradients, summed over data
  assert out["model_flops_per_chip"] > 0


@needs_libtpu
def test_a_multi_host_slice_compiles_fsdp_and_an_impossible_batch_is_an_oom_result():
  gen, topology, chips = compile_tpu.parse_topology("v5litepod-16")
  devices = compile_tpu.topology_devices(gen, topology)
  assert len(devices) == chips == 16 and len({d.process_index for d in devices}) == 4
  out = compile_tpu.compile_variant(_tiny(data=4, fsdp=4), gen, devices, batch_per_chip=1,
                                    with_eval=False)
  assert out["mesh"] == {"data": 4, "fsdp": 4, "model": 1} and out["train"]["fits"]
  # fsdp: the weights are gathered for the forward pass, their gradients scattered back.
  assert "all-gather" in out["train"]["collectives"]
  huge = compile_tpu.compile_variant(_tiny(), gen, devices, batch_per_chip=50_000, with_eval=False)
  assert huge["train"]["fits"] is False and "memory" not in huge["train"]
  assert "RESOURCE_EXHAUSTED" in huge["train"]["oom"] or "memory" in huge["train"]["oom"].lower()


@needs_libtpu
def test_a_mesh_axis_that_does_not_tile_the_torus_is_one_line():
  """v5p-128 is a 4x4x4 torus: fsdp=8 is no product of its sides (4, 16 or 64 would be)."""
  from msca_jax.train import mesh as mesh_lib

  gen, topology, _ = compile_tpu.parse_topology("v5p-128")
  devices = compile_tpu.topology_devices(gen, topology)
  with pytest.raises(ValueError, match=r"^config\.mesh\.shape \{'data': 8, 'fsdp': 8, 'model': 1\} "
                                       r"does not fit the 64 devices' physical mesh") as error:
    mesh_lib.make_mesh(_tiny(fsdp=8).mesh, devices)
  assert "\n" not in str(error.value)
  assert mesh_lib.make_mesh(_tiny(fsdp=16).mesh, devices).shape["fsdp"] == 16


@needs_libtpu
def test_a_program_over_the_chips_hbm_does_not_fit_though_the_compiler_took_it(monkeypatch):
  # v4, v5e and v6e compile-only targets compile programs larger than HBM (seen at 32 clips per
  # v5e chip: 16.7 of 16 GiB); the memory analysis is then the verdict, and the sweep stops there.
  gen, topology, _ = compile_tpu.parse_topology("v5e:2x2")
  devices = compile_tpu.topology_devices(gen, topology)
  monkeypatch.setitem(compile_tpu.CHIPS, "v5e",
                      dataclasses.replace(compile_tpu.CHIPS["v5e"], hbm_bytes=2**20))
  results = compile_tpu.sweep({"msca_kv": _tiny()}, gen, devices, [1, 2], (False,), log=lambda _: None)
  (row,) = results["rows"]
  train = row["train"]
  assert train["fits"] is False and train["over_hbm"] and train["margin_bytes"] < 0
  assert train["memory"]["total"] > 2**20
  assert compile_tpu.format_row(row, "train").split()[4] == "over"
  assert results["summary"] == [{"variant": "msca_kv", "remat": False,
                                 "largest_fitting_batch_per_chip": None, "first_oom": 1}]
