"""Checkpoints at the edges: damaged files, failed saves, non-finite states, empty directories.

Every finished step carries digests of its files; a damaged latest step is set aside and the
newest intact one resumed. A save into a read-only or full directory ends with one line and the
previous step intact. Read-only and full directories are simulated without root: a read-only
directory by chmod (or, as root, where chmod does not stop writes, a failing mkdir), a full one by
a write that fails with ENOSPC in orbax's background finalisation.
"""

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from msca_jax import cli, predict
from msca_jax.data.pipeline import StreamState
from msca_jax.train import checkpoint as ckpt_lib
from msca_jax.train import initialise
from msca_jax.train import mesh as mesh_lib
from msca_jax.train import state as state_lib
from msca_jax.train import trainer
from tests import helpers
from tests.train.test_trainer import CONFIG, ROOT, TINY, _flags, tiny_config

# A save that fails must return at once; orbax's own wait for a directory that never comes is minutes.
PROMPT_S = 60


def _setup():
  cfg = mesh_lib.mesh_config()
  cfg.shape = ml_collections.ConfigDict(dict(data=1, fsdp=1, model=1))
  mesh = mesh_lib.make_mesh(cfg, jax.devices()[:1])
  rules = mesh_lib.rules(cfg)
  model, tx = helpers.small_model(), optax.adamw(1e-3)
  clip = jax.ShapeDtypeStruct((2, 2, 32, 32, 3), jnp.float32)
  return model, tx, clip, mesh, rules


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Steps 10 and 20 of a small model's state, saved once; tests damage copies of them."""
  model, tx, clip, mesh, rules = _setup()
  state, _ = state_lib.create(model, tx, clip, mesh, rules, jax.random.key(0))
  directory = str(tmp_path_factory.mktemp("saved") / "checkpoints")
  checkpointer = ckpt_lib.Checkpointer(directory, save_interval_steps=10)
  for step in (10, 20):
    assert checkpointer.save(step, state, ckpt_lib.streams_array(StreamState(position=step), mesh),
                             {"step": step})
  checkpointer.close()
  return {"directory": directory, "state": jax.device_get(state), "mesh": mesh,
          "abstract": state_lib.abstract_state(model, tx, clip, mesh, rules)[0]}


def _copy(saved, tmp_path) -> str:
  return shutil.copytree(saved["directory"], str(tmp_path / "checkpoints"))


def _largest_data_file(step_dir: str) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  return max(files, key=os.path.getsize)


def _flip_a_byte(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x01]))


def _damage(step_dir: str, how: str) -> tuple[str, str]:
  """Damages a step; returns (the file, relative to the step, and the words verify_step uses)."""
  if how == "empty manifest":
    path = os.path.join(step_dir, "state", "manifest.ocdbt")
    open(path, "wb").close()
    return "state/manifest.ocdbt", "bytes"
  path = _largest_data_file(step_dir)
  if how == "bit flip":
    _flip_a_byte(path)
    why = "SHA-256 differs"
  elif how == "truncated":
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
    why = "bytes"
  else:
    os.remove(path)
    why = "is missing"
  return os.path.relpath(path, step_dir), why


# ------------------------------------------------------------------------------------ digests

def test_every_finished_step_has_digests_of_its_data(saved):
  for step in (10, 20):
    assert ckpt_lib.verify_step(saved["directory"], step)
    step_dir = os.path.join(saved["directory"], str(step))
    digested = ckpt_lib._files(step_dir)
    assert os.path.relpath(_largest_data_file(step_dir), step_dir) in digested
    assert "state/manifest.ocdbt" in digested and "metadata/metadata" in digested
  assert sorted(os.listdir(saved["directory"])) == ["10", "20"]


