"""Data parallelism: jit-sharded and pmap training equal single-device training on
the same global batch (8 fake CPU devices, batch norm included), and a 2-process
run on localhost through `jax.distributed.initialize` (gloo CPU collectives)
matches too.

Runs that need several devices or processes start in subprocesses: the device
count (`XLA_FLAGS`) is fixed when JAX starts.
"""

import functools
import json
import os
from pathlib import Path
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODES = ("none", "jit", "pmap")
# Methods with a second stage (CRMT step 2) or a callback (GB's re-weighting),
# also run in every mode.
STAGED_METHODS = ("crmt", "gb")

# A config file for `experiments.train` (`--config=<file>:<parallel mode>,<pix encoder>`).
CONFIG_FILE = """
from tests.test_parallel import tiny_config


def get_config(arg):
  return tiny_config(*arg.split(","))
"""


def tiny_config(parallel: str, pix: str = "resnet", method: str = "jt"):
  """One epoch (21 steps of 64) of `method` on mfeat with a small MLP on the Fourier
  view and, on the digit images, a one-block ResNet (`pix="resnet"`: batch norm)
  or an MLP (`"mlp"`: compiles in a fraction of the time). Two-stage methods
  add one epoch of step 2; GB re-weighs after every epoch."""
  from experiments.configs import embedded
  config = embedded.get_config()
  config.method = method
  config.step2.num_epochs = 1
  config.method_kwargs.gb_super_epoch = 1
  config.dataset = "mfeat"
  config.num_epochs = 1
  config.optimizer.decay_epochs = ()
  mlp = {"name": "mlp", "widths": (32,)}
  config.model.encoders = {
      "pix": {"name": "resnet18", "stage_sizes": (1,), "widths": (8,)} if pix == "resnet" else mlp,
      "fou": mlp}
  config.log_every_steps = 7
  config.parallel = parallel
  return config


