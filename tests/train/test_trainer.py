"""The trainer end to end on CPU with 8 fake devices: train, evaluate, resume, stop and fail.

Every run is the demo MSCA-KV shrunk to one block (width 32, 2 heads, 4 frames of 32 px) for 30
steps of 16 clips on a 128 + 32 video synthetic set. The reference run (`run_a`: 8-way data
parallel, in process, train_and_evaluate) happens once per session, even across pytest-xdist
workers; the other runs are compared with its final parameters.
"""

import fcntl
import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
from flax import traverse_util

from msca_jax import pretrained
from msca_jax.train import checkpoint as ckpt_lib
from msca_jax.train import initialise
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import state as state_lib
from msca_jax.tools.compare import read_metrics
from msca_jax.train import trainer
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "msca_kv.py")
NUM_STEPS = 30
CHECKPOINT_EVERY = 5
BATCH = 16
EVAL_SIZE = 32
# Overrides of configs/msca_kv.py:demo, in process (config.update_from_flattened_dict) and on the
# command line (--config.KEY=VALUE) alike.
TINY = {
    **helpers.TINY_MODEL,
    "data.synthetic.train_size": 128, "data.synthetic.eval_size": EVAL_SIZE,
    "train.batch_size": BATCH, "eval.batch_size": 16, "train.num_steps": NUM_STEPS,
    "train.checkpoint_every_steps": CHECKPOINT_EVERY, "train.log_every_steps": 2,
    "eval.every_epochs": 2,  # 8 steps per epoch: validation at step 16
}
# A learning rate that overflows the parameters in one AdamW step: the loss of step 2 is NaN.
NONFINITE = {"train.base_lr": 1e30, "train.warmup_epochs": 0}


tiny_config = functools.partial(helpers.tiny_config, TINY)


def _flags(overrides) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def shared_root(tmp_path_factory):
  """A directory of this session that every xdist worker sees (their basetemps' parent)."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trainer_shared"
  root.mkdir(exist_ok=True)
  return root


@pytest.fixture(scope="module", autouse=True)
def synthetic_cache(shared_root):
  """$MSCA_JAX_CACHE for in-process runs and subprocesses: the synthetic set is written once."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MSCA_JAX_CACHE", str(shared_root / "cache"))
    yield


def _once(root, name: str, compute):
  """(workdir, compute(workdir)) with compute run once per session, whichever worker asks first."""
  workdir, done = root / name, root / f"{name}.json"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # a worker that failed half-way
      done.write_text(json.dumps(compute(str(workdir)), default=float))
  return str(workdir), json.loads(done.read_text())


@pytest.fixture(scope="module")
def run_a(shared_root):
  """The reference: 30 steps in process on a data=8 mesh, then the test protocol."""
  return _once(shared_root, "run_a",
               lambda workdir: trainer.run(tiny_config(), workdir, "train_and_evaluate"))


# ------------------------------------------------------------------------------------ helpers

def _finished_steps(workdir) -> list[int]:
  """Checkpoint steps orbax has finished (a save in progress is N.orbax-checkpoint-tmp)."""
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []
  return sorted(int(name) for name in names if name.isdigit())


def _params(directory) -> dict[str, np.ndarray]:
  return initialise.read_checkpoint_params(str(directory))


def _assert_same_params(workdir, reference_workdir) -> None:
  """A resumed run must do what the uninterrupted one did: the same steps on the same batches.

  Bitwise when both processes run the same compiled step; XLA:CPU compiling it afresh under load
  in another process has been seen to reorder a reduction (differences of 1e-9 in a fresh CI
  checkout), so the parameters are held to 1e-6, far below what one step of difference moves.

  The keys' biases are left out: adding b to every key adds q.b to every logit of a query's row,
  which softmax ignores, so their gradient is zero in exact arithmetic and what AdamW makes of its
  rounding noise (about lr * g / eps per step) follows the order of a reduction, not the run.
  """
  got, want = _params(workdir), _params(reference_workdir)
  assert sorted(got) == sorted(want)
  for name in want:
    if name.endswith("/key/bias"):
      continue
    np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=name)