@pytest.mark.parametrize("how", ["bit flip", "truncated", "deleted", "empty manifest"])
def test_a_damaged_latest_step_falls_back_to_the_newest_intact_one(how, saved, tmp_path, caplog):
  directory = _copy(saved, tmp_path)
  damaged_file, why = _damage(os.path.join(directory, "20"), how)
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=re.escape(damaged_file)) as error:
    ckpt_lib.verify_step(directory, 20)
  assert why in str(error.value) and error.value.file == damaged_file

  checkpointer = ckpt_lib.Checkpointer(directory, save_interval_steps=10)
  try:
    with caplog.at_level(logging.WARNING, logger="absl"):
      assert checkpointer.latest_intact_step() == 10
    warning = next(r.getMessage() for r in caplog.records if "is damaged" in r.getMessage())
    assert f"checkpoint step 20 in {directory} is damaged: {damaged_file}" in warning and why in warning
    assert "resuming from step 10" in warning
    # Set aside, out of orbax's sight, and kept for inspection.
    aside = [name for name in os.listdir(directory) if name.startswith("damaged-20-")]
    assert len(aside) == 1 and checkpointer.manager.all_steps() == [10]
    if how == "bit flip":  # step 10 restores whole, and step 20 can be saved again
      state, streams, metadata = checkpointer.restore(10, saved["abstract"], saved["mesh"])
      chex.assert_trees_all_equal(jax.device_get(state), saved["state"])
      assert streams == [StreamState(position=10)] and metadata == {"step": 10}
      assert checkpointer.save(20, state, ckpt_lib.streams_array(streams[0], saved["mesh"]), {})
      checkpointer.wait()
      assert ckpt_lib.verify_step(directory, 20)
  finally:
    checkpointer.close()


def test_every_step_damaged_is_one_error_and_a_step_without_digests_is_taken(saved, tmp_path):
  directory = _copy(saved, tmp_path)
  os.remove(os.path.join(directory, "20", ckpt_lib.DIGESTS))  # as written before digests existed
  assert not ckpt_lib.verify_step(directory, 20)
  checkpointer = ckpt_lib.Checkpointer(directory, save_interval_steps=10)
  assert checkpointer.latest_intact_step() == 20
  checkpointer.close()

  for step in (10, 20):
    _damage(os.path.join(directory, str(step)), "bit flip")
    with open(os.path.join(directory, str(step), ckpt_lib.DIGESTS), "w") as f:
      f.write('{"files": {"state/manifest.ocdbt": [1, "0"]}}')
  checkpointer = ckpt_lib.Checkpointer(directory, save_interval_steps=10)
  try:
    with pytest.raises(ckpt_lib.DamagedCheckpointError, match="every step differs") as error:
      checkpointer.latest_intact_step()
    assert "step 20: state/manifest.ocdbt" in str(error.value) and "step 10:" in str(error.value)
  finally:
    checkpointer.close()
  assert sorted(os.listdir(directory)) == ["10", "20"]  # nothing moved: starting afresh is the user's call


def test_readers_verify_and_name_the_true_cause(saved, tmp_path, capsys):
  from absl import flags
  directory = _copy(saved, tmp_path)
  # config.init / evaluate mode read the latest step through initialise.
  damaged_file, _ = _damage(os.path.join(directory, "20"), "truncated")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=re.escape(damaged_file)) as error:
    initialise.read_checkpoint_params(directory)
  intact = os.path.join(directory, "10")
  assert str(error.value).endswith(f"the newest intact step is {intact}: name it to read that one")
  assert initialise.read_checkpoint_params(intact).keys()   # named, the older step reads
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=r"20 is damaged: .*bytes[^;]*$"):
    initialise.read_checkpoint_params(os.path.join(directory, "20"))   # named: no hint needed
  _damage(intact, "bit flip")
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match="; no older step is intact$"):
    initialise.read_checkpoint_params(directory)
  shutil.rmtree(directory)
  directory = _copy(saved, tmp_path)
  damaged_file, _ = _damage(os.path.join(directory, "20"), "truncated")

  def run_predict(checkpoint):
    argv = ["predict", f"--config={CONFIG}:demo", "--config.model.depth=1",
            f"--checkpoint={checkpoint}", f"--video={tmp_path}/clip.mp4"]
    flag_values = predict.define_flags(flags.FlagValues(), argv)
    flag_values(argv)
    status = predict.run(flag_values)
    return status, capsys.readouterr().err

  (tmp_path / "clip.mp4").write_bytes(b"not read: the checkpoint fails first")
  (tmp_path / "empty").mkdir()
  status, err = run_predict(tmp_path / "empty")
  assert status == cli.EXIT_USER_ERROR and err.count("\n") == 1, err
  assert "no finished checkpoint there" in err and "does not fit" not in err, err
  status, err = run_predict(directory)
  assert status == cli.EXIT_USER_ERROR and err.count("\n") == 1, err
  assert f"is damaged: {damaged_file}" in err and "does not fit" not in err, err


