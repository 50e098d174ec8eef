"""Weight import: Google .npz layouts, PyTorch checkpoints, the convert_torch CLI, bad files."""

import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from msca_jax import models, pretrained
from tests import helpers, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _template(frames=2, size=32, **overrides):
  model = models.build(helpers.small_config(**overrides))
  clip = jax.ShapeDtypeStruct((1, frames, size, size, 3), np.float32)
  return model, jax.eval_shape(model.init, jax.random.key(0), clip)["params"]


def _write_npz(tmp_path, arrays, name="vit.npz"):
  path = os.fspath(tmp_path / name)
  np.savez(path, **arrays)
  return path


# ----------------------------------------------------------------------------- Google .npz

@pytest.mark.parametrize("style", reference.GOOGLE_STYLES)
def test_google_npz_layouts_load_into_the_model(tmp_path, style):
  state_dict = helpers.reference_state_dict()
  path = _write_npz(tmp_path, reference.to_google_npz(state_dict, num_heads=4, style=style))
  model, template = _template(name="msca", msca_targets="kv", shift_div=4)
  params, report = pretrained.load_vit_npz(path, template, with_report=True)

  # The 21k / 1k head and pre_logits are dropped and the new head starts at zero.
  np.testing.assert_array_equal(nn.unbox(params)["head"]["kernel"], 0.0)
  assert report.zero_initialised == ["head/bias", "head/kernel"]
  assert any(k.startswith("head") for k in report.dropped)
  # Everything else is exactly what the PyTorch route gives from the same weights.
  from_torch = nn.unbox(pretrained.load_torch_state_dict(state_dict, template))
  from_npz = nn.unbox(params)
  from_npz["head"] = from_torch["head"]
  chex.assert_trees_all_equal(from_npz, from_torch)

  # ... and with the state dict's head the logits are the reference's.
  clip = helpers.random_clip(seed=2, batch=2, frames=2)
  want = reference.forward(state_dict, np.asarray(clip, np.float64), num_heads=4, model="msca",
                           shift_div=4, msca_targets="kv")
  np.testing.assert_allclose(model.apply({"params": from_npz}, clip), want, atol=1e-4, rtol=0)


def test_boxed_templates_stay_boxed(tmp_path):
  arrays = reference.to_google_npz(helpers.reference_state_dict(), num_heads=4, style="augreg")
  path = _write_npz(tmp_path, arrays)
  model = helpers.small_model()
  variables = model.init(jax.random.key(0), helpers.random_clip())
  params = pretrained.load_vit_npz(path, variables["params"])
  assert isinstance(params["embedding"]["kernel"], nn.LogicallyPartitioned)
  assert params["embedding"]["kernel"].names == (None, None, None, "embed")
  logits = model.apply({"params": params}, helpers.random_clip())
  np.testing.assert_array_equal(logits, 0.0)  # zero head


def test_scanned_big_vision_layout(tmp_path):
  arrays = reference.to_google_npz(helpers.reference_state_dict(), num_heads=4, style="big_vision")
  blocks = sorted({k.split("/")[2] for k in arrays if k.startswith("params/Transformer/encoderblock_")})
  scanned = {k: v for k, v in arrays.items() if "/encoderblock_" not in k}
  for rest in {k.split("/", 3)[3] for k in arrays if "/encoderblock_0/" in k}:
    scanned[f"params/Transformer/encoderblock/{rest}"] = np.stack(
        [arrays[f"params/Transformer/{b}/{rest}"] for b in blocks])
  _, template = _template()
  chex.assert_trees_all_equal(
      nn.unbox(pretrained.load_vit_npz(_write_npz(tmp_path, scanned, "scan.npz"), template)),
      nn.unbox(pretrained.load_vit_npz(_write_npz(tmp_path, arrays), template)))


