"""A really full disk: training into a small tmpfs fails in one line with exit status 4, and a
rerun with more space resumes (docs/training.md#checkpoints-and-resume).

tests/train/test_checkpoint_integrity.py raises ENOSPC inside the digest write; this fills a real
file system, which is where orbax's threads, tensorstore and asyncio each had their own say. A
tmpfs needs root (CI runs as root); elsewhere the test is skipped, saying why.
"""

import os
import re
import subprocess
import sys
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The tiny MSCA-KV of tests/train/test_trainer.py on one CPU device, as the demo runs: a checkpoint
# takes 380 to 460 KiB of a tmpfs, and orbax saves steps 1, 10, 20: 1000 KiB holds one or two.
TINY = {
    "model.depth": 1, "model.width": 32, "model.num_heads": 2, "model.mlp_dim": 64,
    "model.num_frames": 4, "model.shift_div": 2,
    "data.synthetic.train_size": 64, "data.synthetic.eval_size": 16,
    "train.batch_size": 16, "eval.batch_size": 16, "train.num_steps": 30,
    "train.checkpoint_every_steps": 10, "eval.every_epochs": 0,
}
SMALL, LARGE = "1000k", "50m"
LOG_PREFIX = re.compile(r"^[IWEF]\d{4} ")


def _mount(directory, size: str) -> str | None:
  """Why a tmpfs cannot be mounted at `directory`, or None once it is."""
  if not sys.platform.startswith("linux"):
    return "tmpfs is Linux's"
  if os.geteuid() != 0:
    return "mounting a tmpfs needs root"
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True, timeout=60, check=False)
  except (OSError, subprocess.SubprocessError) as e:
    return f"mount could not run: {e}"
  return None if done.returncode == 0 else f"mount -t tmpfs failed: {done.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path):
  disk = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
  disk.mkdir()
  why = _mount(disk, SMALL)
  if why:
    pytest.skip(f"no tmpfs to fill: {why}")
  try:
    yield disk
  finally:
    subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=60, check=False)


def _train(workdir, cache) -> subprocess.CompletedProcess:
  flags = [f"--config.{k}={v}" for k, v in TINY.items()]
  # One device, as a user's demo has (the suite's 8 fake devices write each array in 8 shards).
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  env = dict(os.environ, MSCA_JAX_CACHE=str(cache), XLA_FLAGS=xla_flags.strip())
  return subprocess.run(
      [sys.executable, "-m", "msca_jax.main", f"--config={ROOT}/configs/msca_kv.py:demo",
       f"--workdir={workdir}", "--mode=train", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_a_full_disk_is_one_line_and_exit_4_and_more_space_resumes(small_disk, tmp_path):
  workdir, cache = small_disk / "w", tmp_path / "cache"
  result = _train(workdir, cache)
  err = result.stderr
  assert result.returncode == 4, err[-5000:]
  line = re.compile(rf"checkpoint save to {re.escape(str(workdir))}/checkpoints \(step (\d+)\) failed: "
                    r"no space left (on device|or quota exceeded \(RESOURCE_EXHAUSTED\)); the "
                    r"previous checkpoint \(step (\d+)\) is intact$")
  errors = [l for l in err.splitlines() if l.startswith("E") and LOG_PREFIX.match(l)]
  assert len(errors) == 1 and line.search(errors[0]), err[-5000:]
  failed, intact = map(int, line.search(errors[0]).group(1, 3))
  assert intact < failed
  # Nothing after it, and none of orbax's, tensorstore's or asyncio's own reports.
  assert errors[0] in err.rstrip().splitlines()[-1], err[-5000:]
  for noise in ("Traceback", "never retrieved", "Event loop is closed", "_SignalingThread",
                "OCDBT", "Exception in thread", "Exception ignored"):
    assert noise not in err, (noise, err[-5000:])
  finished = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert finished[-1] == intact

  # Space again: the same command resumes from the intact step and finishes.
  remount = subprocess.run(["mount", "-o", f"remount,size={LARGE}", str(small_disk)],
                           capture_output=True, text=True, timeout=60, check=False)
  assert remount.returncode == 0, remount.stderr
  again = _train(workdir, cache)
  assert again.returncode == 0, again.stderr[-5000:]
  assert f"resumed from {workdir}/checkpoints at step {intact} " in again.stderr
  assert "Traceback" not in again.stderr
  assert os.path.isdir(workdir / "checkpoints" / str(TINY["train.num_steps"]))


def test_metrics_on_a_full_disk_fail_in_one_line(small_disk):
  from msca_jax.train import checkpoint as ckpt_lib
  from msca_jax.train import trainer
  writer = trainer.MetricsWriter(str(small_disk / "w"), checkpoint_state=lambda: "step 10")
  with open(small_disk / "filler", "wb", buffering=0) as f:   # the rest of the disk
    try:
      while True:
        f.write(b"\0" * 65536)
        f.flush()
    except OSError:
      pass
  with pytest.raises(ckpt_lib.SaveError) as failed:
    for step in range(1000):   # the first write that does not fit in the files' last pages
      writer.write(step, {"train/loss": 1.0, "train/note": float(step)})
  assert str(failed.value) == (f"writing the metrics in {small_disk / 'w'} failed: no space left on "
                               "device; the previous checkpoint (step 10) is intact")
  writer.close()   # quietly: the failure was reported
