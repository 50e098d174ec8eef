"""Two JAX processes on one host (coordinator on 127.0.0.1, 4 fake CPU devices each).

They train the demo model for a few steps, checkpoint and evaluate, and show that:
- the losses equal a single-process run fed the same global batches;
- a checkpoint written by 2 processes resumes in 1, and one written by 1 resumes in 2;
- SIGTERM to one process stops both at the same step;
- multi-process evaluation counts every video exactly once, with uneven shares.
"""

import csv
import functools
import io
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from flax import traverse_util

from launch import local
from msca_jax.data import stream as stream_lib
from msca_jax.tools.compare import read_metrics
from msca_jax.train import initialise, trainer
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import state as state_lib
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6
EVAL_SIZE = 25  # process 0 reads videos 0, 2, ..., 24 (13), process 1 reads 1, 3, ..., 23 (12)
TINY = {
    **helpers.TINY_MODEL,
    "data.synthetic.train_size": 128, "data.synthetic.eval_size": EVAL_SIZE,
    "train.batch_size": 16, "eval.batch_size": 8, "train.num_steps": STEPS,
    "train.checkpoint_every_steps": 3, "train.log_every_steps": 1, "eval.every_epochs": 0,
}

tiny_config = functools.partial(helpers.tiny_config, TINY)


def _run_two_processes(workdir, logs_dir, **overrides) -> list[str]:
  """Runs main.py as processes 0 and 1 with launch.local; returns their logs (fails if one fails)."""
  flags = [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
  commands = local.build_commands(os.path.join(ROOT, "configs", "msca_kv.py") + ":demo", workdir,
                                  num_processes=2, devices_per_process=4, overrides=flags)
  out = io.StringIO()
  codes = local.run(commands, out=out, timeout=300)
  text = out.getvalue()
  with open(os.path.join(logs_dir, "processes.log"), "w") as f:
    f.write(text)
  assert codes == [0, 0], text[-6000:]
  return ["\n".join(line for line in text.splitlines() if line.startswith(f"[process {i}]"))
          for i in range(2)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("cache"))
  os.environ["MSCA_JAX_CACHE"] = path  # the subprocesses inherit it
  yield path
  os.environ.pop("MSCA_JAX_CACHE", None)


@pytest.fixture(scope="module")
def two_process_run(cache, tmp_path_factory):
  root = tmp_path_factory.mktemp("two")
  workdir = str(root / "workdir")
  logs = _run_two_processes(workdir, str(root))
  return workdir, logs


def _finished_steps(workdir) -> list[int]:
  checkpoints = os.path.join(workdir, "checkpoints")
  names = os.listdir(checkpoints) if os.path.isdir(checkpoints) else []
  return sorted(int(name) for name in names if name.isdigit())


def _losses(workdir) -> dict[int, float]:
  return {row["step"]: row["train/loss"] for row in read_metrics(workdir)
          if "train/loss" in row}


def test_two_processes_train_like_one_on_the_same_global_batches(two_process_run, tmp_path):
  workdir, logs = two_process_run
  assert "process 0 of 2, 4 local devices" in logs[0]
  assert "process 1 of 2, 4 local devices" in logs[1]
  assert "train data" in logs[0] and "train data" not in logs[1]  # process 0 alone logs

  # One process, 8 devices, fed each step the two processes' local batches side by side.
  config = tiny_config()
  exp = trainer.build(config, str(tmp_path / "one"), train=True)
  _, shardings = state_lib.abstract_state(exp.model, exp.tx, exp.clip, exp.mesh, exp.rules)
  state = trainer._initial_state(exp, shardings)
  step_fn = trainer.make_train_step(config, exp.model, exp.tx, shardings, exp.mesh, exp.rules,
                                    stream_lib.training_window(config.data, exp.train_source))
  streams = [stream_lib.TrainStream(exp.train_source, config.data, batch_size=8,
                                    seed=config.train.seed, process_index=i, process_count=2)
             for i in range(2)]
  losses = []
  for _ in range(STEPS):
    halves = [next(s).device for s in streams]
    batch = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
    state, metrics = step_fn(state, mesh_lib.global_batch(batch, exp.mesh), jax.random.key(config.train.seed))
    losses.append(float(metrics["loss"]))

  got = _losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], losses, rtol=1e-5)
  reference = {"/".join(k): v for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items()}
  helpers.assert_trained_params_close(initialise.read_checkpoint_params(workdir), reference)


def test_two_process_evaluation_counts_every_video_once(two_process_run):
  workdir, logs = two_process_run
  rows = list(csv.DictReader(open(os.path.join(workdir, "eval", f"test_step{STEPS}",
                                               "validation_predictions.csv"))))
  keys = [row[next(iter(row))] for row in rows]
  assert len(keys) == EVAL_SIZE and len(set(keys)) == EVAL_SIZE
  test = [row for row in read_metrics(workdir) if "test/num_videos" in row]
  assert test[-1]["test/num_videos"] == EVAL_SIZE
  assert "videos evaluated" in logs[0] and "videos evaluated" not in logs[1]  # one table


def test_a_two_process_checkpoint_resumes_in_one_process(two_process_run, tmp_path, caplog):
  workdir = shutil.copytree(two_process_run[0], str(tmp_path / "copy"))
  caplog.set_level("INFO", logger="absl")
  result = trainer.run(tiny_config(**{"train.num_steps": STEPS + 2}), workdir, "train")
  assert result["step"] == STEPS + 2 and np.isfinite(result["train"]["loss"])
  assert f"at step {STEPS}" in caplog.text and "written by 2 processes" in caplog.text
  # The restored state was the saved one: one step further, the loss is that of a sane model.
  assert set(_losses(workdir)) >= {STEPS + 1, STEPS + 2}


def test_a_one_process_checkpoint_resumes_in_two_and_sigterm_to_one_stops_both(cache, tmp_path):
  """Two processes resume a one-process checkpoint; then a preemption notice reaches one host:
  all agree on a step, save it together, exit 143. (One two-process run for both: CI time.)"""
  workdir = str(tmp_path / "workdir")
  trainer.run(tiny_config(), workdir, "train")
  before = initialise.read_checkpoint_params(workdir)
  flags = [f"--config.{k}={v}" for k, v in {**TINY, "train.num_steps": 2000}.items()]
  commands = local.build_commands(os.path.join(ROOT, "configs", "msca_kv.py") + ":demo", workdir,
                                  num_processes=2, devices_per_process=4, overrides=flags)
  logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen(argv, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
           for (argv, env), log in zip(commands, logs)]
  try:
    deadline = time.monotonic() + 240
    while _finished_steps(workdir)[-1] <= STEPS:   # a step saved by the two processes
      assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  texts = []
  for log in logs:
    log.seek(0)
    texts.append(log.read())
  assert "resumed from" in texts[0] and f"at step {STEPS}" in texts[0], texts[0][-3000:]
  assert codes == [143, 143], "\n\n".join(t[-3000:] for t in texts)
  stopped = re.search(r"stopped by a preemption notice at step (\d+)", texts[0])
  assert stopped, texts[0][-3000:]
  step = int(stopped.group(1))
  assert STEPS < step < 2000
  assert _finished_steps(workdir)[-1] == step  # saved by both processes at the agreed step
  after = initialise.read_checkpoint_params(workdir)
  assert any(not np.array_equal(before[k], after[k]) for k in before)  # it trained on
