"""extract_features: the model's pre-head features in shards, resumable, with bad videos skipped."""

import os

import numpy as np
import pytest

from configs import msca_kv
from msca_jax import inference, models
from msca_jax.data import sources, stream, video
from msca_jax.errors import UserError
from msca_jax.tools import extract_features as ef
from tests import helpers

N = 22   # videos of the eval split: shards of 8, 8 and 6


def _config():
  config = msca_kv.get_config("demo")
  m = config.model
  m.width, m.depth, m.mlp_dim = 16, 1, 32
  s = config.data.synthetic
  s.train_size, s.eval_size = 8, N
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """Random params, the model's own logits and features of the split, and one extraction."""
  tmp = tmp_path_factory.mktemp("features")
  mp = pytest.MonkeyPatch()
  mp.setenv("MSCA_JAX_CACHE", str(tmp / "cache"))
  config = _config()
  model = models.build(config.model)
  params = helpers.random_config_params(config)
  source = sources.make_source(config.data, config.data.eval_split)
  batch = next(iter(stream.EvalStream(source, config.data, batch_size=N, num_clips=2, num_crops=1)))
  views = batch.device["video"].reshape((-1,) + batch.device["video"].shape[2:])
  logits, feats = model.apply({"params": params}, views, return_features=True)
  out = str(tmp / "out")
  meta = ef.extract(config, params, out, split=config.data.eval_split, shard_size=8, batch_size=4,
                    report=lambda message: None)
  yield {"tmp": tmp, "config": config, "params": params, "out": out, "meta": meta,
         "logits": np.asarray(logits).reshape(N, 2, -1), "features": np.asarray(feats).reshape(N, 2, 8, 16),
         "labels": batch.device["label"]}
  mp.undo()


def test_features_are_the_models_and_a_linear_probe_gives_its_logits(setup):
  assert setup["meta"]["extracted"] == N and setup["meta"]["shards"] == 3
  frames, rows = ef.load(setup["out"], "frames")
  clips, _ = ef.load(setup["out"], "clips")
  assert frames.shape == (N, 2, 8, 16) and clips.shape == (N, 16)
  assert [int(r["label"]) for r in rows] == setup["labels"].tolist()
  assert [(r["shard"], r["offset"]) for r in rows][7:9] == [("0", "7"), ("1", "0")]
  np.testing.assert_allclose(frames, setup["features"], atol=1e-5)
  np.testing.assert_allclose(clips, setup["features"].mean(axis=(1, 2)), atol=1e-5)

  # Fit on the views (frame-averaged), test on the videos. The weights themselves are not
  # identifiable (the final norm's outputs span fewer than D + 1 directions), the logits are.
  x = np.concatenate([frames.mean(axis=2).reshape(2 * N, 16), np.ones((2 * N, 1))], axis=1)
  w, *_ = np.linalg.lstsq(x, setup["logits"].reshape(2 * N, -1), rcond=None)
  video_logits = setup["logits"].mean(axis=1)
  probe = np.concatenate([clips, np.ones((N, 1))], axis=1) @ w
  np.testing.assert_allclose(probe, video_logits, atol=1e-4)
  assert (probe.argmax(1) == video_logits.argmax(1)).all()


def test_a_rerun_skips_written_shards_and_resumes_the_rest(setup, monkeypatch, tmp_path):
  out = str(tmp_path / "resumed")
  os.makedirs(out)
  for name in os.listdir(setup["out"]):
    if name.startswith("shard-00000") or name == "features.json":
      os.link(os.path.join(setup["out"], name), os.path.join(out, name))
  # A run killed in shard 1 left its arrays but not its .csv.
  os.link(os.path.join(setup["out"], "shard-00001.clips.npy"), os.path.join(out, "shard-00001.clips.npy"))
  calls = []
  features = ef.features
  monkeypatch.setattr(ef, "features", lambda c, p, v: calls.append(len(v)) or features(c, p, v))
  config = setup["config"]
  meta = ef.extract(config, setup["params"], out, split=config.data.eval_split, shard_size=8,
                    batch_size=4, report=lambda message: None)
  assert meta["resumed_at_shard"] == 1 and meta["extracted"] == N
  assert sum(calls) == 4 * 4   # videos 8..21 in batches of 4, the last one padded
  for what in ("clips", "frames"):
    np.testing.assert_array_equal(ef.load(out, what)[0], ef.load(setup["out"], what)[0])
  with open(os.path.join(out, "index.csv")) as f, open(os.path.join(setup["out"], "index.csv")) as g:
    assert f.read() == g.read()
  calls.clear()
  ef.extract(config, setup["params"], out, split=config.data.eval_split, shard_size=8,
             batch_size=4, report=lambda message: None)
  assert not calls    # everything was there
  with pytest.raises(UserError, match="holds features of another extraction .*shard_size"):
    ef.extract(config, setup["params"], out, split=config.data.eval_split, shard_size=4)


def test_files_with_a_bad_one(setup, tmp_path):
  folder = tmp_path / "videos"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name in ("a", "c"):
    video.write_video(str(folder / f"{name}.mp4"),
                      rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8))
  (folder / "b.mp4").write_bytes(b"not a video")
  config = setup["config"]
  reported = []
  out = str(tmp_path / "out")
  meta = ef.extract(config, setup["params"], out, paths=inference.list_videos(str(folder)),
                    shard_size=2, batch_size=2, per_frame=False, report=reported.append)
  assert meta["extracted"] == 2 and sum(meta["skipped"].values()) == 1
  assert len(reported) == 1 and "b.mp4" in reported[0]
  clips, rows = ef.load(out)
  assert [os.path.basename(r["key"]) for r in rows] == ["a.mp4", "c.mp4"]
  assert not os.path.exists(os.path.join(out, "shard-00000.frames.npy"))
  views = inference.eval_views(inference.decode_video(rows[1]["key"], inference.decode_settings(config.data)),
                             config.data)
  np.testing.assert_allclose(clips[1], ef.features(config, setup["params"], views[None])[0].mean((0, 1)),
                             atol=1e-5)


def test_the_principal_components_picture(setup, tmp_path):
  rng = np.random.default_rng(0)
  # Points along one direction plus a little noise: the first axis explains nearly everything.
  x = np.outer(rng.normal(size=50), rng.normal(size=16)) + 0.01 * rng.normal(size=(50, 16))
  coords, explained = ef.principal_components(x)
  assert coords.shape == (50, 2) and explained[0] > 0.99 and explained.sum() <= 1
  np.testing.assert_allclose(coords.mean(axis=0), 0, atol=1e-9)
  total = ((x - x.mean(0)) ** 2).sum()
  np.testing.assert_allclose((coords ** 2).sum(axis=0) / total, explained, rtol=1e-9)

  path = ef.plot_features(setup["out"], str(tmp_path / "features.png"))
  with open(path, "rb") as f:
    assert f.read(4) == b"\x89PNG"
  empty = tmp_path / "two"   # fewer than 3 videos: no picture
  empty.mkdir()
  (empty / "index.csv").write_text(",".join(ef.INDEX_COLUMNS) + "\n")
  assert ef.plot_features(str(empty)) is None