def _copy(workdir, tmp_path) -> str:
  """A private copy of a shared workdir, for tests that write into it."""
  return shutil.copytree(workdir, str(tmp_path / "copy"))


def _command(workdir, *extra) -> list[str]:
  return [sys.executable, "-m", "msca_jax.main", f"--config={CONFIG}:demo", f"--workdir={workdir}",
          *_flags(TINY), *extra]


def _start(workdir, log_path, *extra) -> subprocess.Popen:
  """python -m msca_jax.main in the background; the environment carries XLA_FLAGS (8 devices),
  the compilation cache and MSCA_JAX_CACHE."""
  with open(log_path, "w") as log:
    return subprocess.Popen(_command(workdir, *extra), cwd=ROOT, env=dict(os.environ), stdout=log,
                            stderr=subprocess.STDOUT)


def _tail(log_path, lines: int = 40) -> str:
  with open(log_path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def _run_main(workdir, log_path, *extra, timeout: float = 300) -> int:
  proc = _start(workdir, log_path, *extra)
  try:
    return proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _wait_for_checkpoint(proc, workdir, log_path, min_step: int, timeout: float = 300) -> int:
  """Polls until a finished checkpoint of step >= min_step exists; returns its step."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [s for s in _finished_steps(workdir) if s >= min_step]
    if steps:
      return steps[0]
    if proc.poll() is not None:
      pytest.fail(f"main exited ({proc.returncode}) before checkpoint {min_step}:\n{_tail(log_path)}")
    time.sleep(0.01)
  proc.kill()
  proc.wait()
  pytest.fail(f"no checkpoint >= {min_step} after {timeout} s:\n{_tail(log_path)}")


def _test_lines(workdir) -> list[dict]:
  """The test metrics of each step that has them (read_metrics merges a step's lines)."""
  return [{"step": m["step"], **{k: v for k, v in m.items() if k.startswith("test/")}}
          for m in read_metrics(workdir) if any(k.startswith("test/") for k in m)]


def _raw_lines(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------ 1. a run

def test_train_and_evaluate_writes_a_complete_workdir(run_a):
  workdir, result = run_a
  assert result["step"] == NUM_STEPS and not result["interrupted"]
  assert result["test"]["test/num_videos"] == EVAL_SIZE
  assert 0 <= result["test"]["test/top1"] <= result["test"]["test/top5"] <= 1
  assert result["val"]["val/num_videos"] == EVAL_SIZE
  assert np.isfinite(result["train"]["loss"])

  # Checkpoints: the final step and the two before it (max_checkpoints 3); no unfinished save.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "25", "30"]

  # metrics.jsonl: a train line every log_every_steps, validation at 16, the test at the end.
  lines = read_metrics(workdir)
  train = {m["step"]: m for m in lines if "train/loss" in m}
  assert set(range(2, NUM_STEPS + 1, 2)) <= set(train)
  assert all(np.isfinite(m["train/loss"]) and m["train/lr"] >= 0 for m in train.values())
  assert train[NUM_STEPS]["epoch"] == NUM_STEPS / 8
  val = [m for m in lines if "val/top1" in m]
  assert [m["step"] for m in val] == [16] and val[0]["val/num_videos"] == EVAL_SIZE
  tests = _test_lines(workdir)
  assert len(tests) == 1 and tests[0] == {"step": NUM_STEPS, **result["test"]}

  # TensorBoard: one event file with the same scalars.
  events = tf.io.gfile.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert len(events) == 1
  tags = {value.tag for event in tf.compat.v1.train.summary_iterator(events[0])
          for value in event.summary.value}
  assert {"train/loss", "train/lr", "val/top1", "test/top1", "test/num_videos"} <= tags

  # The reports of the validation and the test evaluation.
  for name, step, views in [("val", 16, 1), ("test", NUM_STEPS, 2)]:
    directory = os.path.join(workdir, "eval", f"{name}_step{step}")
    with open(os.path.join(directory, "validation_metrics.json")) as f:
      report = json.load(f)
    assert report["num_videos"] == EVAL_SIZE and report["protocol"]["step"] == step
    assert report["protocol"]["num_clips"] * report["protocol"]["num_crops"] == views
    with open(os.path.join(directory, "validation_predictions.csv")) as f:
      rows = f.read().strip().splitlines()
    assert rows[0].startswith("key,label") and len(rows) == 1 + EVAL_SIZE
    assert len({row.split(",")[0] for row in rows[1:]}) == EVAL_SIZE  # every video once
  assert report["metrics"]["top1"] == result["test"]["test/top1"]


def test_validation_does_not_change_training(run_a, tmp_path):
  # run_a validates at step 16; without it the same 30 steps must give the same parameters (no
  # random numbers, batches or state taken from training by the evaluation).
  trainer.run(tiny_config(**{"eval.every_epochs": 0}), str(tmp_path), "train")
  assert not os.path.exists(os.path.join(tmp_path, "eval"))
  _assert_same_params(tmp_path, run_a[0])


# ------------------------------------------------------------------------------------ 2. meshes

@pytest.mark.parametrize("shape", [
    pytest.param(None, id="one_device"),
    pytest.param(dict(data=2, fsdp=2, model=2), id="data2_fsdp2_model2"),
])
def test_sharded_runs_match_the_data_parallel_run(shape, tmp_path, monkeypatch, request):
  # The whole trainer on one device and on a mesh using every axis; test_state.py covers each
  # mesh axis alone at the step level.
  config = tiny_config()
  if shape is None:  # make_mesh takes every device; give it one
    make_mesh = mesh_lib.make_mesh
    monkeypatch.setattr(mesh_lib, "make_mesh",
                        lambda cfg, devices=None: make_mesh(cfg, jax.devices()[:1]))
    shape = dict(data=1, fsdp=1, model=1)
  config.mesh.shape.update(shape)
  exp = trainer.build(config, str(tmp_path), train=True)
  assert dict(exp.mesh.shape) == shape
  result = trainer.train(exp, evaluate_at_end=False)
  assert result["step"] == NUM_STEPS

  # Only now: while another worker computes the reference, this one trains.
  # Within tolerance, not bitwise: another mesh sums in another order (see helpers).
  helpers.assert_trained_params_close(_params(tmp_path), _params(request.getfixturevalue("run_a")[0]))


# ------------------------------------------------------------------------------------ 3. SIGKILL, SIGTERM

def test_sigkill_sigterm_and_the_same_command_finish_bitwise_identical(tmp_path, request, caplog):
  """One run killed (SIGKILL), resumed by the same command, preempted (SIGTERM), resumed again:
  it ends with the uninterrupted run's parameters and test metrics. (One run for both signals:
  CI time.)"""
  workdir = str(tmp_path / "run")
  # 1. SIGKILL after the first checkpoint: nothing is saved on the way out.
  proc = _start(workdir, tmp_path / "killed.log")
  try:
    _wait_for_checkpoint(proc, workdir, tmp_path / "killed.log", CHECKPOINT_EVERY)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resume_step = max(_finished_steps(workdir))
  assert CHECKPOINT_EVERY <= resume_step < NUM_STEPS, \
      f"the kill landed after the run finished (checkpoints {_finished_steps(workdir)})"

  # 2. The same command resumes there; SIGTERM once it has saved a later step: it saves where it
  # stands and exits 143.
  log_path = tmp_path / "stopped.log"
  proc = _start(workdir, log_path)
  try:
    _wait_for_checkpoint(proc, workdir, log_path, resume_step + 1)
    proc.send_signal(signal.SIGTERM)
    returncode = proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  log = _tail(log_path, 400)
  assert re.search(rf"resumed from \S+ at step {resume_step} \(stream position "
                   rf"{resume_step * BATCH}\)", log), log[-3000:]
  assert returncode == trainer.EXIT_INTERRUPTED == 143, log[-3000:]
  match = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", log)
  assert match, log[-3000:]
  stop_step = int(match.group(1))
  assert resume_step < stop_step < NUM_STEPS and max(_finished_steps(workdir)) == stop_step
  assert not _test_lines(workdir)  # stopped: no evaluation

  # 3. The rerun (here in process) continues the stream where the stop left it and evaluates.
  caplog.set_level(logging.INFO, logger="absl")
  result = trainer.run(tiny_config(), workdir, "train_and_evaluate")
  assert result["step"] == NUM_STEPS and not result["interrupted"]
  assert f"at step {stop_step} (stream position {stop_step * BATCH})" in caplog.text
  a_workdir, a = request.getfixturevalue("run_a")
  _assert_same_params(workdir, a_workdir)
  assert _test_lines(workdir)[-1] == {"step": NUM_STEPS, **a["test"]}


# ------------------------------------------------------------------------------------ 5. a kill during a save

def test_a_save_cut_short_is_ignored_and_redone(run_a, tmp_path):
  workdir = _copy(run_a[0], tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  # What a kill in the middle of saving step 30 leaves: orbax's temporary directory, partly written.
  tmp = os.path.join(checkpoints, f"{NUM_STEPS}.orbax-checkpoint-tmp")
  os.rename(os.path.join(checkpoints, str(NUM_STEPS)), tmp)
  for dirpath, _, filenames in os.walk(tmp):
    for name in filenames:
      path = os.path.join(dirpath, name)
      if name in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        os.remove(path)
      else:
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
  assert _finished_steps(workdir) == [20, 25]
  # Readers (evaluation, config.init) take the last finished step.
  assert initialise.step_dir(workdir) == os.path.join(checkpoints, "25")
  _assert_same_params(workdir, os.path.join(run_a[0], "checkpoints", "25"))

  result = trainer.run(tiny_config(), workdir, "train")
  assert result["step"] == NUM_STEPS
  assert sorted(os.listdir(checkpoints)) == ["20", "25", "30"]  # the tmp directory is gone
  _assert_same_params(workdir, run_a[0])


# ------------------------------------------------------------------------------------ 6. NaN

def test_a_nonfinite_loss_stops_before_saving_it(tmp_path):
  config = tiny_config(**NONFINITE)
  with pytest.raises(trainer.NonFiniteLossError) as error:
    trainer.run(config, str(tmp_path), "train_and_evaluate")
  message = str(error.value)
  match = re.search(r"became (\S+) at step (\d+); .*the last good checkpoint is step (\d+) in (\S+)\)",
                    message)
  assert match, message
  bad_step, good_step = int(match.group(2)), int(match.group(3))
  assert match.group(4) == str(tmp_path / "checkpoints")
  assert "config.train.base_lr" in message
  # float32 already: no advice to use it (docs/training.md#checkpoints-and-resume).
  assert "config.model.dtype" not in message and message.endswith(
      "Lower config.train.base_lr (now 1e+30), lower config.train.grad_clip_norm (now 1) or warm up "
      "(config.train.warmup_epochs=1)."), message
  assert good_step < bad_step and max(_finished_steps(tmp_path)) == good_step

  # The checkpoint is whole: as initial weights, and as the trainer resumes it.
  params = _params(tmp_path)
  assert all(np.isfinite(p).all() for p in params.values())
  exp = trainer.build(config, str(tmp_path), train=True)
  abstract, _ = state_lib.abstract_state(exp.model, exp.tx, exp.clip, exp.mesh, exp.rules)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"),
                                       save_interval_steps=CHECKPOINT_EVERY)
  try:
    state, streams, metadata = checkpointer.restore(good_step, abstract, exp.mesh)
  finally:
    checkpointer.close()
  assert int(state.step) == good_step and streams[0].position == good_step * BATCH
  assert metadata["total_steps"] == NUM_STEPS
  flat = {"/".join(k): np.asarray(v)
          for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items()}
  for name in params:
    np.testing.assert_array_equal(flat[name], params[name])


def test_the_nonfinite_advice_is_what_the_config_has_not_tried():
  config = tiny_config(**{"model.dtype": "bfloat16", "train.grad_clip_norm": 0.0,
                          "train.warmup_epochs": 1})
  assert trainer.nonfinite_advice(config) == (
      "lower config.train.base_lr (now 0.001), clip the gradients (config.train.grad_clip_norm=1.0) "
      "or compute in float32 (config.model.dtype='float32', now 'bfloat16')")
  assert trainer.nonfinite_advice(tiny_config(**{"train.warmup_epochs": 1})) == (
      "lower config.train.base_lr (now 0.001) or lower config.train.grad_clip_norm (now 1)")


def test_main_exits_3_on_a_nonfinite_loss(tmp_path):
  log_path = tmp_path / "main.log"
  returncode = _run_main(str(tmp_path / "run"), log_path, "--mode=train", *_flags(NONFINITE))
  assert returncode == 3, _tail(log_path)
  assert re.search(r"became \S+ at step \d+; .*the last good checkpoint is step \d+",
                   _tail(log_path)), _tail(log_path)


# ------------------------------------------------------------------------------------ 7. evaluate, init

def test_a_signal_stops_evaluate_mode_with_nothing_written(run_a, tmp_path, monkeypatch, caplog):
  workdir = _copy(run_a[0], tmp_path)
  shutil.rmtree(os.path.join(workdir, "eval"))
  evaluation = trainer.run_evaluation

  def preempted(*args, **kwargs):   # SIGTERM arrives as the pass starts
    os.kill(os.getpid(), signal.SIGTERM)
    return evaluation(*args, **kwargs)

  monkeypatch.setattr(trainer, "run_evaluation", preempted)
  handler = signal.getsignal(signal.SIGTERM)
  with caplog.at_level(logging.INFO, logger="absl"):
    result = trainer.run(tiny_config(), workdir, "evaluate")
  assert result["interrupted"] and result["exit_status"] == 143 and result["test"] == {}
  assert not os.path.exists(os.path.join(workdir, "eval"))
  assert "stopped by SIGTERM during the evaluation: nothing written" in caplog.text
  assert signal.getsignal(signal.SIGTERM) is handler   # the process's own handler is back


def test_evaluate_mode_gives_the_test_metrics_of_the_run(run_a, tmp_path):
  workdir = _copy(run_a[0], tmp_path)
  shutil.rmtree(os.path.join(workdir, "eval"))
  result = trainer.run(tiny_config(), workdir, "evaluate")
  assert result == {"step": NUM_STEPS, "test": run_a[1]["test"], "interrupted": False, "exit_status": 0}
  with open(os.path.join(workdir, "eval", f"test_step{NUM_STEPS}", "validation_metrics.json")) as f:
    report = json.load(f)
  assert report["num_videos"] == EVAL_SIZE and report["protocol"]["step"] == NUM_STEPS
  assert _test_lines(workdir)[-1] == {"step": NUM_STEPS, **run_a[1]["test"]}


@pytest.mark.parametrize("load_head", [True, False])
def test_init_from_a_training_workdir(load_head, run_a, tmp_path, caplog):
  config = tiny_config()
  config.init.checkpoint, config.init.load_head = run_a[0], load_head
  exp = trainer.build(config, str(tmp_path), train=True)
  _, shardings = state_lib.abstract_state(exp.model, exp.tx, exp.clip, exp.mesh, exp.rules)
  caplog.set_level(logging.INFO, logger="absl")
  state = trainer._initial_state(exp, shardings)

  assert int(state.step) == 0
  assert all(jax.tree.leaves(jax.tree.map(lambda x, s: x.sharding == s, state.params,
                                          shardings.params)))
  got = {"/".join(k): np.asarray(v)
         for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items()}
  want = _params(run_a[0])
  assert sorted(got) == sorted(want)
  head = sorted(k for k in want if k.startswith(pretrained.HEAD + "/"))
  assert head == ["head/bias", "head/kernel"]
  for name in want:
    if name in head and not load_head:
      assert not got[name].any(), name
      assert want[name].any(), name  # (the trained head is not zero)
    else:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)

  # The report, in the log.
  assert f"init: weights from {run_a[0]}: {len(want) - (0 if load_head else 2)} arrays loaded" \
      in caplog.text
  assert ("freshly initialised (zeros): head/bias, head/kernel" in caplog.text) == (not load_head)


# ------------------------------------------------------------------------------------ 8. rerun a finished run

def test_rerunning_a_finished_run_trains_no_more_and_evaluates(run_a, tmp_path, caplog):
  workdir = _copy(run_a[0], tmp_path)
  checkpoints = os.path.join(workdir, "checkpoints")
  before = {name: os.path.getmtime(os.path.join(checkpoints, name)) for name in os.listdir(checkpoints)}
  num_lines = len(_raw_lines(workdir))

  caplog.set_level(logging.INFO, logger="absl")
  result = trainer.run(tiny_config(), workdir, "train_and_evaluate")
  assert result["step"] == NUM_STEPS and not result["interrupted"] and "train" not in result
  assert result["test"] == run_a[1]["test"]
  assert f"already trained to step {NUM_STEPS}" in caplog.text
  assert {name: os.path.getmtime(os.path.join(checkpoints, name))
          for name in os.listdir(checkpoints)} == before
  assert _raw_lines(workdir)[num_lines:] == [{"step": NUM_STEPS, **run_a[1]["test"]}]
  _assert_same_params(workdir, run_a[0])


# ------------------------------------------------------------------------------------ 9. switches

def test_accumulation_bf16_remat_and_mixup_resume_exactly(tmp_path):
  """Mid-accumulation resume: the MultiSteps state, the schedule and the mixing all continue."""
  overrides = {"train.grad_accum_steps": 3, "train.num_steps": 9, "train.checkpoint_every_steps": 4,
               "model.dtype": "bfloat16", "model.remat": True, "data.dtype": "bfloat16",
               "data.mixup_alpha": 0.4, "eval.every_epochs": 0}
  whole = str(tmp_path / "whole")
  result = trainer.run(tiny_config(**overrides), whole, "train")
  assert result["step"] == 9 and np.isfinite(result["train"]["loss"])
  # The schedule saw 3 updates in 9 steps.
  lr_rows = [row for row in read_metrics(whole) if "train/lr" in row]
  assert lr_rows[-1]["step"] == 9

  # Interrupted at step 4 (one step into the second accumulation), then resumed.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(whole, resumed)
  checkpoints = os.path.join(resumed, "checkpoints")
  for step in _finished_steps(resumed):
    if step > 4:
      shutil.rmtree(os.path.join(checkpoints, str(step)))
  assert _finished_steps(resumed)[-1] == 4
  assert trainer.run(tiny_config(**overrides), resumed, "train")["step"] == 9
  _assert_same_params(resumed, whole)


def test_evaluate_mode_without_a_finished_checkpoint_uses_config_init(run_a, tmp_path):
  workdir = str(tmp_path / "empty")
  os.makedirs(os.path.join(workdir, "checkpoints"))  # killed before its first save
  config = tiny_config(**{"init.checkpoint": run_a[0]})
  metrics = trainer.run(config, workdir, "evaluate")["test"]
  assert metrics["test/top1"] == run_a[1]["test"]["test/top1"]