# ------------------------------------------------------------------------------------ failed saves

def test_a_read_only_directory_fails_the_save_at_once_with_the_previous_step_intact(
    saved, tmp_path, monkeypatch):
  directory = _copy(saved, tmp_path)
  checkpointer = ckpt_lib.Checkpointer(directory, save_interval_steps=10)
  streams = ckpt_lib.streams_array(StreamState(), saved["mesh"])
  if os.geteuid() == 0:  # root writes through a chmod: the directory refuses to be made instead
    makedirs = os.makedirs

    def read_only(path, *args, **kwargs):
      if str(path).startswith(directory):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
      return makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", read_only)
  else:
    os.chmod(directory, 0o555)
  start = time.monotonic()
  try:
    with pytest.raises(ckpt_lib.SaveError) as error:
      checkpointer.save(30, saved["state"], streams, {})
  finally:
    checkpointer.close()  # quiet after a reported failure, and prompt
    os.chmod(directory, 0o755)
  assert time.monotonic() - start < PROMPT_S
  assert re.fullmatch(
      rf"checkpoint save to {re.escape(directory)} \(step 30\) failed: (read-only file system|"
      r"permission denied) \(\S+\); the previous checkpoint \(step 20\) is intact", str(error.value))
  monkeypatch.undo()
  assert ckpt_lib.verify_step(directory, 20) and sorted(os.listdir(directory)) == ["10", "20"]


def test_a_full_disk_in_the_background_write_fails_the_next_save(saved, tmp_path, monkeypatch):
  directory = _copy(saved, tmp_path)
  checkpointer = ckpt_lib.Checkpointer(directory, save_interval_steps=10)
  streams = ckpt_lib.streams_array(StreamState(), saved["mesh"])

  def full(step_dir):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(step_dir, ckpt_lib.DIGESTS))
  monkeypatch.setattr(ckpt_lib, "write_digests", full)
  start = time.monotonic()
  try:
    assert checkpointer.save(30, saved["state"], streams, {})  # asynchronous: fails behind us
    with pytest.raises(ckpt_lib.SaveError,
                       match=r"\(step 30\) failed: no space left on device .*\(step 20\) is intact"):
      checkpointer.save(40, saved["state"], streams, {})
  finally:
    checkpointer.close()
  assert time.monotonic() - start < PROMPT_S
  assert "30" not in os.listdir(directory) and ckpt_lib.verify_step(directory, 20)
  assert ckpt_lib.Checkpointer(directory, save_interval_steps=10).latest_intact_step() == 20


def test_failure_reasons_are_a_few_words():
  assert ckpt_lib.failure_reason(OSError(errno.EROFS, "x", "/ck/30")) == "read-only file system (/ck/30)"
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing local file "/ck/30/state/d/ab": '
                           "Failed to write 4096 bytes")
  try:
    raise RuntimeError("Failed to run 3 Handler Commit operations") from tensorstore
  except RuntimeError as e:
    assert ckpt_lib.failure_reason(e) == "no space left or quota exceeded (RESOURCE_EXHAUSTED)"
  assert ckpt_lib.failure_reason(ValueError("PERMISSION_DENIED: gs://b/ck")).startswith("permission denied")


