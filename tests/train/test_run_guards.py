"""What the trainer refuses or survives at the edges of a run: another model or another optimiser
state in the workdir, a changed accumulation count, a workdir in use or not a directory, nothing to
evaluate, a zero checkpoint interval, signals.

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

import jax
import numpy as np
import optax
import pytest
from absl import flags

from configs import msca_kv, tokenshift, vit
from msca_jax import cli, inference, predict
from msca_jax.errors import UserError
from msca_jax.train import checkpoint as ckpt_lib
from msca_jax.train import optim, saved_config, trainer
from msca_jax.train import state as state_lib
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


# ------------------------------------------------------------------------------ another optimiser

# `trained` is the demo's AdamW (weight decay 1e-4, clipping at 1.0, no layer decay, everything
# trains, no accumulation): each of these changes the optimiser state's structure.
@pytest.mark.parametrize("overrides, expected", [
    ({"train.optimizer": "sgd"}, "config.train.optimizer: 'adamw' in the checkpoint, 'sgd' in the config given"),
    ({"train.trainable": "head"}, "config.train.trainable: 'all' in the checkpoint, 'head' in the config given"),
    ({"train.layer_decay": 0.9}, "config.train.layer_decay: 1.0 in the checkpoint, 0.9 in the config given"),
    ({"train.grad_clip_norm": 0.0}, "config.train.grad_clip_norm: 1.0 in the checkpoint, 0.0 in the config given"),
    # SGD without momentum keeps no trace either: both fields are needed to restore the state.
    ({"train.optimizer": "sgd", "train.momentum": 0.0},
     "config.train.optimizer: 'adamw' in the checkpoint, 'sgd' in the config given; "
     "config.train.momentum: 0.9 in the checkpoint, 0.0 in the config given"),
])
def test_resuming_another_optimiser_state_is_refused_naming_the_fields(trained, overrides, expected):
  steps = _steps(trained)
  with pytest.raises(UserError) as refused:
    trainer.run(tiny_config(**overrides, **{"train.num_steps": 6}), trained, "train")
  message = _one_line(refused)
  assert expected in message and f"--config.init.checkpoint={trained} and another --workdir" in message
  assert _steps(trained) == steps and not os.path.exists(os.path.join(trained, "LOCK"))


def test_main_exits_2_naming_the_optimizer_of_the_checkpoint(trained, tmp_path):
  workdir = shutil.copytree(trained, str(tmp_path / "copy"))
  flags = [f"--config.{k}={v}" for k, v in {**TINY, "train.num_steps": 6}.items()]
  result = subprocess.run(
      [sys.executable, "-m", "msca_jax.main", f"--config={ROOT}/configs/msca_kv.py:demo",
       f"--workdir={workdir}", "--mode=train", *flags, "--config.train.optimizer=sgd"],
      cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False)
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(errors) == 1 and "config.train.optimizer: 'adamw' in the checkpoint, 'sgd'" in errors[0]
  assert "Traceback" not in result.stderr and "partial_restore" not in result.stderr


def test_what_leaves_the_optimiser_state_alone_resumes(trained, tmp_path):
  workdir = shutil.copytree(trained, str(tmp_path / "copy"))
  # AdamW reads no momentum; its weight decay is masked in whatever the rate; another schedule.
  result = trainer.run(tiny_config(**{"train.num_steps": 6, "train.momentum": 0.5,
                                      "train.weight_decay": 1e-3, "train.schedule": "step",
                                      "train.lr_decay_epochs": (2,)}), workdir, "train")
  assert result["step"] == 6


def _restore(config, workdir, step):
  """(the state a run of `config` resumes from at `step`, as the trainer converts it; the state
  restored as it was saved, under the checkpoint's own config)."""
  exp = trainer.build(config, workdir, train=True)
  abstract, _ = state_lib.abstract_state(exp.model, exp.tx, exp.clip, exp.mesh, exp.rules)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_interval_steps=1)
  try:
    resumed, _ = trainer._resume(exp, checkpointer, abstract, step)
    saved_train = saved_config.read_train_config(os.path.join(checkpointer.directory, str(step)))
    saved_exp = trainer.build(tiny_config(**{"train.grad_accum_steps": saved_train["grad_accum_steps"]}),
                              workdir, train=True)
    saved_abstract, _ = state_lib.abstract_state(saved_exp.model, saved_exp.tx, saved_exp.clip,
                                                 saved_exp.mesh, saved_exp.rules)
    saved, _, _ = checkpointer.restore(step, saved_abstract, exp.mesh)
  finally:
    checkpointer.close()
  return jax.device_get(resumed.opt_state), jax.device_get(saved.opt_state)


def _adam(opt_state) -> optax.ScaleByAdamState:
  found = [s for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


def _assert_same_tree(got, want) -> None:
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_the_accumulation_count_may_change_on_resume(trained, tmp_path):
  """k = 1 -> 2 -> 1, and 3 -> 4 in the middle of an update; 3 -> 2 there is refused."""
  workdir = shutil.copytree(trained, str(tmp_path / "copy"))
  k = lambda count, steps, **o: tiny_config(**{"train.grad_accum_steps": count,
                                               "train.num_steps": steps, **o})
  # 4 updates of 1 micro-batch are 2 of 2: the schedule's count says so, Adam's moments carry over.
  resumed, saved = _restore(k(2, 8), workdir, 4)
  assert isinstance(resumed, optax.MultiStepsState) and int(resumed.mini_step) == 0
  assert int(optim.update_count(resumed)) == 2 and int(optim.update_count(saved)) == 4
  adam, saved_adam = _adam(resumed), _adam(saved)
  assert int(adam.count) == int(saved_adam.count) == 4
  _assert_same_tree((adam.mu, adam.nu), (saved_adam.mu, saved_adam.nu))
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(resumed.acc_grads))

  assert trainer.run(k(2, 8), workdir, "train")["step"] == 8   # 2 more updates of 2
  resumed, _ = _restore(k(1, 10), workdir, 8)
  assert not isinstance(resumed, optax.MultiStepsState)
  assert int(optim.update_count(resumed)) == 8 and int(_adam(resumed).count) == 6
  assert trainer.run(k(1, 10), workdir, "train")["step"] == 10

  # In the middle of an update: 2 micro-batches of 3 at step 12 (count 10 * 1 / 3 -> 3, no update yet).
  assert trainer.run(k(3, 12), workdir, "train")["step"] == 12
  with pytest.raises(UserError) as refused:
    trainer.run(k(2, 14), workdir, "train")
  message = _one_line(refused)
  assert ("config.train.grad_accum_steps: 3 in the checkpoint (step 12), 2 in the config given: the "
          "checkpoint holds 2 micro-batch(es) of an unfinished update, which an update of 2 cannot "
          "complete; rerun with a count above 2") in message, message
  resumed, saved = _restore(k(4, 14), workdir, 12)
  assert int(resumed.mini_step) == int(saved.mini_step) == 2 and int(optim.update_count(resumed)) == 2
  _assert_same_tree((resumed.acc_grads, _adam(resumed)), (saved.acc_grads, _adam(saved)))
  assert trainer.run(k(4, 14), workdir, "train")["step"] == 14   # the update of 4 ends at step 14
  resumed, _ = _restore(k(4, 14), workdir, 14)
  assert int(resumed.mini_step) == 0 and int(optim.update_count(resumed)) == 3


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
