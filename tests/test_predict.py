"""predict: one video file through the evaluation protocol; the CLI and its errors."""

import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app, flags
from jax.sharding import Mesh

from configs import msca_kv
from msca_jax import cli, inference, models, predict
from msca_jax.data import dmvr, pipeline, sources, synthetic, video
from msca_jax.tools import prepare_videos
from msca_jax.train import checkpoint, evaluate
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "msca_kv.py")


def _config(**data):
  """The demo MSCA-KV with one block: 8 synthetic classes, 8 frames of 32 px."""
  config = msca_kv.get_config("demo")
  config.model.depth = 1
  config.data.update(data)
  return config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A saved depth-1 model and a real mp4."""
  tmp = tmp_path_factory.mktemp("predict")
  config = _config()
  params, checkpoint = helpers.saved_random_params(config, tmp / "params")
  path = str(tmp / "clip.mp4")
  video.write_video(path, helpers.moving_square_video())
  return {"tmp": tmp, "checkpoint": checkpoint, "video": path}


def test_top_k_of_a_saved_checkpoint(setup):
  config = _config()
  params = inference.load_params(config, setup["checkpoint"])
  top = inference.predict(config, params, setup["video"], top_k=5)
  assert len(top) == 5
  probs = [p for _, _, p in top]
  assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  assert all(name == synthetic.CLASSES[i] for i, name, _ in top)
  assert len({i for i, _, _ in top}) == 5

  result = inference.classify(config, params, setup["video"], top_k=50)
  assert len(result.top) == 8                       # k is at most the number of classes
  np.testing.assert_allclose(result.probabilities.sum(), 1.0, rtol=1e-5)
  assert result.view_logits.shape == (2, 8)         # demo test protocol: 2 clips x 1 crop
  assert result.num_frames_decoded == 30
  assert result.protocol.startswith("2 views (2 clips x 1 crop), 8 frames at stride 1")
  # One step of the checkpoint directory loads the same params.
  step = inference.load_params(config, os.path.join(setup["checkpoint"], "0"))
  jax.tree.map(np.testing.assert_array_equal, step, params)


def test_params_from_a_training_workdir(setup, tmp_path):
  """The trainer's checkpoints hold the whole train state; predict takes its params."""
  config = _config()
  params = inference.load_params(config, setup["checkpoint"])
  state = {"step": np.int32(7), "params": params,
           "opt_state": {"mu": jax.tree.map(lambda x: np.ones_like(x), params)}}
  saver = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), save_interval_steps=1,
                                  async_save=False)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  saver.save(7, state, checkpoint.streams_array(pipeline.StreamState(), mesh), {}, force=True)
  saver.close()
  for directory in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "7"):
    loaded = inference.load_params(config, str(directory))
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_prediction_is_the_eval_pipeline_on_the_prepared_video(setup, tmp_path):
  """prepare_videos + eval_dataset + the eval forward give predict()'s probabilities."""
  videos = tmp_path / "videos"
  (videos / "move_up").mkdir(parents=True)
  os.link(setup["video"], videos / "move_up" / "clip.mp4")
  classes = tmp_path / "classes.txt"
  classes.write_text("".join(f"{c}\n" for c in synthetic.CLASSES))
  prepared = str(tmp_path / "frames")
  # Not the defaults, so the test sees whether predict reads them from the manifest.
  prepare_videos.prepare(str(videos), prepared, "validation", classes=str(classes), short_side=40,
                         jpeg_quality=80, workers=0, progress_stream=io.StringIO())
  config = _config(source="frames", path=prepared, stride=2, eval_clips=2, eval_crops=3,
                   eval_short_side=36)
  data = config.data
  params = inference.load_params(config, setup["checkpoint"])

  ds = pipeline.eval_dataset(sources.make_source(data, data.eval_split), data, batch_size=1,
                             num_clips=2, num_crops=3)
  batch = next(pipeline.as_numpy(ds))
  assert batch["mask"].tolist() == [1] and batch["label"].tolist() == [2]
  model = models.build(config.model)
  logits = jax.jit(model.apply)({"params": params}, batch["video"][0])   # (views, C)
  expected = jax.nn.softmax(evaluate.average_views(np.asarray(logits)[None]))[0]

  result = inference.classify(config, params, setup["video"], top_k=3)
  assert (result.decode.short_side, result.decode.jpeg_quality) == (40, 80)
  assert "manifest" in result.decode.origin
  assert result.protocol.startswith("6 views (2 clips x 3 crops), 8 frames at stride 2")
  frames = inference.decode_video(setup["video"], result.decode)
  np.testing.assert_array_equal(inference.eval_views(frames, data), batch["video"][0])
  np.testing.assert_allclose(result.view_logits, logits, atol=1e-5)
  np.testing.assert_allclose(result.probabilities, expected, atol=1e-5)
  assert [name for _, name, _ in result.top] == [synthetic.CLASSES[i] for i in
                                                 np.argsort(-np.asarray(expected))[:3]]
  data_at_10 = _config(source="frames", path=prepared, fps=10).data
  assert "WARNING: the data was prepared at 25 fps but config.data.fps is 10" in \
      inference.decode_settings(data_at_10).origin
  # The check is not vacuous: decoding as prepare_videos' defaults does gives other views.
  default = inference.decode_settings(_config().data, short_side=256, jpeg_quality=90)
  other = inference.eval_views(inference.decode_video(setup["video"], default), data)
  assert np.abs(other.astype(int) - batch["video"][0].astype(int)).max() > 2


