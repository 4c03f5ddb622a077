"""Faults of a workdir's lock and of `--fresh` (issue 34, items 1 and 2): `--fresh`
deletes only a run; one writer under every state of the lock file, including
interleavings widened by injected delays; lock files that are no lock are
refused in one line."""

import json
import os
from pathlib import Path
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from mmsafe.train import loop
from mmsafe.train import workdir as workdir_lib
from mmsafe.train.workdir import WorkdirInUse, WorkdirLock
from tests.conftest import mfeat_config

REPO = Path(__file__).resolve().parents[1]


def _snapshot(directory: Path) -> dict:
  """Relative path -> (size, mtime) of every entry: what 'nothing written' compares."""
  return {str(p.relative_to(directory)): (p.lstat().st_size, p.lstat().st_mtime_ns)
          for p in sorted(directory.rglob("*"))}


def _fake_run(workdir: Path) -> Path:
  """A directory laid out as a finished run (no training needed to delete one)."""
  (workdir / "checkpoints" / "42" / "train_state").mkdir(parents=True)
  (workdir / "checkpoints" / "42" / "train_state" / "_METADATA").write_text("{}")
  (workdir / "config.json").write_text(json.dumps(
      {"method": "jt", "dataset": "mfeat", "model": {}}))
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  (workdir / "results.json").write_text("{}")
  (workdir / "robustness").mkdir()
  (workdir / "robustness" / "robustness.md").write_text("# report")
  (workdir / "defended" / "robustness").mkdir(parents=True)
  (workdir / "defended" / "robustness" / "pgd_accuracy.png").write_bytes(b"png")
  return workdir


# ---------------------------------------------------------------------------
# --fresh deletes only a run


def test_fresh_refuses_a_directory_that_holds_no_run(tmp_path):
  home = tmp_path / "home"
  (home / "Documents").mkdir(parents=True)
  (home / ".bashrc").write_text("export A=1")
  (home / "thesis.tex").write_text("...")
  before = _snapshot(home)
  with pytest.raises(ValueError) as error:
    loop.train_and_evaluate(mfeat_config("jt", num_epochs=1), str(home), fresh=True)
  message = str(error.value)
  assert "holds no training run (no config.json of mmsafe)" in message, message
  assert "'.bashrc', 'Documents', 'thesis.tex'" in message and "\n" not in message, message
  assert _snapshot(home) == before


@pytest.mark.parametrize("config_text", ["not json", '{"name": "a web app"}', "[1, 2]"])
def test_fresh_refuses_a_config_json_that_is_not_mmsafes(tmp_path, config_text):
  (tmp_path / "config.json").write_text(config_text)
  with pytest.raises(ValueError, match="holds no training run"):
    workdir_lib.clear_workdir(str(tmp_path))
  assert (tmp_path / "config.json").read_text() == config_text


@pytest.mark.parametrize("extra", ["notes.txt", "data/train.csv", "robustness/model.npz"])
def test_fresh_refuses_a_run_with_foreign_files_naming_them(tmp_path, extra):
  workdir = _fake_run(tmp_path / "run")
  (workdir / extra).parent.mkdir(parents=True, exist_ok=True)
  (workdir / extra).write_text("mine")
  before = _snapshot(workdir)
  with pytest.raises(ValueError, match=rf"holds a run and also '{extra.split('/')[0]}', which "
                                       rf"no run writes"):
    workdir_lib.clear_workdir(str(workdir))
  assert _snapshot(workdir) == before


def test_fresh_refuses_a_symlink_in_a_run(tmp_path):
  workdir = _fake_run(tmp_path / "run")
  (tmp_path / "precious").mkdir()
  (tmp_path / "precious" / "a.json").write_text("{}")
  (workdir / "metrics.jsonl").unlink()
  (workdir / "metrics.jsonl").symlink_to(tmp_path / "precious" / "a.json")
  with pytest.raises(ValueError, match="'metrics.jsonl', which no run writes"):
    workdir_lib.clear_workdir(str(workdir))
  assert (tmp_path / "precious" / "a.json").exists()


