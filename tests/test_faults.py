"""Faults in a run's workdir: damaged checkpoints (training falls back to the
newest one that verifies and ends bit-identical; evaluation refuses), a
checkpoint that does not match the config, a second writer, and a rerun with
another config. Each fault ends in a bit-identical recovery or a clear error
before anything is written."""

import json
import logging
import os
from pathlib import Path
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmsafe.train import loop, restore
from mmsafe.train import progress as progress_lib
from mmsafe.train import workdir as workdir_lib
from mmsafe.train.checkpoint import (DIGESTS, FILES_MANIFEST, CheckpointMismatch,
                                     DamagedCheckpoint)
from tests.conftest import mfeat_config

REPO = Path(__file__).resolve().parents[1]
LAST, EARLIER = 42, 21  # Two epochs of 21 steps, a checkpoint every 21 steps.


def _config(method: str = "jt"):
  config = mfeat_config(method, num_epochs=2)
  config.checkpoint_every_steps = EARLIER
  return config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """(workdir, results, latest variables) of a finished two-epoch JT run with
  checkpoints at steps 21 and 42."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  results = loop.train_and_evaluate(_config(), str(workdir))
  latest = restore.restore_run(str(workdir), which="latest")[2]
  return workdir, results, latest


@pytest.fixture
def run_copy(finished_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(finished_run[0], workdir)
  return workdir


def _snapshot(workdir: Path) -> dict:
  """Relative path -> (size, mtime) of every file: what 'nothing written' compares."""
  return {str(p.relative_to(workdir)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(workdir.rglob("*")) if p.is_file()}


def _largest_file(directory: Path) -> Path:
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(path: Path) -> None:
  path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_digests(checkpoint: Path, edit) -> None:
  """Replaces the digests recorded in a checkpoint's progress by `edit(digests)`."""
  path = checkpoint / "progress" / "metadata"
  progress = json.loads(path.read_text())
  progress[DIGESTS] = edit(progress[DIGESTS])
  path.write_text(json.dumps(progress))


def _flip_byte(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


DAMAGE = {
    "truncated data file": lambda c: _truncate(_largest_file(c / "train_state")),
    "deleted data file": lambda c: _largest_file(c / "train_state").unlink(),
    "emptied manifest.ocdbt": lambda c: (c / "train_state" / "manifest.ocdbt").write_bytes(b""),
    "emptied _METADATA": lambda c: (c / "train_state" / "_METADATA").write_bytes(b""),
    "deleted _METADATA": lambda c: (c / "train_state" / "_METADATA").unlink(),
    "deleted _METADATA of an unsealed checkpoint": lambda c: (
        (c / FILES_MANIFEST).unlink(), (c / "train_state" / "_METADATA").unlink()),
    "truncated progress JSON": lambda c: _truncate(c / "progress" / "metadata"),
    "flipped byte in the best model": lambda c: _flip_byte(_largest_file(c / "best")),
    "flipped byte in the train state": lambda c: _flip_byte(_largest_file(c / "train_state")),
    "deleted file checksums and digests": lambda c: (
        (c / FILES_MANIFEST).unlink(), _edit_digests(c, lambda digests: None)),
    # A writer killed between writing a checkpoint and recording its files: the
    # array digests alone catch the damage.
    "flipped byte in an unsealed checkpoint": lambda c: (
        (c / FILES_MANIFEST).unlink(), _flip_byte(_largest_file(c / "best"))),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_training_falls_back_from_a_damaged_checkpoint_bit_identically(
    finished_run, run_copy, damage, caplog):
  _, results, latest = finished_run
  DAMAGE[damage](run_copy / "checkpoints" / str(LAST))
  with caplog.at_level(logging.WARNING):
    rerun = loop.train_and_evaluate(_config(), str(run_copy))
  assert f"skipped damaged checkpoint {run_copy / 'checkpoints' / str(LAST)}" in caplog.text
  assert (run_copy / progress_lib.DAMAGED_DIR / str(LAST)).is_dir()
  for key in results:
    if key != "train_seconds_this_run":
      assert rerun[key] == results[key], key
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         restore.restore_run(str(run_copy), which="latest")[2], latest)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["flipped byte in the best model", "emptied _METADATA",
                                    "deleted _METADATA", "deleted file checksums and digests"])
