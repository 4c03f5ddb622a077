"""Who may write a workdir, whether a rerun is the same run, and what `--fresh` may delete.

`WorkdirLock`: one writer per workdir. The lock is the file `workdir/.lock`,
locked with `fcntl.flock` on a descriptor held for the whole run: taking it
is atomic, and the kernel releases it when its process dies, however it dies.
The file holds the owner's record (pid, host, start time), written while the
lock is held, and a background thread refreshes its modification time every
`heartbeat_seconds` (the heartbeat). The record and the heartbeat decide for
what the kernel lock cannot see: an owner on another host sharing the mount,
or a mount without working `flock`. A process that holds the kernel lock is
alive and is never overtaken, whatever its heartbeat (a stopped writer that
resumed would write beside its successor). With the kernel lock taken, a
record left in the file is stale, and the lock is taken over, when

* its heartbeat is older than `stale_seconds` (whatever its pid: a live pid
  may be another process's after pid reuse or a container restart), or
* it names this host and a pid that is dead, or this process's own pid (this
  process would hold the kernel lock), or
* it is empty or unreadable (its writer died before writing it; every record
  is written under the kernel lock, so no live writer is half-way through).

A record whose pid is not a process id (0, negative, not an integer, beyond
`MAX_PID`) and a `.lock` that is a directory or a link are refused with one
line: they are no lock mmsafe wrote.

`check_same_run`: a rerun in a workdir that holds a run must have the same
config in every field that defines the model or the run (`OPERATIONAL_FIELDS`
may differ: logging, checkpoint cadence, evaluators, data loading, device
layout). `check_fresh` / `clear_workdir`: `--fresh` deletes a workdir's run,
and refuses a directory that holds anything but a run.
"""

from __future__ import annotations

from collections.abc import Mapping
import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import threading
import time
from typing import Any

from mmsafe.files import process_alive, to_json

LOCK_NAME = ".lock"
MAX_PID = 1 << 22  # Linux's PID_MAX_LIMIT: no process id is larger.
OPERATIONAL_FIELDS = frozenset({
    "evals", "loader", "log_every_steps", "checkpoint_every_steps",
    "checkpoint_every_seconds", "checkpoint_max_to_keep", "check_batches",
    "preemption_sync_steps", "parallel", "eval_batch_size", "data.data_dir"})
# What a run's workdir holds at its top level (`mmsafe.train.loop`), besides
# TensorBoard event files (`EVENT_FILE_PREFIX`), reports written beside them and in
# evaluators' report directories (`REPORT_SUFFIXES`: results, index.md) and the
# temporary files of atomic writes (".<name>.<random>.tmp", `mmsafe.files`).
RUN_ENTRIES = frozenset({"config.json", "metrics.jsonl", "metrics.jsonl.tmp", "results.json",
                         "checkpoints", "checkpoints_damaged", LOCK_NAME})
REPORT_SUFFIXES = (".json", ".md", ".png")
EVENT_FILE_PREFIX = "events.out.tfevents."  # (as `metrics.EventWriter` names them)
# errnos of a filesystem without working flock (some FUSE and network mounts).
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})


class WorkdirInUse(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive, stale-aware lock on a workdir (a context manager); see the
  module docstring for its rules.

  Raises:
    WorkdirInUse: on entry, naming the holder's pid and host, when a live
      process holds the lock.
    ValueError: on entry, for a `.lock` that is no lock file of mmsafe (a
      directory, a link, a record whose pid is not a process id).
  """

  def __init__(self, workdir: str, *, heartbeat_seconds: float = 30.0,
               stale_seconds: float = 300.0):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._heartbeat_seconds = heartbeat_seconds
    self._stale_seconds = stale_seconds
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    while (fd := self._take(owner)) is None:  # Released and removed meanwhile: again.
      pass
    self._fd = fd
    self._thread = threading.Thread(target=self._beat, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._fd is not None:
      if _is_current(self._fd, self.path):
        os.remove(self.path)  # Still under the kernel lock: no one else took it.
      os.close(self._fd)  # Releases the kernel lock.
      self._fd = None

  def _take(self, owner: dict) -> int | None:
    """One attempt: the descriptor of the lock file, locked and holding `owner`'s
    record; None when the file was removed or replaced meanwhile."""
    fd, created = self._open()
    try:
      kernel_lock = _flock(fd)
      if kernel_lock is False:  # A live process holds it.
        raise WorkdirInUse(_in_use_message(self.path, self._read_holder(fd)))
      if not _is_current(fd, self.path):
        os.close(fd)
        return None
      if not created:
        holder = self._read_holder(fd)
        if not self._is_stale(fd, holder, kernel_lock):
          raise WorkdirInUse(_in_use_message(self.path, holder))
      self._write_record(fd, owner)
    except BaseException:
      os.close(fd)
      raise
    return fd

  def _open(self) -> tuple[int, bool]:
    """(descriptor, whether this call created the file) of the lock file;
    ValueError for a `.lock` that is no regular file."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
      try:
        return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
      except FileExistsError:
        fd = os.open(self.path, flags)
    except FileNotFoundError:  # Removed between the two opens.
      return self._open()
    except IsADirectoryError:
      raise ValueError(f"workdir: lock {self.path} is a directory, expected a lock file; "
                       f"remove it if no process writes this workdir") from None
    except OSError as e:
      if e.errno != errno.ELOOP:
        raise
      raise ValueError(f"workdir: lock {self.path} is a symbolic link, expected a lock file; "
                       f"remove it if no process writes this workdir") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      os.close(fd)
      raise ValueError(f"workdir: lock {self.path} is not a regular file; remove it if no "
                       f"process writes this workdir")
    return fd, False

  def _read_holder(self, fd: int) -> dict | None:
    """The owner record in the lock file: None when empty, {} when unreadable;
    ValueError for a record whose pid is not a process id."""
    text = os.pread(fd, 1 << 16, 0)
    if not text.strip():
      return None
    try:
      holder = json.loads(text)
    except ValueError:
      return {}
    if not isinstance(holder, dict):
      return {}
    pid = holder.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= MAX_PID:
      raise ValueError(f"workdir: lock {self.path} holds pid {pid!r}, expected a process id "
                       f"in [1, {MAX_PID}]; it is no lock of mmsafe: remove it if no process "
                       f"writes this workdir")
    return holder

  def _is_stale(self, fd: int, holder: dict | None, kernel_lock: bool | None) -> bool:
    """Whether the record `holder` (None: empty, {}: unreadable), read with the
    kernel lock taken (or on a mount without one: `kernel_lock` None), belongs
    to no live owner."""
    if time.time() - os.fstat(fd).st_mtime > self._stale_seconds:
      return True
    if not holder:
      return kernel_lock is True
    if holder.get("host") != socket.gethostname():
      return False
    return ((holder["pid"] == os.getpid() and kernel_lock is True)
            or not process_alive(holder["pid"]))

  def _write_record(self, fd: int, owner: dict) -> None:
    """Replaces the lock file's record by `owner` (under the kernel lock)."""
    data = json.dumps(owner).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_seconds):
      try:
        os.utime(self._fd)
      except OSError:
        return


