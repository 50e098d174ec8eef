"""One training run per workdir: WORKDIR/LOCK, taken by process 0 and released at exit.

Two trainers in one workdir would write the same checkpoint steps and metrics, so the second is
refused with the holder's host, pid and start time. The lock is a JSON file created atomically
(O_CREAT | O_EXCL on local and network file systems; on object stores such as gs:// a write that is
read back, since tf.io.gfile has no exclusive create) and its holder rewrites its heartbeat every
HEARTBEAT_S seconds. A lock is stale, and is taken over with a log line, when its pid is dead on
this host or its heartbeat is older than STALE_AFTER_S (five missed beats: another host's run cannot
be asked whether it lives, and a live run beats even while it compiles or saves). So a killed run
never blocks a rerun on its host, and blocks one on another host for at most STALE_AFTER_S.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import threading
import time
import uuid

import tensorflow as tf
from absl import logging

from msca_jax.errors import UserError

LOCK_FILE = "LOCK"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 300.0


def _is_local(path: str) -> bool:
  return "://" not in path


def check_workdir(workdir: str) -> None:
  """Raises UserError when --workdir exists but is not a directory."""
  if tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):
    raise UserError(f"--workdir {workdir} is a file; expected a directory (new or of an earlier run)")


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's live process
    return True
  return True


def _describe(holder: dict) -> str:
  started = holder.get("start_time")
  when = (datetime.datetime.fromtimestamp(started).isoformat(sep=" ", timespec="seconds")
          if isinstance(started, (int, float)) else "?")
  beat = holder.get("heartbeat")
  ago = f", heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
  return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {when}{ago}"


def stale_reason(holder: dict, now: float | None = None) -> str | None:
  """Why a lock's holder is gone ('pid 123 is not running on this host', ...), or None if it may live."""
  now = time.time() if now is None else now
  pid = holder.get("pid")
  if holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
    return f"pid {pid} is not running on this host"
  beat = holder.get("heartbeat")
  if not isinstance(beat, (int, float)):
    return "it holds no heartbeat"
  if now - beat > STALE_AFTER_S:
    return f"its heartbeat is {now - beat:.0f} s old (stale after {STALE_AFTER_S:.0f} s)"
  return None


class WorkdirLock:
  """WORKDIR/LOCK held by this process; `acquire` takes it or raises UserError naming the holder."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.workdir = workdir
    self.token = uuid.uuid4().hex
    self.start_time = time.time()
    self._stop = threading.Event()
    self._mutex = threading.Lock()  # a heartbeat being written is not removed under it, and back
    self._thread: threading.Thread | None = None
    self.held = False

  def _content(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": self.start_time,
            "heartbeat": time.time(), "token": self.token}

  def _read(self, path: str | None = None) -> dict | None:
    """The lock's JSON; None if there is no lock; {} if it cannot be parsed (being written)."""
    try:
      with tf.io.gfile.GFile(path or self.path) as f:
        text = f.read()
    except tf.errors.NotFoundError:
      return None
    try:
      holder = json.loads(text)
    except ValueError:
      return {}
    return holder if isinstance(holder, dict) else {}

  def _create(self) -> bool:
    """Creates the lock file if there is none; True when this process created it."""
    data = json.dumps(self._content())
    if _is_local(self.path):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(data)
      return True
    if tf.io.gfile.exists(self.path):
      return False
    with tf.io.gfile.GFile(self.path, "w") as f:
      f.write(data)
    time.sleep(1.0)  # a racing writer's object replaces ours within this time: read back who won
    return (self._read() or {}).get("token") == self.token

  def _remove_stale(self, holder: dict) -> None:
    """Moves a stale lock aside; a lock that changed since it was judged stale is put back."""
    aside = f"{self.path}.stale.{self.token}"
    try:
      tf.io.gfile.rename(self.path, aside, overwrite=False)
    except (tf.errors.NotFoundError, tf.errors.AlreadyExistsError):
      return  # another starter moved it first
    if self._read(aside) != holder:  # a fresh lock taken by another starter meanwhile
      tf.io.gfile.rename(aside, self.path, overwrite=True)
      return
    tf.io.gfile.remove(aside)

  def acquire(self) -> None:
    tf.io.gfile.makedirs(self.workdir)
    for _ in range(5):
      if self._create():
        break
      holder = self._read()
      if holder is None:
        continue  # released meanwhile: try again
      if holder == {}:  # being written, or truncated by a crash: judge it by its age
        time.sleep(0.5)
        holder = self._read()
        if holder is None:
          continue
        if holder == {}:
          try:
            age = time.time() - tf.io.gfile.stat(self.path).mtime_nsec / 1e9
          except tf.errors.NotFoundError:
            continue
          if age <= STALE_AFTER_S:
            raise UserError(f"{self.workdir} is locked by another run ({self.path} is being "
                            "written); if no run uses this workdir, delete that file")
      reason = stale_reason(holder)
      if reason is None:
        raise UserError(f"{self.workdir} is in use by another run ({_describe(holder)}): one run per "
                        f"workdir; use another --workdir, or stop that run (if it is dead, delete "
                        f"{self.path} or wait {STALE_AFTER_S:.0f} s after its last heartbeat)")
      logging.warning("taking over the stale lock %s (%s): %s", self.path, _describe(holder), reason)
      self._remove_stale(holder)
    else:
      raise UserError(f"{self.workdir}: could not take {self.path} (other runs keep starting there)")
    self.held = True
    atexit.register(self.release)
    self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        self.heartbeat()
      except Exception as e:  # pylint: disable=broad-except  # a file system hiccup: beat again later
        logging.warning("could not update the heartbeat of %s: %s", self.path, e)

  def heartbeat(self) -> None:
    """Rewrites the heartbeat time; stops if another run took the lock over (this one was stale)."""
    with self._mutex:
      if self.held:
        self._heartbeat()

  def _heartbeat(self) -> None:
    holder = self._read()
    if holder and holder.get("token") != self.token:
      logging.error("%s was taken over by another run (%s): this run no longer holds the workdir",
                    self.path, _describe(holder))
      self.held = False
      self._stop.set()
      return
    temporary = f"{self.path}.{self.token}.tmp"
    with tf.io.gfile.GFile(temporary, "w") as f:
      f.write(json.dumps(self._content()))
    tf.io.gfile.rename(temporary, self.path, overwrite=True)

  def release(self) -> None:
    """Removes the lock if this process still holds it; safe to call twice."""
    self._stop.set()
    with self._mutex:
      if not self.held:
        return
      self.held = False
      atexit.unregister(self.release)
      holder = self._read()
      if holder is not None and holder.get("token") == self.token:
        try:
          tf.io.gfile.remove(self.path)
        except tf.errors.NotFoundError:
          pass

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