def test_class_names_fall_back_to_labels_then_indices(tmp_path):
  config = _config()
  assert inference.class_names(config) == (list(synthetic.CLASSES), "the synthetic dataset")
  missing = _config(source="dmvr", path=str(tmp_path / "nowhere"))
  names, origin = inference.class_names(missing)
  assert names == [f"class {i}" for i in range(8)]
  assert "class indices" in origin and "labels.txt" in origin and "--labels" in origin
  labels = tmp_path / "labels.txt"
  labels.write_text("".join(f"c{i}\n" for i in range(8)))
  assert inference.class_names(missing, str(labels))[0] == [f"c{i}" for i in range(8)]
  assert inference.class_names(missing, str(tmp_path))[0] == [f"c{i}" for i in range(8)]  # a dir
  dmvr.write_labels(str(tmp_path / "three"), ["a", "b", "c"])
  with pytest.raises(inference.InferenceError, match="3 class names, but the model has 8 classes"):
    inference.class_names(config, str(tmp_path / "three"))


def _cli(argv, capsys):
  """Runs the command in this process: (exit status, stdout, stderr)."""
  argv = ["predict", f"--config={CONFIG}:demo", "--config.model.depth=1"] + argv
  flag_values = predict.define_flags(flags.FlagValues(), argv)
  flag_values(argv)
  status = predict.run(flag_values)
  captured = capsys.readouterr()
  return status, captured.out, captured.err


def test_cli_prints_the_protocol_and_the_top_5(setup, tmp_path, capsys):
  labels = tmp_path / "labels.txt"
  labels.write_text("".join(f"label_{i}\n" for i in range(8)))
  status, out, err = _cli([f"--checkpoint={setup['checkpoint']}", f"--video={setup['video']}",
                           f"--labels={labels}"], capsys)
  assert status == 0, err
  assert f"{setup['video']}: 30 frames (1.20 s)" in out
  assert "2 views (2 clips x 1 crop), 8 frames at stride 1" in out and "(test protocol)" in out
  lines = out.splitlines()
  top = lines[lines.index("top-5") + 1:]
  assert len(top) == 5 and all(line.split()[1].startswith("label_") for line in top)
  probs = [float(line.split()[2]) for line in top]
  assert probs == sorted(probs, reverse=True)

  status, out, err = _cli([f"--checkpoint={setup['checkpoint']}", f"--video={setup['video']}",
                           "--views=val", "--top_k=2"], capsys)
  assert status == 0, err
  assert "1 view (1 clip x 1 crop)" in out and "top-2" in out and "move_" in out