def read_train_state(workdir) -> dict[str, np.ndarray]:
  """The whole train state (parameters, batch-norm statistics, optimizer state,
  step, RNG) of a run's latest checkpoint, as `{key path: array}`, read from the
  checkpoint's own metadata (no model needed; any device layout)."""
  import jax
  import orbax.checkpoint as ocp
  directory = os.path.join(workdir, "checkpoints")
  step = max(int(name) for name in os.listdir(directory) if name.isdigit())
  path = os.path.join(directory, str(step), "train_state")
  checkpointer = ocp.StandardCheckpointer()
  metadata = checkpointer.metadata(path).item_metadata.tree
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  state = checkpointer.restore(path, target)
  checkpointer.close()
  return {jax.tree_util.keystr(key): np.asarray(x)
          for key, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def train_all_modes(root: str) -> None:
  """(In a subprocess with 8 devices.) Trains `tiny_config(mode)` for each mode and
  saves the final train state to `<root>/<mode>.npz`."""
  import jax
  from mmsafe.train import loop
  assert jax.device_count() == 8, jax.devices()
  for name, config in [*((mode, tiny_config(mode)) for mode in MODES),
                       ("none_mlp", tiny_config("none", "mlp")),
                       *((f"{method}_{mode}", tiny_config(mode, "mlp", method))
                         for method in STAGED_METHODS for mode in MODES)]:
    workdir = os.path.join(root, name)
    loop.train_and_evaluate(config, workdir)
    np.savez(os.path.join(root, f"{name}.npz"), **read_train_state(workdir))


# One persistent compilation cache for this module's subprocesses: each program
# (the model's init above all) compiles once, not once per run.
@functools.cache
def _cache_dir() -> str:
  return tempfile.mkdtemp(prefix="mmsafe_parallel_jax_cache_")


def _env(devices: int) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), JAX_COMPILATION_CACHE_DIR=_cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _assert_runs_match(reference_dir, reference: dict, workdir, variables: dict) -> None:
  """Train states equal to float tolerance, metrics.jsonl lines likewise."""
  assert sorted(reference) == sorted(variables)
  for key in reference:
    if np.issubdtype(reference[key].dtype, np.floating):
      np.testing.assert_allclose(variables[key], reference[key], rtol=1e-5, atol=1e-5,
                                 err_msg=key)
    else:  # step, RNG key, optimizer counts
      np.testing.assert_array_equal(variables[key], reference[key], err_msg=key)
  ref_lines, lines = _metrics(reference_dir), _metrics(workdir)
  assert [line["step"] for line in ref_lines] == [line["step"] for line in lines]
  for ref, line in zip(ref_lines, lines):
    assert sorted(ref) == sorted(line)
    for key, value in ref.items():
      if isinstance(value, float):
        assert line[key] == pytest.approx(value, rel=1e-4, abs=2e-3), (line["step"], key)


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory):
  """`{run: train state}` of the three modes (and of "none_mlp", the reference of the
  2-process run), trained in one 8-device subprocess."""
  root = tmp_path_factory.mktemp("modes")
  proc = subprocess.run(
      [sys.executable, "-c", f"from tests.test_parallel import train_all_modes; "
       f"train_all_modes({str(root)!r})"],
      cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  names = (*MODES, "none_mlp", *(f"{m}_{mode}" for m in STAGED_METHODS for mode in MODES))
  return root, {name: dict(np.load(root / f"{name}.npz")) for name in names}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_data_parallel_training_equals_single_device_training(mode_runs, mode):
  root, runs = mode_runs
  assert any("batch_stats" in key for key in runs["none"]), "the test model has batch norm"
  assert int(runs["none"]["['step']"]) == 21
  _assert_runs_match(root / "none", runs["none"], root / mode, runs[mode])
  with open(root / mode / "results.json") as f:
    results = json.load(f)
  with open(root / "none" / "results.json") as f:
    reference = json.load(f)
  assert results["test_accuracy"] == pytest.approx(reference["test_accuracy"], abs=2 / 400)


@pytest.mark.parametrize("method", STAGED_METHODS)
@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_stages_and_callbacks_run_the_same_in_every_mode(mode_runs, method, mode):
  """CRMT's step 2 (tau~ prepared by its callback, only `a` moving) and GB's
  re-weighting callback give the single-device result under data parallelism."""
  root, runs = mode_runs
  reference, run = runs[f"{method}_none"], runs[f"{method}_{mode}"]
  if method == "crmt":
    assert int(reference["['step']"]) == 42  # step 1 and step 2
    assert any(np.all(v > 0) for k, v in reference.items() if "'crmt']['tau'" in k)
  else:
    weights = next(v for k, v in reference.items() if "'gb']['weights'" in k)
    assert not np.allclose(weights, weights[0])  # re-weighed after the epoch
  _assert_runs_match(root / f"{method}_none", reference, root / f"{method}_{mode}", run)


def test_pmap_model_averages_batch_norm_statistics_over_the_axis():
  from mmsafe.train import experiment as experiment_lib
  from mmsafe.train.parallel import AXIS
  experiment = experiment_lib.build_experiment(tiny_config("pmap"))
  assert experiment.model.encoders["pix"].axis_name is None  # evaluation / restore: unchanged
  objective_model = experiment_lib.build_model(experiment.config, experiment.method,
                                               experiment.splits["train"],
                                               batch_norm_axis_name=AXIS)
  assert objective_model.encoders["pix"].axis_name == AXIS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost_train_and_match(mode_runs, tmp_path):
  """Started as users start it: `launch/local.sh --num_processes=2` (2 fake CPU
  devices each, jit over the 4-device mesh, `jax.distributed` with gloo)."""
  root, runs = mode_runs
  config_file = tmp_path / "two_process_config.py"
  config_file.write_text(CONFIG_FILE)
  workdir = tmp_path / "run"
  proc = subprocess.run(
      ["bash", "launch/local.sh", "--num_processes=2", "--cpu_devices=2",
       f"--port={_free_port()}", f"--log_dir={tmp_path}", f"--python={sys.executable}", "--",
       f"--config={config_file}:jit,mlp", f"--workdir={workdir}"],
      cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=300)
  log = (tmp_path / "process_1.log").read_text()
  assert proc.returncode == 0, proc.stderr[-3000:] + log[-3000:]
  # Both processes trained one global run and agree; it equals the single-device run.
  results = [json.loads(out[out.index("{"):]) for out in (proc.stdout, log)]
  assert results[0]["test_accuracy"] == results[1]["test_accuracy"]
  assert results[0]["steps"] == 21
  _assert_runs_match(root / "none_mlp", runs["none_mlp"], workdir, read_train_state(workdir))


@pytest.mark.parametrize("env, tpu_vm, expected", [
    ({}, False, None),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}, False, None),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_STEP_ID": "0"}, False, "slurm"),
    ({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}, False, None),  # the batch shell, not srun
    ({"OMPI_COMM_WORLD_SIZE": "4"}, False, "mpi"),
    ({}, True, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1"}, False, "tpu"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234"}, False, "coordinator"),
])
def test_distributed_start_is_detected_from_the_environment(env, tpu_vm, expected):
  from mmsafe.train.distributed import distributed_cluster
  assert distributed_cluster(env, tpu_vm=tpu_vm) == expected