def test_position_embedding_is_resampled_for_another_resolution(tmp_path):
  state_dict = helpers.reference_state_dict(grid=(4, 4))
  # A linear ramp over the patch grid stays a linear ramp under linear resampling.
  rows, cols = np.meshgrid(np.arange(4.0), np.arange(4.0), indexing="ij")
  ramp = (rows[..., None] * 1.0 + cols[..., None] * 0.5) * np.ones(64)
  state_dict["transformer.embeddings.position_embeddings"][0, 1:] = ramp.reshape(16, 64)
  path = _write_npz(tmp_path, reference.to_google_npz(state_dict, num_heads=4, style="i21k"))
  _, template = _template(size=48)  # a 6x6 grid
  params, report = pretrained.load_vit_npz(path, template, with_report=True)
  pos = np.asarray(nn.unbox(params)["Transformer"]["posembed_input"]["pos_embedding"])
  assert pos.shape == (1, 37, 64)
  assert report.resized == ["Transformer/posembed_input/pos_embedding (17 -> 37 tokens)"]
  np.testing.assert_array_equal(pos[0, 0], state_dict["transformer.embeddings.position_embeddings"][0, 0])
  r6, c6 = np.meshgrid(np.linspace(0, 3, 6), np.linspace(0, 3, 6), indexing="ij")
  np.testing.assert_allclose(pos[0, 1:, 0], (r6 + 0.5 * c6).reshape(36), atol=1e-5)

  # Non-square grids need the grid spelled out.
  wide = jax.eval_shape(models.build(helpers.small_config()).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 1, 32, 48, 3), np.float32))["params"]
  with pytest.raises(pretrained.WeightsError, match="not a square grid"):
    pretrained.load_vit_npz(path, wide)
  pos = nn.unbox(pretrained.load_vit_npz(path, wide, grid=(4, 6)))["Transformer"]["posembed_input"]
  assert pos["pos_embedding"].shape == (1, 25, 64)


def test_npz_errors_name_the_key_and_shapes(tmp_path):
  arrays = reference.to_google_npz(helpers.reference_state_dict(), num_heads=4, style="augreg")
  _, template = _template()
  key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel"

  missing = dict(arrays)
  del missing[key]
  with pytest.raises(pretrained.WeightsError, match=f"missing parameter '{key}'.*\\(64, 96\\)"):
    pretrained.load_vit_npz(_write_npz(tmp_path, missing, "missing.npz"), template)

  misshaped = dict(arrays, **{key: np.zeros((64, 97), np.float32)})
  with pytest.raises(pretrained.WeightsError,
                     match=f"'{key}' has shape \\(64, 97\\) in the checkpoint, but the model expects \\(64, 96\\)"):
    pretrained.load_vit_npz(_write_npz(tmp_path, misshaped, "misshaped.npz"), template)

  deeper = dict(arrays, **{"Transformer/encoderblock_2/LayerNorm_0/scale": np.ones(64, np.float32)})
  with pytest.raises(pretrained.WeightsError, match="no place in the model.*encoderblock_2"):
    pretrained.load_vit_npz(_write_npz(tmp_path, deeper, "deeper.npz"), template)

  with pytest.raises(FileNotFoundError, match="nowhere.npz"):
    pretrained.load_vit_npz(tmp_path / "nowhere.npz", template)

  (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
  with pytest.raises(pretrained.WeightsError, match="garbage.npz"):
    pretrained.load_vit_npz(tmp_path / "garbage.npz", template)

  pickled = dict(arrays, cls=np.array([{"evil": 1}], dtype=object))
  with pytest.raises(pretrained.WeightsError, match="pickled.npz"):
    pretrained.load_vit_npz(_write_npz(tmp_path, pickled, "pickled.npz"), template)


# ----------------------------------------------------------------------------- PyTorch

def test_torch_state_dict_with_wrappers_and_prefixes():
  torch = pytest.importorskip("torch")
  state_dict = helpers.reference_state_dict()
  _, template = _template()
  plain = nn.unbox(pretrained.load_torch_state_dict(state_dict, template))
  wrapped = {"state_dict": {f"module.base_model.{k}": torch.from_numpy(v) for k, v in state_dict.items()},
             "epoch": 17}
  chex.assert_trees_all_equal(nn.unbox(pretrained.load_torch_state_dict(wrapped, template)), plain)
  base_only = {f"base_model.{k}": torch.from_numpy(v).to(torch.bfloat16) for k, v in state_dict.items()}
  loaded = nn.unbox(pretrained.load_torch_state_dict(base_only, template))
  chex.assert_trees_all_close(loaded, plain, atol=0.05, rtol=0.01)
  assert loaded["cls"].dtype == np.float32


def test_torch_head_can_be_skipped_for_a_new_label_set():
  state_dict = helpers.reference_state_dict()
  _, template = _template(num_classes=3)
  with pytest.raises(pretrained.WeightsError, match="'head/(bias|kernel)' has shape .*load_head=False"):
    pretrained.load_torch_state_dict(state_dict, template)
  params = nn.unbox(pretrained.load_torch_state_dict(state_dict, template, load_head=False))
  np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((64, 3)))


