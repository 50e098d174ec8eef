"""WORKDIR/LOCK: one run per workdir, the holder named, stale locks taken over, released at exit."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from msca_jax.errors import UserError
from msca_jax.train import workdir as workdir_lib


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def _write_lock(workdir, **fields) -> None:
  os.makedirs(workdir, exist_ok=True)
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(),
            "heartbeat": time.time(), "token": "other"}
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w") as f:
    json.dump({**holder, **fields}, f)


def test_a_second_run_is_refused_with_the_holder_named_until_the_first_releases(tmp_path):
  workdir = str(tmp_path / "run")
  first = workdir_lib.WorkdirLock(workdir)
  first.acquire()
  with open(first.path) as f:
    holder = json.load(f)
  assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
  with pytest.raises(UserError) as refused:
    workdir_lib.WorkdirLock(workdir).acquire()
  message = str(refused.value)
  assert "\n" not in message
  assert f"host {socket.gethostname()}, pid {os.getpid()}, started " in message and workdir in message
  first.release()
  first.release()  # twice is harmless
  assert not os.path.exists(first.path)
  with workdir_lib.WorkdirLock(workdir) as second:
    assert second.held
  assert not os.listdir(workdir)


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path)
  dead = _dead_pid()
  _write_lock(workdir, pid=dead)
  with workdir_lib.WorkdirLock(workdir) as lock:
    with open(lock.path) as f:
      assert json.load(f)["token"] == lock.token
  assert f"pid {dead} is not running on this host" in caplog.text


def test_another_hosts_lock_is_stale_only_when_its_heartbeat_is_old(tmp_path, caplog):
  workdir = str(tmp_path)
  _write_lock(workdir, host="elsewhere", pid=1, heartbeat=time.time() - 30)
  with pytest.raises(UserError, match="host elsewhere, pid 1, .*heartbeat 30 s ago"):
    workdir_lib.WorkdirLock(workdir).acquire()
  _write_lock(workdir, host="elsewhere", pid=1, heartbeat=time.time() - workdir_lib.STALE_AFTER_S - 5)
  with workdir_lib.WorkdirLock(workdir):
    pass
  assert "taking over the stale lock" in caplog.text and "heartbeat is" in caplog.text


def test_the_heartbeat_is_rewritten_and_a_taken_over_lock_is_left_alone(tmp_path):
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  lock.acquire()
  with open(lock.path) as f:
    before = json.load(f)["heartbeat"]
  time.sleep(0.01)
  lock.heartbeat()
  with open(lock.path) as f:
    assert json.load(f)["heartbeat"] > before
  _write_lock(str(tmp_path), token="usurper")  # this run was judged stale and taken over
  lock.heartbeat()
  lock.release()
  with open(lock.path) as f:
    assert json.load(f)["token"] == "usurper"


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "file"
  path.write_text("x")
  with pytest.raises(UserError, match=r"^--workdir .*file is a file; expected a directory"):
    workdir_lib.check_workdir(str(path))
  workdir_lib.check_workdir(str(tmp_path))
  workdir_lib.check_workdir(str(tmp_path / "new"))