def test_fresh_deletes_a_run_and_its_reports_but_not_the_lock(tmp_path):
  workdir = _fake_run(tmp_path / "run")
  (workdir / ".config.json.abc123.tmp").write_text("torn")
  # What mmsafe's commands write beside a run: TensorBoard events, index.md,
  # and reports such as experiments.reproduce's cached evaluation.
  for name in ("events.out.tfevents.1765000000.host.mmsafe-training", "index.md",
               "index.json", "reproduce.json"):
    (workdir / name).write_text("x")
  with WorkdirLock(str(workdir)):
    workdir_lib.clear_workdir(str(workdir))
    assert os.listdir(workdir) == [workdir_lib.LOCK_NAME]
  workdir_lib.clear_workdir(str(tmp_path / "missing"))  # Nothing to delete.


# ---------------------------------------------------------------------------
# Lock files that are no lock


def _write_lock(workdir: Path, record, *, age: float = 0.0) -> Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / workdir_lib.LOCK_NAME
  path.write_text(record if isinstance(record, str) else json.dumps(record))
  if age:
    old = time.time() - age
    os.utime(path, (old, old))
  return path


def _record(pid, host=None):
  return {"pid": pid, "host": socket.gethostname() if host is None else host,
          "started": time.time()}


@pytest.mark.parametrize("pid", [0, -5, "123", 1.5, True, None, 1 << 40])
def test_a_lock_whose_pid_is_no_process_id_is_refused_in_one_line(tmp_path, pid):
  path = _write_lock(tmp_path, _record(pid))
  with pytest.raises(ValueError) as error:
    with WorkdirLock(str(tmp_path)):
      pass
  message = str(error.value)
  assert f"lock {path} holds pid {pid!r}, expected a process id" in message, message
  assert "\n" not in message
  assert json.loads(path.read_text())["pid"] == pid  # Left as it was.


def test_a_lock_that_is_a_directory_is_refused_in_one_line(tmp_path):
  (tmp_path / workdir_lib.LOCK_NAME).mkdir()
  with pytest.raises(ValueError, match=r"lock .*\.lock is a directory, expected a lock file"):
    with WorkdirLock(str(tmp_path)):
      pass
  assert (tmp_path / workdir_lib.LOCK_NAME).is_dir()


def test_a_lock_that_is_a_symlink_is_refused_and_its_target_untouched(tmp_path):
  target = tmp_path / "elsewhere.txt"
  target.write_text("keep")
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / workdir_lib.LOCK_NAME).symlink_to(target)
  with pytest.raises(ValueError, match="is a symbolic link"):
    with WorkdirLock(str(tmp_path / "run")):
      pass
  assert target.read_text() == "keep"


# ---------------------------------------------------------------------------
# Stale locks


def _sleeper() -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


