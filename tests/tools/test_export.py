"""tools/export: each artifact, reloaded, gives the live model's logits on CPU (1e-4)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from jax import export as jax_export

from configs import msca_kv
from msca_jax import cli, models
from msca_jax.data import augment, pipeline, synthetic
from msca_jax.tools import export
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "msca_kv.py")
# Three crops of a resized short side, so that the resize and every crop position are exercised.
# The artifacts are compared in float32 views: rounding to uint8 turns an ulp of difference at a
# .5 boundary into a whole level, and a level into ~1e-4 of logit (test_preprocessing_is_the_evaluation_pipelines).
OVERRIDES = ["--config.model.depth=1", "--config.data.eval_crops=3",
             "--config.data.eval_short_side=36", "--config.data.dtype=float32"]


def _config(dtype="float32"):
  config = msca_kv.get_config("demo")
  config.model.depth = 1
  config.data.eval_crops, config.data.eval_short_side, config.data.dtype = 3, 36, dtype
  return config


def _cli(argv):
  argv = ["export", f"--config={CONFIG}:demo"] + OVERRIDES + argv
  flag_values = export.define_flags(flags.FlagValues(), argv)
  flag_values(argv)
  return export.run(flag_values)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Random params of the depth-1 demo MSCA-KV, exported by the command in both formats."""
  tmp = tmp_path_factory.mktemp("export")
  config = _config()
  model = models.build(config.model)
  params, checkpoint = helpers.saved_random_params(config, tmp / "params")
  assert _cli([f"--checkpoint={checkpoint}", f"--out={tmp / 'out'}"]) == 0
  return {"config": config, "model": model, "params": params, "out": tmp / "out"}


def _frames(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (8, height, width, 3), dtype=np.uint8)


def _pipeline_views(frames, data):
  """The evaluation pipeline's own views of a clip (lossless PNG frames through augment.py)."""
  encoded = tf.stack([tf.io.encode_png(f) for f in frames])
  views = augment.eval_views(encoded, tf.constant([list(range(len(frames)))]), data.image_size,
                             data.eval_short_side, data.eval_crops)
  return pipeline.to_output(views, data.dtype).numpy()


def _live(exported, views):
  return np.asarray(exported["model"].apply({"params": exported["params"]}, views)).mean(axis=0)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_preprocessing_is_the_evaluation_pipelines(dtype):
  data = _config(dtype).data
  for height, width in ((48, 64), (90, 40), (20, 30)):   # landscape, portrait, upsampled
    frames = _frames(height, width)
    want = _pipeline_views(frames, data)
    got = np.asarray(jax.jit(lambda f: export.eval_crops(f, data))(frames))
    assert got.shape == want.shape == (3, 8, 32, 32, 3) and got.dtype == np.dtype(dtype)
    if dtype == "float32":
      np.testing.assert_allclose(got, want, atol=1e-6)
    else:
      # A pixel within an ulp of a rounding boundary may land one level off.
      diff = np.abs(got.astype(int) - want.astype(int))
      assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (height, width, diff.max())


def test_jax_export_artifact_matches_the_live_model(exported):
  with open(exported["out"] / export.JAX_FILE, "rb") as f:
    artifact = jax_export.deserialize(f.read())
  assert artifact.platforms == ("cpu", "cuda", "tpu")
  data = exported["config"].data
  for height, width in ((48, 64), (90, 40)):   # one artifact, any frame size
    frames = _frames(height, width, seed=height)
    logits = np.asarray(artifact.call(frames))
    assert logits.shape == (8,) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, _live(exported, _pipeline_views(frames, data)), atol=1e-4)


def test_saved_model_matches_the_live_model(exported):
  loaded = tf.saved_model.load(str(exported["out"] / export.TF_DIR))
  frames = _frames(37, 53, seed=3)
  logits = loaded.serve(tf.constant(frames)).numpy()
  by_signature = loaded.signatures["serving_default"](frames=tf.constant(frames))["logits"].numpy()
  np.testing.assert_array_equal(logits, by_signature)
  want = _live(exported, _pipeline_views(frames, exported["config"].data))
  np.testing.assert_allclose(logits, want, atol=1e-4)


def test_contract_file(exported):
  with open(exported["out"] / "export.json", encoding="utf-8") as f:
    contract = json.load(f)
  assert contract["input"]["shape"] == [8, "height", "width", 3]
  assert contract["output"]["shape"] == [8]
  assert contract["preprocessing"]["eval_crops"] == 3
  assert contract["class_names"] == list(synthetic.CLASSES) and contract["platforms"] == ["cpu", "cuda", "tpu"]


def test_user_errors_are_one_line_and_exit_2(exported, tmp_path, capsys):
  checkpoint = str(tmp_path / "nowhere")
  cases = [([f"--checkpoint={checkpoint}", f"--out={tmp_path}/o"], f"checkpoint {checkpoint}"),
           ([f"--checkpoint={checkpoint}", f"--out={tmp_path}/o", "--platforms=cpu,gpu"],
            "--platforms: expected a comma-separated subset of cpu,cuda,tpu, got cpu,gpu"),
           ([f"--checkpoint={checkpoint}", f"--out={tmp_path}/o", "--formats=onnx"], "--formats")]
  for argv, message in cases:
    assert _cli(argv) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("export: error: ") and message in err and err.count("\n") == 1, err