def test_a_head_that_does_not_fit_names_the_option_of_the_entry_point(tmp_path):
  """Python: load_head=False; a run: config.init.load_head=False; convert_torch: --no_head."""
  torch = pytest.importorskip("torch")
  from msca_jax.train import initialise
  state_dict = helpers.reference_state_dict()   # 7 classes
  checkpoint = tmp_path / "msca_kv.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, checkpoint)
  _, template = _template(num_classes=3)
  with pytest.raises(pretrained.WeightsError, match=r"skip the head: load_head=False\)$"):
    pretrained.load(checkpoint, template)
  converted = pretrained.save_params(str(tmp_path / "converted"), nn.unbox(
      pretrained.load(checkpoint, _template()[1])))
  for field, value in (("weights", os.fspath(checkpoint)), ("checkpoint", converted)):
    init = {"weights": "", "vit_npz": "", "checkpoint": "", "load_head": True, field: value}
    with pytest.raises(pretrained.WeightsError, match=r"skip the head: config\.init\.load_head=False\)$"):
      initialise.initial_params(init, template)
  overrides = dict(name="msca", width=64, depth=2, num_heads=4, mlp_dim=96, patch_size=8,
                   num_classes=3, shift_div=4, num_frames=2, image_size=32)
  result = subprocess.run(
      [sys.executable, "-m", "msca_jax.tools.convert_torch", f"--checkpoint={checkpoint}",
       f"--output={tmp_path / 'out'}", f"--config={ROOT}/configs/msca_kv.py"]
      + [f"--config.model.{k}={v}" for k, v in overrides.items()],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert errors[0].endswith("(another label set? skip the head: --no_head)"), errors[0]


def test_torch_unexpected_entry_is_an_error():
  state_dict = dict(helpers.reference_state_dict(), **{"new_fc.weight": np.zeros((3, 64), np.float32)})
  _, template = _template()
  with pytest.raises(pretrained.WeightsError, match="unexpected state dict entry 'new_fc.weight'"):
    pretrained.load_torch_state_dict(state_dict, template)


def test_convert_torch_cli_roundtrip(tmp_path):
  torch = pytest.importorskip("torch")
  from configs import msca_kv
  state_dict = helpers.reference_state_dict()
  checkpoint = tmp_path / "msca_kv.pth"
  torch.save({"state_dict": {f"module.base_model.{k}": torch.from_numpy(v) for k, v in state_dict.items()}},
             checkpoint)
  overrides = dict(name="msca", width=64, depth=2, num_heads=4, mlp_dim=96, patch_size=8,
                   num_classes=7, shift_div=4, num_frames=2, image_size=32)
  output = os.fspath(tmp_path / "converted")
  result = subprocess.run(
      [sys.executable, "-m", "msca_jax.tools.convert_torch", f"--checkpoint={checkpoint}",
       f"--output={output}", f"--config={ROOT}/configs/msca_kv.py"]
      + [f"--config.model.{k}={v}" for k, v in overrides.items()],
      capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"wrote params checkpoint to {output}" in result.stdout
  config = msca_kv.get_config()
  config.model.update(overrides)
  model = models.build(config.model)
  clip = helpers.random_clip(seed=9, batch=2, frames=4)
  template = jax.eval_shape(model.init, jax.random.key(0), clip)["params"]
  params = pretrained.restore_params(output, template)
  want = reference.forward(state_dict, np.asarray(clip, np.float64), num_heads=4, model="msca",
                           shift_div=4, msca_targets="kv")
  np.testing.assert_allclose(model.apply({"params": params}, clip), want, atol=1e-4, rtol=0)
  metadata = pretrained.read_params_metadata(output)
  assert metadata["source"] == os.fspath(checkpoint) and metadata["model"]["msca_targets"] == "kv"


class NotATensor:
  """An arbitrary pickled object, which weights_only loading must refuse."""


def test_convert_torch_refuses_pickled_objects(tmp_path):
  torch = pytest.importorskip("torch")
  from msca_jax.tools import convert_torch

  path = tmp_path / "evil.pth"
  torch.save({"state_dict": {"x": NotATensor()}}, path)
  model_config = ConfigDict(dict(helpers.small_config(), num_frames=1, image_size=32))
  with pytest.raises(pretrained.WeightsError, match="weights_only=True"):
    convert_torch.convert(os.fspath(path), model_config, os.fspath(tmp_path / "out"))
