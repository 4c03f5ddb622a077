"""Preemption-safe training: a run killed with SIGKILL mid-run, or stopped by
SIGTERM (checkpoint at the next step boundary, exit status 143), and rerun with the
same command ends bit-identical to an uninterrupted run: train state, metrics
log and results. The run is CRMT-Mix (random mixup at every step, two stages),
so the RNG, the data position and the CRMT stage must all come back.
"""

import functools
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.test_parallel import read_train_state

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 5  # 1,400 training examples // 256
TOTAL_STEPS = 9 * STEPS_PER_EPOCH
CHECKPOINT_EVERY = 10

CONFIG_FILE = """
from tests.test_preemption import preemption_config


def get_config():
  return preemption_config()
"""


def preemption_config():
  """CRMT-Mix on mfeat with small MLP encoders: step 1 for one epoch (5 steps of
  256), then step 2 for 8 epochs; checkpoints every 10 steps and at the end of
  each stage (steps 5, 10, 20, 30, 40, 45)."""
  from experiments.configs import embedded
  config = embedded.get_config()
  config.method = "crmt_mix"
  config.dataset = "mfeat"
  mlp = {"name": "mlp", "widths": (32, 16)}
  config.model.encoders = {"pix": mlp, "fou": mlp}
  config.batch_size = 256
  config.num_epochs = 1
  config.optimizer.decay_epochs = ()
  config.step2.num_epochs = 8
  config.log_every_steps = 3  # logging boundaries fall between checkpoints
  config.checkpoint_every_steps = CHECKPOINT_EVERY
  config.checkpoint_max_to_keep = 3
  return config


@functools.cache
def _cache_dir() -> str:
  """One persistent compilation cache for this module's subprocesses."""
  return tempfile.mkdtemp(prefix="mmsafe_preemption_jax_cache_")


def _command(config_file, workdir) -> list[str]:
  return [sys.executable, "-m", "experiments.train", f"--config={config_file}",
          f"--workdir={workdir}"]


def _env() -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=_cache_dir(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  return env


def _checkpoint_steps(workdir) -> list[int]:
  """Finished checkpoints (orbax renames a checkpoint's directory to its step last)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _run_until_checkpoint(config_file, workdir, min_step: int, sig: int):
  """Starts the training command, sends `sig` as soon as a checkpoint at step >=
  `min_step` exists, and returns `(return code, stdout, stderr)`."""
  proc = subprocess.Popen(_command(config_file, workdir), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while not any(step >= min_step for step in _checkpoint_steps(workdir)):
      if proc.poll() is not None or time.monotonic() > deadline:
        out, err = proc.communicate()
        pytest.fail(f"the run ended (status {proc.returncode}) or timed out before a "
                    f"checkpoint at step >= {min_step}:\n{err[-3000:]}")
      time.sleep(0.005)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
  finally:
    if proc.poll() is None:
      proc.kill()
  return proc.returncode, out, err


def _finish(config_file, workdir) -> None:
  proc = subprocess.run(_command(config_file, workdir), cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _assert_bit_identical(reference_dir, workdir) -> None:
  reference, resumed = read_train_state(reference_dir), read_train_state(workdir)
  assert sorted(reference) == sorted(resumed)
  for key in reference:
    np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
  with open(os.path.join(reference_dir, "metrics.jsonl")) as f:
    reference_lines = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  assert lines == reference_lines
  with open(os.path.join(reference_dir, "results.json")) as f:
    reference_results = json.load(f)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  for results_ in (reference_results, results):
    results_.pop("train_seconds_this_run")
  assert results == reference_results


@pytest.fixture(scope="module")
def setup_runs(tmp_path_factory):
  """The config file and an uninterrupted reference run (same command)."""
  root = tmp_path_factory.mktemp("preemption")
  config_file = root / "preemption_config.py"
  config_file.write_text(CONFIG_FILE)
  _finish(config_file, root / "reference")
  assert _checkpoint_steps(root / "reference")[-1] == TOTAL_STEPS
  return config_file, root / "reference"


@pytest.mark.slow
def test_kill9_mid_run_then_rerun_is_bit_identical(setup_runs, tmp_path):
  config_file, reference = setup_runs
  workdir = tmp_path / "run"
  # Killed in CRMT step 2 (which starts at step 5), after its first checkpoints.
  status, _, _ = _run_until_checkpoint(config_file, workdir, CHECKPOINT_EVERY, signal.SIGKILL)
  assert status == -signal.SIGKILL
  assert not (workdir / "results.json").exists(), "killed too late: the run had finished"
  assert STEPS_PER_EPOCH < _checkpoint_steps(workdir)[-1] < TOTAL_STEPS
  _finish(config_file, workdir)
  _assert_bit_identical(reference, workdir)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_then_rerun_is_bit_identical(
    setup_runs, tmp_path):
  config_file, reference = setup_runs
  workdir = tmp_path / "run"
  status, out, _ = _run_until_checkpoint(config_file, workdir, 1, signal.SIGTERM)
  assert status == 143
  stopped = json.loads(out)
  assert stopped["preempted"] and 0 < stopped["step"] < TOTAL_STEPS
  assert _checkpoint_steps(workdir)[-1] == stopped["step"]  # saved where it stopped
  assert not (workdir / "results.json").exists()
  _finish(config_file, workdir)
  _assert_bit_identical(reference, workdir)