def test_evaluation_refuses_a_damaged_checkpoint_naming_it(run_copy, damage):
  DAMAGE[damage](run_copy / "checkpoints" / str(LAST))
  before = _snapshot(run_copy)
  with pytest.raises(DamagedCheckpoint, match=f"checkpoint {run_copy}/checkpoints/{LAST}: "):
    restore.restore_run(str(run_copy))
  assert _snapshot(run_copy) == before


def _replace_by_copy_of(checkpoints: Path, step: int, source: int) -> None:
  shutil.rmtree(checkpoints / str(step))
  shutil.copytree(checkpoints / str(source), checkpoints / str(step))


@pytest.mark.parametrize("sealed", [True, False])
def test_a_checkpoint_replaced_by_a_copy_of_another_step_is_damaged(run_copy, sealed):
  checkpoints = run_copy / "checkpoints"
  _replace_by_copy_of(checkpoints, LAST, EARLIER)
  if not sealed:
    (checkpoints / str(LAST) / FILES_MANIFEST).unlink()
  before = _snapshot(run_copy)
  with pytest.raises(DamagedCheckpoint, match=rf"checkpoint {checkpoints}/{LAST}: holds step "
                                              rf"{EARLIER}, not {LAST}"):
    restore.restore_run(str(run_copy))
  assert _snapshot(run_copy) == before


@pytest.mark.slow
def test_training_falls_back_from_a_copied_checkpoint_and_finishes_identically(
    finished_run, run_copy, caplog):
  _, results, latest = finished_run
  _replace_by_copy_of(run_copy / "checkpoints", LAST, EARLIER)
  (run_copy / "results.json").unlink()
  with caplog.at_level(logging.WARNING):
    rerun = loop.train_and_evaluate(_config(), str(run_copy))
  assert f"holds step {EARLIER}, not {LAST}" in caplog.text
  assert rerun["test_accuracy"] == results["test_accuracy"]
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         restore.restore_run(str(run_copy), which="latest")[2], latest)


def test_a_rerun_after_a_kill_past_the_test_metrics_logs_them_once(finished_run, run_copy):
  # Killed after the test metrics were logged, before results.json was written.
  (run_copy / "results.json").unlink()
  lines = (run_copy / "metrics.jsonl").read_text().splitlines()
  loop.train_and_evaluate(_config(), str(run_copy))
  rerun_lines = (run_copy / "metrics.jsonl").read_text().splitlines()
  assert rerun_lines == lines
  assert sum('"test/accuracy"' in line for line in rerun_lines) == 1


def test_an_unsealed_checkpoint_restores_and_its_array_digest_is_checked(finished_run, run_copy):
  checkpoint = run_copy / "checkpoints" / str(LAST)
  (checkpoint / FILES_MANIFEST).unlink()
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         restore.restore_run(str(run_copy), which="latest")[2], finished_run[2])
  _edit_digests(checkpoint, lambda digests: {**digests, "best": "00000000"})
  with pytest.raises(DamagedCheckpoint, match=r"'best' fails its digest \(recorded 00000000"):
    restore.restore_run(str(run_copy))


@pytest.mark.slow
def test_training_refuses_when_no_checkpoint_verifies(run_copy):
  for step in (LAST, EARLIER):
    DAMAGE["truncated data file"](run_copy / "checkpoints" / str(step))
  before = _snapshot(run_copy)
  with pytest.raises(DamagedCheckpoint, match=r"no checkpoint verifies: 42: .*; 21: .*--fresh"):
    loop.train_and_evaluate(_config(), str(run_copy))
  assert _snapshot(run_copy) == before


def test_a_checkpoint_of_another_model_names_the_first_differing_parameter(run_copy):
  path = run_copy / "config.json"
  config = json.loads(path.read_text())
  config["model"]["encoders"]["fou"]["widths"] = [64, 128]
  path.write_text(json.dumps(config))
  with pytest.raises(CheckpointMismatch) as error:
    restore.restore_run(str(run_copy))
  message = str(error.value)
  assert "encoders_fou/Dense_0/bias has shape (256,) in the checkpoint, (64,) from the config" in (
      message), message
  assert "\n" not in message