def test_cli_errors_are_one_line_and_name_the_input(setup, tmp_path, capsys):
  checkpoint, clip = setup["checkpoint"], setup["video"]
  cases = [
      ([f"--checkpoint={checkpoint}", f"--video={tmp_path}/missing.mp4"],
       f"--video {tmp_path}/missing.mp4: no such file"),
      ([f"--checkpoint={tmp_path}/nowhere", f"--video={clip}"],
       f"checkpoint {tmp_path}/nowhere: no such directory"),
      ([f"--checkpoint={tmp_path}", f"--video={clip}"],
       f"checkpoint {tmp_path}: no finished checkpoint there"),
      # A checkpoint of a one-block model for a two-block config.
      ([f"--checkpoint={checkpoint}", f"--video={clip}", "--config.model.depth=2"],
       "does not fit the model of --config"),
      ([f"--checkpoint={checkpoint}", f"--video={tmp_path}/bad.mp4"], f"{tmp_path}/bad.mp4"),
  ]
  (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
  for argv, message in cases:
    status, out, err = _cli(argv, capsys)
    assert status == cli.EXIT_USER_ERROR and not out, (argv, out)
    assert err.startswith("predict: error: ") and message in err and err.count("\n") == 1, err
  status, _, err = _cli([f"--checkpoint={checkpoint}", f"--video={clip}", "--config.model.depth=2"],
                        capsys)
  assert "missing parameter 'Transformer/encoderblock_1/" in err
  with pytest.raises(app.UsageError, match="--checkpoint and --video are required"):
    _cli([f"--video={clip}"], capsys)


def test_command_line_program(setup):
  result = subprocess.run(
      [sys.executable, "-m", "msca_jax.predict", f"--config={CONFIG}:demo",
       "--config.model.depth=1", f"--checkpoint={setup['checkpoint']}", f"--video={setup['video']}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "top-5" in result.stdout and "move_" in result.stdout


def _read_csv(path):
  import csv
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_many_videos_run_batched_into_one_csv(setup, tmp_path, capsys):
  folder = tmp_path / "videos"
  (folder / "sub").mkdir(parents=True)
  os.link(setup["video"], folder / "a.mp4")
  video.write_video(str(folder / "sub" / "b.mp4"), helpers.moving_square_video(num_frames=12, seed=1))
  (folder / "c.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
  (folder / "notes.txt").write_text("not a video")
  output = tmp_path / "out" / "predictions.csv"
  status, out, err = _cli([f"--checkpoint={setup['checkpoint']}", f"--video={folder}",
                           "--batch_size=2", f"--output={output}", "--top_k=3"], capsys)
  assert status == 0, err
  assert "2 of 3 classified, 1 skipped" in out and f"skipped {folder}/c.mp4" in err
  rows = _read_csv(output)
  assert [r["path"] for r in rows] == [f"{folder}/a.mp4", f"{folder}/c.mp4", f"{folder}/sub/b.mp4"]
  assert rows[1]["status"].startswith(f"{folder}/c.mp4") and rows[1]["label_1"] == ""
  config = _config()
  params = inference.load_params(config, setup["checkpoint"])
  for row in (rows[0], rows[2]):   # batched with others and padded, yet each as predicted alone
    assert row["status"] == "ok"
    alone = inference.classify(config, params, row["path"], top_k=3).top
    assert [row[f"label_{i}"] for i in (1, 2, 3)] == [name for _, name, _ in alone]
    np.testing.assert_allclose([float(row[f"prob_{i}"]) for i in (1, 2, 3)],
                               [p for _, _, p in alone], atol=1e-5)

  # A list file: relative paths, comments; nothing readable is an error.
  listed = tmp_path / "list.txt"
  listed.write_text("# bad ones\nvideos/c.mp4\n\nvideos/missing.mp4\n")
  status, out, err = _cli([f"--checkpoint={setup['checkpoint']}", f"--video={listed}",
                           f"--output={tmp_path}/bad.csv"], capsys)
  assert status == cli.EXIT_USER_ERROR
  assert "none of the 2 videos could be read" in err.splitlines()[-1]
  assert [r["status"] for r in _read_csv(tmp_path / "bad.csv")][1].endswith("no such file")
  (tmp_path / "empty").mkdir()
  status, _, err = _cli([f"--checkpoint={setup['checkpoint']}", f"--video={tmp_path}/empty"], capsys)
  assert status == cli.EXIT_USER_ERROR and "no video files in this folder" in err and err.count("\n") == 1


def test_sliding_windows_over_a_long_video(setup, tmp_path, capsys):
  config = _config()
  params = inference.load_params(config, setup["checkpoint"])
  long_video = str(tmp_path / "long.mp4")
  video.write_video(long_video, helpers.moving_square_video(num_frames=60, seed=2))   # 2.4 s at 25 fps
  decode = inference.decode_settings(config.data)
  frames = inference.decode_video(long_video, decode)
  windows = list(inference.window_frames(long_video, decode, 0.8, 0.4))
  assert [(a, b) for a, b, _ in windows] == [(s / 25, (s + 20) / 25) for s in (0, 10, 20, 30, 40)]
  for start, _, got in windows:   # the streamed frames are the whole video's, cut
    s = round(start * 25)
    assert got == frames[s:s + 20]
  gaps = list(inference.window_frames(long_video, decode, 0.4, 1.0))   # hop longer than the window
  assert [round(a * 25) for a, _, _ in gaps] == [0, 25, 50]
  assert [b for _, b, _ in inference.window_frames(long_video, decode, 10.0, 1.0)] == [2.4]

  output = tmp_path / "win.csv"
  status, out, err = _cli([f"--checkpoint={setup['checkpoint']}", f"--video={long_video}",
                           "--window_seconds=0.8", "--hop_seconds=0.4", f"--output={output}",
                           "--batch_size=2"], capsys)
  assert status == 0, err
  rows = _read_csv(output)
  assert [(r["start_s"], r["end_s"]) for r in rows] == [
      (f"{s / 25:.3f}", f"{(s + 20) / 25:.3f}") for s in (0, 10, 20, 30, 40)]
  for row, (_, _, got) in zip(rows, windows):
    expected = inference.batch_probabilities(config, params,
                                           inference.eval_views(got, config.data)[None])[0]
    assert row["status"] == "ok" and row["label_1"] == synthetic.CLASSES[int(np.argmax(expected))]
    np.testing.assert_allclose(float(row["prob_1"]), expected.max(), atol=1e-5)
  with open(tmp_path / "win.png", "rb") as f:
    assert f.read(4) == b"\x89PNG"
  assert "5 windows of 0.8 s every 0.4 s" in out
  with pytest.raises(app.UsageError, match="--hop_seconds needs --window_seconds"):
    _cli([f"--checkpoint={setup['checkpoint']}", f"--video={long_video}", "--hop_seconds=1"], capsys)
