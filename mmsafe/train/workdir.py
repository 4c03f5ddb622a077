"""Who may write a workdir, and whether a rerun is the same run.

`WorkdirLock`: one writer per workdir. The lock is a file, `workdir/.lock`,
created exclusively and holding the owner's pid, host and start time; a
background thread refreshes its modification time every `heartbeat_seconds`.
A lock is stale, and is taken over, when its pid is dead on this host, or when
its heartbeat is older than `stale_seconds` (an owner on another host sharing
the mount that died without releasing it).

`check_same_run`: a rerun in a workdir that holds a run must have the same
config in every field that defines the model or the run (`OPERATIONAL_FIELDS`
may differ: logging, checkpoint cadence, evaluators, data loading, device
layout). `clear_workdir` empties a workdir for an explicit fresh run.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import json
import os
import shutil
import socket
import threading
import time
from typing import Any

from mmsafe.files import to_json

LOCK_NAME = ".lock"
OPERATIONAL_FIELDS = frozenset({
    "evals", "loader", "log_every_steps", "checkpoint_every_steps",
    "checkpoint_every_seconds", "checkpoint_max_to_keep", "check_batches",
    "preemption_sync_steps", "parallel", "eval_batch_size", "data.data_dir"})


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive, stale-aware lock on a workdir (a context manager).

  Raises:
    WorkdirInUse: on entry, naming the holder's pid and host, when a live
      process holds the lock.
  """

  def __init__(self, workdir: str, *, heartbeat_seconds: float = 30.0,
               stale_seconds: float = 300.0):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._heartbeat_seconds = heartbeat_seconds
    self._stale_seconds = stale_seconds
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    while not self._try_create(owner):
      holder = self._read_holder()
      if holder is None:  # Released meanwhile: try again.
        continue
      if not self._is_stale(holder):
        raise WorkdirInUse(
            f"workdir: in use by pid {holder.get('pid')} on host {holder.get('host')} "
            f"(lock {self.path}); wait for it to finish, or delete the lock if that "
            f"process is gone")
      self._break_stale(holder)
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    holder = self._read_holder()
    if holder is not None and holder.get("pid") == os.getpid() and (
        holder.get("host") == socket.gethostname()):
      os.remove(self.path)

  def _try_create(self, owner: dict) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(owner, f)
    return True

  def _read_holder(self) -> dict | None:
    """The lock file's owner record; None when it is gone, or {} when torn."""
    try:
      with open(self.path) as f:
        text = f.read()
    except FileNotFoundError:
      return None
    try:
      holder = json.loads(text)
    except json.JSONDecodeError:
      return {}
    return holder if isinstance(holder, dict) else {}

  def _is_stale(self, holder: dict) -> bool:
    """Dead pid on this host, or a heartbeat older than `stale_seconds`."""
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      return not _pid_alive(holder["pid"])
    try:
      age = time.time() - os.path.getmtime(self.path)
    except FileNotFoundError:
      return True
    return age > self._stale_seconds

  def _break_stale(self, holder: dict) -> None:
    """Removes the stale lock of `holder` by an atomic rename; a lock that another
    process created meanwhile is put back."""
    broken = f"{self.path}.stale.{os.getpid()}"
    try:
      os.replace(self.path, broken)
    except FileNotFoundError:
      return
    with open(broken) as f:
      taken = f.read()
    if taken != json.dumps(holder) and holder:
      with contextlib.suppress(FileExistsError):
        os.link(broken, self.path)
    os.remove(broken)

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        os.utime(self.path)
      except FileNotFoundError:
        return


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def check_same_run(workdir: str, config: Mapping[str, Any]) -> None:
  """Raises ValueError, listing each differing field with its old and new value,
  when `workdir/config.json` holds a run whose defining fields differ from `config`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  differences = [
      f"  {name}: {json.dumps(stored_value)} in the workdir, {json.dumps(new_value)} now"
      for name, stored_value, new_value in _differences(stored, json.loads(to_json(config)))
      if not _is_operational(name)]
  if differences:
    raise ValueError(
        f"config: the workdir {workdir!r} holds a different run; these fields differ:\n"
        + "\n".join(differences)
        + "\nUse another --workdir, or --fresh to delete that run and start over.")


def _differences(old: Any, new: Any, prefix: str = ""):
  """(dotted field, old value, new value) for every leaf that differs."""
  if isinstance(old, dict) and isinstance(new, dict):
    for key in sorted(set(old) | set(new)):
      yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
  elif old != new:
    yield prefix.rstrip("."), old, new


def _is_operational(name: str) -> bool:
  return any(name == field or name.startswith(field + ".") for field in OPERATIONAL_FIELDS)


def clear_workdir(workdir: str) -> None:
  """Deletes everything in `workdir` but its lock (an explicit fresh run)."""
  if not os.path.isdir(workdir):
    return
  for name in os.listdir(workdir):
    if name == LOCK_NAME:
      continue
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