def _sleeper() -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])


def _write_lock(workdir: Path, pid: int, host: str) -> Path:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / workdir_lib.LOCK_NAME
  path.write_text(json.dumps({"pid": pid, "host": host, "started": time.time()}))
  return path


def test_a_second_writer_is_refused_before_touching_anything(run_copy):
  holder = _sleeper()
  try:
    _write_lock(run_copy, holder.pid, socket.gethostname())
    before = _snapshot(run_copy)
    with pytest.raises(workdir_lib.WorkdirInUse,
                       match=f"workdir: in use by pid {holder.pid} on host "
                             f"{socket.gethostname()}"):
      loop.train_and_evaluate(_config(), str(run_copy))
    assert _snapshot(run_copy) == before
  finally:
    holder.kill()
    holder.wait()


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = _sleeper()
  dead.kill()
  dead.wait()
  path = _write_lock(tmp_path, dead.pid, socket.gethostname())
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert json.loads(path.read_text())["pid"] == os.getpid()
  assert not path.exists()


def test_a_lock_from_another_host_is_stale_only_without_heartbeat(tmp_path):
  path = _write_lock(tmp_path, 1, "another-host")
  with pytest.raises(workdir_lib.WorkdirInUse, match="pid 1 on host another-host"):
    with workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=300):
      pass
  old = time.time() - 600
  os.utime(path, (old, old))
  with workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=300):
    assert json.loads(path.read_text())["host"] == socket.gethostname()


def test_the_lock_holder_keeps_its_heartbeat(tmp_path):
  with workdir_lib.WorkdirLock(str(tmp_path), heartbeat_seconds=0.05) as lock:
    old = time.time() - 600
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - os.path.getmtime(lock.path) < 60


@pytest.mark.parametrize("field, value, listed", [
    ("method", "mixup", 'method: "jt" in the workdir, "mixup" now'),
    ("num_epochs", 1, "num_epochs: 2 in the workdir, 1 now"),
    ("model.encoders.fou.widths", (64, 128), "model.encoders.fou.widths: [256, 128] in the "
                                             "workdir, [64, 128] now"),
])
def test_a_rerun_with_another_config_is_refused_before_writing(run_copy, field, value, listed):
  config = _config()
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  before = _snapshot(run_copy)
  with pytest.raises(ValueError, match="holds a different run") as error:
    loop.train_and_evaluate(config, str(run_copy))
  assert listed in str(error.value)
  assert _snapshot(run_copy) == before


def test_operational_fields_may_change_on_a_rerun(finished_run, run_copy):
  config = _config()
  config.log_every_steps = 7
  config.checkpoint_every_seconds = 5.0
  config.eval_batch_size = 100
  rerun = loop.train_and_evaluate(config, str(run_copy))
  assert rerun["test_accuracy"] == finished_run[1]["test_accuracy"]


@pytest.mark.slow
def test_fresh_replaces_the_run_and_results_describe_the_new_model(run_copy):
  (run_copy / "robustness").mkdir()
  (run_copy / "robustness" / "old_report.md").write_text("stale")
  results = loop.train_and_evaluate(_config("ojt"), str(run_copy), fresh=True)
  stored = json.loads((run_copy / "results.json").read_text())
  assert stored["method"] == results["method"] == "ojt"
  assert json.loads((run_copy / "config.json").read_text())["method"] == "ojt"
  assert not (run_copy / "robustness").exists()
  assert "w_tilde" in restore.restore_run(str(run_copy))[2]["params"]["head"]


@pytest.mark.slow
def test_the_cli_refuses_a_second_writer_in_one_line(run_copy):
  holder = _sleeper()
  try:
    _write_lock(run_copy, holder.pid, socket.gethostname())
    process = subprocess.run(
        [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/embedded.py:runlocal", f"--workdir={run_copy}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
  finally:
    holder.kill()
    holder.wait()
  assert process.returncode == 1, process.stderr
  assert f"in use by pid {holder.pid}" in process.stderr
  assert "Traceback" not in process.stderr, process.stderr