def test_nonfinite_parts_names_what_would_be_saved(saved):
  state = saved["state"]
  assert ckpt_lib.nonfinite_parts(state) == []
  nan = jax.tree.map(lambda x: jnp.asarray(x).at[0].set(jnp.nan) if x.ndim else x, state.params)
  assert ckpt_lib.nonfinite_parts(state.replace(params=nan)) == ["params"]


# ------------------------------------------------------------------------------------ the trainer

@pytest.fixture(scope="module", autouse=True)
def synthetic_cache(tmp_path_factory):
  """The synthetic set of test_trainer (the same directory), written once per session."""
  base = tmp_path_factory.getbasetemp()
  root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trainer_shared"
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MSCA_JAX_CACHE", str(root / "cache"))
    yield


SHORT = {"train.num_steps": 10, "eval.every_epochs": 0}


def test_the_trainer_resumes_past_a_damaged_step_exactly(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  trainer.run(tiny_config(**SHORT), workdir, "train")
  checkpoints = os.path.join(workdir, "checkpoints")
  want = initialise.read_checkpoint_params(os.path.join(checkpoints, "10"))
  damaged_file, _ = _damage(os.path.join(checkpoints, "10"), "bit flip")
  # Evaluate mode reads, never moves: the damaged file and the step to name instead.
  with pytest.raises(ckpt_lib.DamagedCheckpointError, match=re.escape(
      f"{damaged_file} has other contents than were written (SHA-256 differs); the newest intact "
      f"step is {os.path.join(checkpoints, '5')}: name it")):
    trainer.run(tiny_config(**SHORT), workdir, "evaluate")

  with caplog.at_level(logging.INFO, logger="absl"):   # an in-process tool may have set WARNING
    result = trainer.run(tiny_config(**SHORT), workdir, "train")
  messages = [r.getMessage() for r in caplog.records]
  assert any(f"checkpoint step 10 in {checkpoints} is damaged: {damaged_file}" in m for m in messages)
  assert any("resumed from" in m and "at step 5" in m for m in messages), messages
  assert result["step"] == 10 and ckpt_lib.verify_step(checkpoints, 10)
  got = initialise.read_checkpoint_params(workdir)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_nonfinite_parameters_are_never_saved(tmp_path):
  # An lr beyond float32: step 1's loss and gradient are finite, the parameters it updates are not.
  config = tiny_config(**SHORT, **{"train.base_lr": 1e39, "train.warmup_epochs": 0,
                                   "train.checkpoint_every_steps": 1})
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r"the parameters .*became NaN or Inf at step 1; .*no checkpoint was written"):
    trainer.run(config, str(tmp_path), "train")
  assert [n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()] == []


# Runs main with mkdir of step 10's directory failing as on a read-only file system.
_READ_ONLY_FROM_STEP_10 = """
import errno, os, sys
makedirs = os.makedirs
def read_only(path, *args, **kwargs):
  if "/checkpoints/10." in str(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
  return makedirs(path, *args, **kwargs)
os.makedirs = read_only
from msca_jax import cli, main
sys.argv = ["main"] + sys.argv[1:]
cli.run(main.main)
"""


def test_main_exits_4_with_one_line_when_a_save_fails(tmp_path):
  workdir = str(tmp_path / "run")
  command = [sys.executable, "-c", _READ_ONLY_FROM_STEP_10, f"--config={CONFIG}:demo",
             f"--workdir={workdir}", "--mode=train", *_flags({**TINY, **SHORT})]
  proc = subprocess.run(command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True,
                        timeout=300)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 4, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  assert re.search(r"checkpoint save to \S+/checkpoints \(step 10\) failed: read-only file system "
                   r"\(\S+\); the previous checkpoint \(step 5\) is intact", output), output[-3000:]
  assert ckpt_lib.verify_step(os.path.join(workdir, "checkpoints"), 5)
