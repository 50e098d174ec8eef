"""What the trainer refuses or survives at the edges of a run: another model in the workdir, a
workdir in use or not a directory, nothing to evaluate, a zero checkpoint interval, signals.

One tiny in-process run (the demo MSCA-KV shrunk to one block, 4 steps) is shared by the in-process
tests; two short `msca_jax.main` processes cover the signals.
"""

import functools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from absl import flags

from configs import msca_kv, tokenshift, vit
from msca_jax import cli, inference, predict
from msca_jax.errors import UserError
from msca_jax.train import saved_config, trainer
from msca_jax.train import workdir as workdir_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = {
    **helpers.TINY_MODEL,
    "data.synthetic.train_size": 64, "data.synthetic.eval_size": 16,
    "train.batch_size": 16, "eval.batch_size": 16, "train.num_steps": 4,
    "train.checkpoint_every_steps": 2, "train.log_every_steps": 2, "eval.every_epochs": 0,
}


tiny_config = functools.partial(helpers.tiny_config, TINY)  # (module=msca_kv, **overrides)


@pytest.fixture(scope="module", autouse=True)
def synthetic_cache(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MSCA_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A workdir with checkpoints up to step 4 of the tiny MSCA-KV."""
  workdir = str(tmp_path_factory.mktemp("guards") / "msca_kv")
  assert trainer.run(tiny_config(), workdir, "train")["step"] == 4
  return workdir


def _steps(workdir) -> list[int]:
  return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def _one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message, message
  return message


# ------------------------------------------------------------------------------ another model

@pytest.mark.parametrize("module, overrides, expected", [
    (vit, {}, "config.model.name: 'msca' in the checkpoint, 'vit' in the config given"),
    (tokenshift, {}, "config.model.name: 'msca' in the checkpoint, 'tokenshift' in the config given"),
    (msca_kv, {"model.msca_targets": "q"}, "config.model.msca_targets: 'kv' in the checkpoint, 'q'"),
    (msca_kv, {"model.width": 64, "model.depth": 2},
     "config.model.width: 32 in the checkpoint, 64 in the config given; config.model.depth: 1"),
])
def test_resuming_another_model_is_refused_naming_the_fields(trained, module, overrides, expected):
  steps = _steps(trained)
  with pytest.raises(UserError) as refused:
    trainer.run(tiny_config(module, **overrides), trained, "train")
  message = _one_line(refused)
  assert expected in message and f"--config.init.checkpoint={trained}" in message
  assert _steps(trained) == steps and not os.path.exists(os.path.join(trained, "LOCK"))


def test_a_checkpoint_without_a_saved_config_warns_and_still_names_other_shapes(
    trained, tmp_path, caplog, monkeypatch):
  workdir = shutil.copytree(trained, str(tmp_path / "old"))
  # What a checkpoint written before the config was saved reads as (its digests stay valid).
  monkeypatch.setattr(saved_config, "read_model_config", lambda step_directory: None)
  caplog.set_level(logging.WARNING, logger="absl")
  with pytest.raises(UserError) as refused:
    trainer.run(tiny_config(**{"model.width": 64}), workdir, "train")
  message = _one_line(refused)
  assert re.search(r"Transformer/\S+ is \(32,\) in the checkpoint, \(64,\) in the model; "
                   r"Transformer/\S+ is .* \(and \d+ more\)", message), message
  assert "holds no saved config: resuming without checking" in caplog.text

  # What may differ between runs of one model: steps, logging, batch sizes, compute settings.
  result = trainer.run(tiny_config(**{"train.num_steps": 6, "train.log_every_steps": 3,
                                      "eval.batch_size": 8, "model.remat": True}), workdir, "train")
  assert result["step"] == 6 and _steps(workdir)[-1] == 6


def test_predict_refuses_a_checkpoint_of_another_model(trained, tmp_path, capsys):
  video = tmp_path / "clip.mp4"
  video.write_bytes(b"not read: the checkpoint is refused first")
  argv = ["predict", f"--config={ROOT}/configs/vit.py:demo", f"--checkpoint={trained}",
          f"--video={video}", *(f"--config.{k}={v}" for k, v in TINY.items())]
  flag_values = predict.define_flags(flags.FlagValues(), argv)
  flag_values(argv)
  assert predict.run(flag_values) == cli.EXIT_USER_ERROR
  captured = capsys.readouterr()
  assert not captured.out and captured.err.count("\n") == 1, captured.err
  assert captured.err.startswith(f"predict: error: --checkpoint {trained} is another model than "
                                 "--config: config.model.name: 'msca' in the checkpoint, 'vit'")
  with pytest.raises(inference.InferenceError) as refused:
    inference.load_params(tiny_config(vit), trained)
  assert "config.model.name: 'msca' in the checkpoint, 'vit' in the --config" in _one_line(refused)
  with pytest.raises(inference.InferenceError, match="msca_targets: 'kv' in the checkpoint, 'qkv'"):
    inference.load_params(tiny_config(**{"model.msca_targets": "qkv"}), trained)
  # Another frame size is the same model: the position embeddings are resized.
  _, report = inference.load_params(tiny_config(**{"model.image_size": 48}), trained, with_report=True)
  assert report.resized


# ------------------------------------------------------------------------------ start-up errors

def test_a_workdir_in_use_is_refused_naming_the_holder(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(UserError) as refused:
      trainer.run(tiny_config(), str(tmp_path), "train")
  assert f"host {socket.gethostname()}, pid {os.getpid()}" in _one_line(refused)
  assert os.listdir(tmp_path) == []


def test_start_up_errors_are_one_line_naming_the_field_or_file(tmp_path):
  with pytest.raises(UserError, match=r"^config\.train\.checkpoint_every_steps: expected a positive"):
    trainer.run(tiny_config(**{"train.checkpoint_every_steps": 0}), str(tmp_path / "zero"), "train")
  (tmp_path / "file").write_text("")
  with pytest.raises(UserError, match=r"^--workdir \S+/file is a file; expected a directory"):
    trainer.run(tiny_config(), str(tmp_path / "file"), "train")
  with pytest.raises(UserError) as refused:
    trainer.run(tiny_config(), str(tmp_path / "empty"), "evaluate")
  assert _one_line(refused).startswith("nothing to evaluate: ")


# ------------------------------------------------------------------------------ signals

def _start(workdir, log_path, **overrides) -> subprocess.Popen:
  flags = [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-m", "msca_jax.main", f"--config={ROOT}/configs/msca_kv.py:demo",
         f"--workdir={workdir}", "--mode=train", *flags],
        cwd=ROOT, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)


def _wait_for(proc, log_path, ready, timeout: float = 300) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if ready():
      return
    if proc.poll() is not None:
      pytest.fail(f"exited ({proc.returncode}) too early:\n{log_path.read_text()[-4000:]}")
    time.sleep(0.005)
  proc.kill()
  pytest.fail(f"timed out:\n{log_path.read_text()[-4000:]}")


def _finish(proc, timeout: float = 120) -> int:
  try:
    return proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_ctrl_c_twice_saves_once_exits_130_and_a_second_trainer_is_refused(tmp_path):
  workdir, log_path = str(tmp_path / "run"), tmp_path / "run.log"
  proc = _start(workdir, log_path, **{"train.num_steps": 10000})
  try:
    _wait_for(proc, log_path, lambda: os.path.isdir(os.path.join(workdir, "checkpoints", "2")))
    with pytest.raises(UserError) as refused:  # the same workdir while that run trains
      trainer.run(tiny_config(), workdir, "train")
    assert f"pid {proc.pid}, started " in _one_line(refused)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
  finally:
    status = _finish(proc)
  log = log_path.read_text()
  assert status == trainer.EXIT_SIGINT == 130, log[-4000:]
  stopped = re.search(r"stopped by SIGINT at step (\d+); checkpoint saved", log)
  assert stopped and _steps(workdir)[-1] == int(stopped.group(1)), log[-4000:]
  assert "SIGINT: already stopping, waiting for the save" in log
  assert "Traceback" not in log and not os.path.exists(os.path.join(workdir, "LOCK"))


def test_sigterm_twice_during_start_up_exits_143_without_a_traceback(tmp_path):
  workdir, log_path = str(tmp_path / "run"), tmp_path / "run.log"
  proc = _start(workdir, log_path)
  try:
    _wait_for(proc, log_path, lambda: "] model: msca" in log_path.read_text())
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
  finally:
    status = _finish(proc)
  log = log_path.read_text()
  assert status == trainer.EXIT_INTERRUPTED == 143, log[-4000:]
  assert "stopped by SIGTERM during start-up, before step 1 (nothing new to save)" in log
  assert "SIGTERM: already stopping" in log and "Traceback" not in log
  assert _steps(workdir) == [] and not os.path.exists(os.path.join(workdir, "LOCK"))