def _flock(fd: int) -> bool | None:
  """Takes the kernel lock of `fd` without waiting: True when taken, False when
  another open file holds it, None on a filesystem without working flock."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return False
  except OSError as e:
    if e.errno in _NO_FLOCK:
      return None
    raise
  return True


def _is_current(fd: int, path: str) -> bool:
  """Whether `path` still names the file open as `fd` (not removed or replaced)."""
  try:
    current = os.stat(path, follow_symlinks=False)
  except FileNotFoundError:
    return False
  opened = os.fstat(fd)
  return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


def _in_use_message(path: str, holder: dict | None) -> str:
  who = (f"pid {holder.get('pid')} on host {holder.get('host')}" if holder
         else "a process that has not written its record yet")
  return (f"workdir: in use by {who} (lock {path}); wait for it to finish, or delete the "
          f"lock if that process is gone")



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


def check_fresh(workdir: str) -> None:
  """Raises ValueError unless `--fresh` may delete what `workdir` holds: nothing
  (a missing or empty directory), or a run: mmsafe's `config.json` and only a
  run's files (`RUN_ENTRIES`, the temporary files of atomic writes, and report
  directories holding only `REPORT_SUFFIXES` files). The message names what
  is there that is not a run's."""
  if not os.path.lexists(workdir):
    return
  if not os.path.isdir(workdir) or os.path.islink(workdir):
    raise ValueError(f"--fresh: {workdir!r} is not a directory; --fresh deletes only a "
                     f"training run's workdir")
  names = sorted(set(os.listdir(workdir)) - {LOCK_NAME})
  if not names:
    return
  if not _is_run_config(os.path.join(workdir, "config.json")):
    raise ValueError(f"--fresh: {workdir!r} holds no training run (no config.json of mmsafe); "
                     f"it holds {_listing(names)}. --fresh deletes only a run's workdir: "
                     f"choose another --workdir")
  foreign = [name for name in names if not _is_run_entry(workdir, name)]
  if foreign:
    raise ValueError(f"--fresh: {workdir!r} holds a run and also {_listing(foreign)}, which "
                     f"no run writes; move them away, or choose another --workdir")


def _is_run_config(path: str) -> bool:
  """Whether `path` is a regular file holding a run's config (a JSON object with
  `method`, `dataset` and `model`)."""
  if os.path.islink(path) or not os.path.isfile(path):
    return False
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and {"method", "dataset", "model"} <= set(config)


def _is_run_entry(workdir: str, name: str) -> bool:
  """Whether the top-level entry `name` of a run's workdir is one a run writes."""
  path = os.path.join(workdir, name)
  if os.path.islink(path):
    return False
  if name in RUN_ENTRIES:
    return True
  if os.path.isfile(path):
    return name.startswith(EVENT_FILE_PREFIX) or _is_report_file(workdir, name)
  if not os.path.isdir(path):
    return False
  return all(_is_report_file(root, name) for root, _, files in os.walk(path) for name in files)


def _is_report_file(directory: str, name: str) -> bool:
  """A report's file (`REPORT_SUFFIXES`) or an atomic write's temporary file."""
  return (not os.path.islink(os.path.join(directory, name))
          and (name.endswith(REPORT_SUFFIXES) or _is_temporary(name)))


def _is_temporary(name: str) -> bool:
  """The temporary file of an atomic write (`mmsafe.files.write_atomic`)."""
  return name.startswith(".") and name.endswith(".tmp")


def _listing(names: list[str], limit: int = 8) -> str:
  shown = ", ".join(repr(name) for name in names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def clear_workdir(workdir: str) -> None:
  """Deletes the run in `workdir` but its lock (an explicit fresh run), after
  `check_fresh`."""
  check_fresh(workdir)
  if not os.path.isdir(workdir):
    return
  for name in os.listdir(workdir):
    if name == LOCK_NAME:
      continue
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
