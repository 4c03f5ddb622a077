"""Launch scripts: `--dry_run` prints the exact commands (local, SLURM, TPU pod)."""

import os
from pathlib import Path
import shlex
import subprocess
import sys

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--config=experiments/configs/embedded.py", "--workdir=/shared/runs/crmt x",
         "--config.method=crmt"]


def _lines(cmd: list[str], env: dict | None = None) -> list[list[str]]:
  """The printed commands of a dry run, each split as a shell would."""
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                        env={**os.environ, **(env or {})})
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def test_local_one_process_dry_run():
  assert _lines(["bash", "launch/local.sh", "--dry_run", "--python=python3", "--", *TRAIN]) == [
      ["python3", "-m", "experiments.train", *TRAIN]]


def test_local_multi_process_dry_run_forms_one_distributed_job(tmp_path):
  lines = _lines(["bash", "launch/local.sh", "--num_processes=3", "--cpu_devices=4",
                  "--port=23456", f"--log_dir={tmp_path}", "--python=python3", "--dry_run",
                  "--", *TRAIN])
  assert len(lines) == 3
  for i, line in enumerate(lines):
    expected = ["env", "XLA_FLAGS=--xla_force_host_platform_device_count=4", "python3", "-m",
                "experiments.train", *TRAIN, "--config.parallel=jit", "--distributed=on",
                "--coordinator_address=127.0.0.1:23456", "--num_processes=3",
                f"--process_id={i}"]
    if i > 0:
      expected += [">", f"{tmp_path}/process_{i}.log", "2>&1"]
    assert line == expected


def test_local_rejects_unknown_options():
  proc = subprocess.run(["bash", "launch/local.sh", "--gpus=2", "--", *TRAIN], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "unknown option --gpus=2" in proc.stderr


def test_slurm_submit_dry_run():
  lines = _lines(["bash", "launch/slurm_submit.sh", "--nodes=2", "--gpus_per_node=8",
                  "--partition=gpu", "--time=4:00:00", "--dry_run", "--", *TRAIN])
  assert lines == [[
      "sbatch", "--job-name=mmsafe", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
      "--cpus-per-task=8", "--time=4:00:00", f"--chdir={REPO}", "--partition=gpu",
      "launch/slurm.sbatch", *TRAIN, "--config.parallel=jit"]]


def test_slurm_batch_script_dry_run_runs_one_process_per_gpu_through_srun():
  lines = _lines(["bash", "launch/slurm.sbatch", *TRAIN, "--config.parallel=jit", "--dry_run"],
                 env={"PYTHON": "python3"})
  assert lines == [["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "python3", "-m",
                    "experiments.train", *TRAIN, "--config.parallel=jit", "--distributed=auto"]]
  script = (REPO / "launch" / "slurm.sbatch").read_text()
  for directive in ("#SBATCH --requeue", "#SBATCH --signal=TERM@120"):
    assert directive in script
  assert 'scontrol requeue "$SLURM_JOB_ID"' in script


def test_tpu_pod_dry_run_creates_installs_and_runs_on_all_workers():
  lines = _lines([sys.executable, "launch/tpu_pod.py", "--tpu=pod", "--zone=us-central2-b",
                  "--project=proj", "--create", "--accelerator_type=v4-32", "--spot", "--setup",
                  "--dry_run", "--", *TRAIN])
  where = ["--zone=us-central2-b", "--project=proj"]
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert lines[0] == [*gcloud, "create", "pod", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot", *where]
  assert lines[1] == ["tar", "--exclude=.git", "-czf", "/tmp/mmsafe-src.tar.gz", "-C", str(REPO),
                      "."]
  assert lines[2] == [*gcloud, "scp", "/tmp/mmsafe-src.tar.gz", "pod:~/mmsafe-src.tar.gz",
                      "--worker=all", *where]
  assert lines[3][:6] == [*gcloud, "ssh", "pod"] and lines[3][6:] == [
      "--worker=all", lines[3][7], *where]
  install = lines[3][7].removeprefix("--command=").split(" && ")
  assert "bash launch/setup.sh" in install and "python -m pip install -q 'jax[tpu]'" in install
  assert lines[4][:7] == [*gcloud, "ssh", "pod", "--worker=all"] and lines[4][8:] == where
  remote = lines[4][7].removeprefix("--command=").split(" && ")
  assert remote[:2] == ["cd ~/mmsafe", ". ~/mmsafe-venv/bin/activate"]
  assert shlex.split(remote[2]) == ["python", "-m", "experiments.train", *TRAIN,
                                    "--config.parallel=jit", "--distributed=on"]
  assert len(lines) == 5


def test_tpu_pod_background_run_only():
  lines = _lines([sys.executable, "launch/tpu_pod.py", "--tpu=pod", "--zone=z", "--background",
                  "--parallel=pmap", "--dry_run", "--", *TRAIN])
  assert len(lines) == 1
  command = lines[0][7].removeprefix("--command=")
  nohup = shlex.split(command)
  assert nohup[:3] == ["nohup", "bash", "-c"] and nohup[4:] == [
      ">", "~/mmsafe-train.log", "2>&1", "<", "/dev/null", "&"]
  assert shlex.split(nohup[3].split(" && ")[2])[-2:] == ["--config.parallel=pmap",
                                                        "--distributed=on"]


@pytest.mark.parametrize("argv", [["--zone=z", "--", *TRAIN], ["--tpu=pod", "--zone=z"]])
def test_tpu_pod_needs_a_name_and_train_flags(argv):
  proc = subprocess.run([sys.executable, "launch/tpu_pod.py", "--dry_run", *argv], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 2