@pytest.mark.parametrize("record", ["", "{", '{"pid": 12'])
def test_an_empty_or_torn_lock_of_a_dead_writer_is_taken_over(tmp_path, record):
  path = _write_lock(tmp_path, record)
  with WorkdirLock(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert not path.exists()


def test_a_live_pid_with_an_old_heartbeat_is_stale_on_this_host(tmp_path):
  other = _sleeper()  # A live process that is not the writer (pid reuse).
  try:
    path = _write_lock(tmp_path, _record(other.pid), age=600)
    with WorkdirLock(str(tmp_path), stale_seconds=300):
      assert json.loads(path.read_text())["pid"] == os.getpid()
  finally:
    other.kill()
    other.wait()


def test_a_record_of_this_process_that_holds_no_lock_is_stale(tmp_path):
  # A container restart can give the new writer its predecessor's pid; the
  # predecessor held no kernel lock any more.
  path = _write_lock(tmp_path, _record(os.getpid()))
  with WorkdirLock(str(tmp_path)):
    assert json.loads(path.read_text())["started"] > time.time() - 60


def test_a_live_pid_with_a_fresh_heartbeat_is_in_use(tmp_path):
  other = _sleeper()
  try:
    _write_lock(tmp_path, _record(other.pid))
    with pytest.raises(WorkdirInUse, match=f"in use by pid {other.pid} on host "):
      with WorkdirLock(str(tmp_path)):
        pass
  finally:
    other.kill()
    other.wait()


_HOLDER = """
import sys, time
from mmsafe.train.workdir import WorkdirLock
with WorkdirLock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


@pytest.mark.slow
def test_a_killed_writer_releases_its_lock_at_once(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(WorkdirInUse, match=f"pid {holder.pid}"):
      with WorkdirLock(str(tmp_path)):
        pass
    os.utime(tmp_path / workdir_lib.LOCK_NAME, (0, 0))  # Even with an old heartbeat.
    with pytest.raises(WorkdirInUse, match=f"pid {holder.pid}"):
      with WorkdirLock(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with WorkdirLock(str(tmp_path)) as lock:
    assert json.loads(Path(lock.path).read_text())["pid"] == os.getpid()


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirInUse, match=f"pid {os.getpid()}"):
      with WorkdirLock(str(tmp_path)):
        pass


# ---------------------------------------------------------------------------
# Interleavings: contenders in threads (each lock opens its own file
# description, so the kernel lock excludes them as it excludes processes),
# with delays injected between the steps of taking a lock.


class _Holders:
  """Counts the contenders inside the lock at once."""

  def __init__(self):
    self.inside = self.most = self.entered = self.refused = 0
    self._mutex = threading.Lock()

  def hold(self, workdir: Path, seconds: float, start: threading.Barrier) -> None:
    start.wait()
    try:
      with WorkdirLock(str(workdir), stale_seconds=300):
        with self._mutex:
          self.inside += 1
          self.entered += 1
          self.most = max(self.most, self.inside)
        time.sleep(seconds)
        with self._mutex:
          self.inside -= 1
    except WorkdirInUse:
      with self._mutex:
        self.refused += 1


def _race(workdir: Path, contenders: int = 4, hold: float = 0.3) -> _Holders:
  holders = _Holders()
  start = threading.Barrier(contenders)
  threads = [threading.Thread(target=holders.hold, args=(workdir, hold, start))
             for _ in range(contenders)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(timeout=60)
  return holders


def _delayed(monkeypatch, name: str, seconds: float) -> None:
  """Makes `WorkdirLock.<name>` sleep after doing its work: 0 s at the first
  call, `seconds` at the second, twice that at the third, ... (staggered, so
  that one contender acts on what it saw while another has acted already)."""
  original = getattr(WorkdirLock, name)
  calls = iter(range(1000))
  mutex = threading.Lock()

  def slow(self, *args, **kwargs):
    result = original(self, *args, **kwargs)
    with mutex:
      call = next(calls)
    time.sleep(call * seconds)
    return result

  monkeypatch.setattr(WorkdirLock, name, slow)


@pytest.mark.parametrize("step", ["_read_holder", "_is_stale"])
@pytest.mark.parametrize("lock_file", ["missing", "empty and old", "torn and old",
                                       "of a dead pid"])
def test_contenders_on_a_stale_lock_get_one_writer(tmp_path, monkeypatch, lock_file, step):
  dead = _sleeper()
  dead.kill()
  dead.wait()
  records = {"empty and old": "", "torn and old": '{"pid', "of a dead pid": _record(dead.pid)}
  if lock_file in records:
    _write_lock(tmp_path, records[lock_file], age=600)
  _delayed(monkeypatch, step, 0.1)
  holders = _race(tmp_path)
  assert holders.most == 1 and holders.entered >= 1, vars(holders)
  assert holders.entered + holders.refused == 4


@pytest.mark.parametrize("step", ["_open", "_write_record"])
def test_contenders_delayed_inside_taking_the_lock_get_one_writer(tmp_path, monkeypatch, step):
  _write_lock(tmp_path, "", age=600)
  _delayed(monkeypatch, step, 0.1)
  holders = _race(tmp_path)
  assert holders.most == 1 and holders.entered >= 1, vars(holders)


def test_a_contender_that_opened_a_lock_being_released_retakes_the_new_one(tmp_path,
                                                                          monkeypatch):
  # The holder releases (removes the file) between a contender's open and its
  # kernel lock: the contender finds its file gone, opens the new one, and is
  # refused while a third writer holds it.
  opened, released = threading.Event(), threading.Event()
  original = WorkdirLock._open

  def open_then_wait(self):
    result = original(self)
    if not opened.is_set():
      opened.set()
      released.wait(10)
    return result

  holder = WorkdirLock(str(tmp_path)).__enter__()
  monkeypatch.setattr(WorkdirLock, "_open", open_then_wait)
  outcome = []

  def contend():
    try:
      with WorkdirLock(str(tmp_path)):
        outcome.append("entered")
    except WorkdirInUse:
      outcome.append("refused")

  late = threading.Thread(target=contend)
  late.start()
  assert opened.wait(10)
  holder.__exit__(None, None, None)
  monkeypatch.setattr(WorkdirLock, "_open", original)
  third = WorkdirLock(str(tmp_path)).__enter__()
  released.set()
  late.join(10)
  third.__exit__(None, None, None)
  assert outcome == ["refused"]
