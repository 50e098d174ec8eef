"""tools/visualize: the page and images for every variant, the labels, rollout and the command."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from configs import msca_kv
from msca_jax import cli, models
from msca_jax.data import synthetic, video
from msca_jax.tools import visualize
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "msca_kv.py")


def _variant_config(overrides: dict):
  """The demo config with the SMALL model of one variant: 2 blocks, 4 heads, 4 frames of 32 px."""
  config = msca_kv.get_config("demo")
  config.model.update({k: v for k, v in helpers.small_config(**overrides).items()
                       if k in config.model})
  config.model.num_frames, config.model.num_classes = 4, len(synthetic.CLASSES)
  return config


@pytest.mark.parametrize("variant", [name for name, _ in helpers.ALL_VARIANTS])
def test_page_and_images_are_written_for_every_variant(variant, tmp_path):
  config = _variant_config(dict(helpers.ALL_VARIANTS)[variant])
  clip = helpers.random_clip(batch=1)
  params = helpers.init_params(models.build(config.model), clip)
  view = np.random.default_rng(0).integers(0, 256, (1, 4, 32, 32, 3), dtype=np.uint8)
  with jax.disable_jit():   # sixteen tiny models: eager is quicker than compiling each
    logits, attention = visualize.attention_probabilities(config, params, view)
  assert logits.shape == (1, 8) and attention.shape == (2, 1, 4, 4, 17, 17)
  top = [(0, "move_up", 0.5), (1, "move_down", 0.25)]
  written = visualize.write_visualization(str(tmp_path), view[0], attention[:, 0], config, top,
                                          frame=0, tile=32)
  assert sorted(written.files) == ["attention.npz", "heads.gif", "heads.png", "index.html",
                                   "rollout.gif", "rollout.png"]
  for name in ("heads.png", "rollout.png"):
    assert Image.open(written.files[name]).size[0] > 4 * 32
  for name in ("heads.gif", "rollout.gif"):
    assert Image.open(written.files[name]).n_frames == 4
  page = open(written.files["index.html"], encoding="utf-8").read()
  assert all(f'src="{name}"' in page for name in ("heads.png", "heads.gif", "rollout.png",
                                                   "rollout.gif"))
  assert "move_up" in page and "0.5000" in page
  saved = np.load(written.files["attention.npz"])
  np.testing.assert_array_equal(saved["attention"], attention[:, 0])
  assert 0 < saved["rollout"].sum() < 1     # rows sum to 1 with the CLS tokens, left out here


def test_labels_name_the_frame_a_head_attends_to():
  kv = _variant_config(dict(helpers.ALL_VARIANTS)["msca_kv"]).model
  q, k, v = visualize.source_offsets(kv, 17)
  assert k[:, 0].tolist() == [1] * 17 and k[:, 3].tolist() == [-1] * 17 and not q.any()
  assert (k == v).all()
  label = lambda head, t: visualize.head_label(0, head, k, q, t, 4, "zero")
  assert label(0, 1) == "L0 H0  keys  t+1" and label(3, 1) == "L0 H3  keys  t-1"
  assert label(1, 0) == "L0 H1  keys  t"
  assert label(0, 3) == "L0 H0  keys  0" and label(3, 0) == "L0 H3  keys  0"   # zeros: uniform
  assert visualize.head_label(0, 0, k, q, 3, 4, "circular") == "L0 H0  keys  t+1"
  patch = _variant_config(dict(helpers.ALL_VARIANTS)["msca_qk_patch"]).model
  q, k, _ = visualize.source_offsets(patch, 17)
  assert k[0].tolist() == [0] * 4 and visualize.head_label(1, 2, k, q, 1, 4, "zero") == \
      "L1 H2  keys  mixed"
  # The keys' pixels: head 0 of MSCA-KV at frame 1 is drawn over frame 2, at the last frame grey.
  view = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((4, 32, 32, 3), np.uint8)
  q, k, _ = visualize.source_offsets(kv, 17)
  assert (visualize.key_background(view, 1, 0, k, "zero", 8) == 2).all()
  assert (visualize.key_background(view, 3, 0, k, "zero", 8) == visualize.GREY).all()


def test_rollout_of_the_frame_wise_vit_stays_in_each_frame_and_msca_crosses():
  rng = np.random.default_rng(0)
  attention = rng.random((2, 3, 4, 5, 5))
  attention /= attention.sum(-1, keepdims=True)
  none = np.zeros((5, 4), np.int8)
  matrix = visualize.rollout(attention, none)
  np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
  blocks = matrix.reshape(3, 5, 3, 5)
  assert np.abs(blocks[0, :, 1]).max() == 0 and np.abs(blocks[1, :, 0]).max() == 0
  heads = none.copy()
  heads[:, 0] = 1                                      # head 0 takes values from frame t+1
  crossing = visualize.rollout(attention, heads).reshape(3, 5, 3, 5)
  assert crossing[0, :, 1].min() > 0 and crossing[2, :, 0].max() == 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("visualize")
  config = msca_kv.get_config("demo")
  config.model.depth = 1
  path = str(tmp / "clip.mp4")
  video.write_video(path, helpers.moving_square_video(num_frames=20))
  return {"checkpoint": helpers.saved_random_params(config, tmp / "params")[1], "video": path}


def _cli(argv, capsys):
  argv = ["visualize", f"--config={CONFIG}:demo", "--config.model.depth=1"] + argv
  flag_values = visualize.define_flags(flags.FlagValues(), argv)
  flag_values(argv)
  status = visualize.run(flag_values)
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def test_command_writes_the_page_with_the_top_5(saved, tmp_path, capsys):
  status, out, err = _cli([f"--checkpoint={saved['checkpoint']}", f"--video={saved['video']}",
                           f"--out={tmp_path}/vis", "--view=1", "--tile=48"], capsys)
  assert status == 0, err
  assert out.startswith("top-5: ") and f"wrote {tmp_path}/vis/index.html" in out
  page = (tmp_path / "vis" / "index.html").read_text()
  assert page.count("<tr><td>") == 5 and "MSCA-KV (head axis" in page and "drawn: view 1" in page
  assert Image.open(tmp_path / "vis" / "heads.png").size == (4 * 48 + 3 * 4, 48 + 14)


def test_command_errors_are_one_line(saved, tmp_path, capsys):
  good = [f"--checkpoint={saved['checkpoint']}", f"--video={saved['video']}",
          f"--out={tmp_path}/vis"]
  (tmp_path / "file").write_text("x")
  cases = [
      (good[:1] + [f"--video={tmp_path}/missing.mp4"] + good[2:], "--video"),
      (good + ["--view=2"], "--view 2: the test protocol has 2 views (expected 0..1)"),
      (good + ["--frame=8"], "--frame 8: the clip has 8 frames"),
      (good[:2] + [f"--out={tmp_path}/file"], "exists and is not a directory"),
      ([f"--checkpoint={tmp_path}/none"] + good[1:], f"checkpoint {tmp_path}/none"),
  ]
  for argv, message in cases:
    status, out, err = _cli(argv, capsys)
    assert status == cli.EXIT_USER_ERROR and not out, (argv, out)
    assert err.startswith("visualize: error: ") and message in err and err.count("\n") == 1, err
