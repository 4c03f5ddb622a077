"""The accelerator benchmark script runs unchanged on a CPU with `--smoke`: every
part reports a figure, and a part that fails is reported as failed, not lost."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
NAMES = ["train resnet18 float32", "train resnet18 bfloat16", "train lip_resnet float32",
         "train lip_resnet bfloat16", "pgd-4 (paper_reference)", "certify (local, resnet18)",
         "main job (first run)"]


def bench_gpu(out, *flags, timeout=1800):
  return subprocess.run([sys.executable, "-m", "experiments.bench_gpu", f"--out={out}", *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_smoke_run_measures_every_part(tmp_path):
  proc = bench_gpu(tmp_path, "--smoke", "--timeout_s=900")
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())["results"]
  assert [r["name"] for r in results] == NAMES
  for result in results:
    assert "error" not in result, result
    assert result["wall_s"] > 0
  for result in results[:6]:
    assert result["samples_per_s"] > 0, result
  assert {r["encoder"] for r in results[:4]} == {"resnet18", "lip_resnet"}
  assert {r["dtype"] for r in results[:4]} == {"float32", "bfloat16"}
  table = (tmp_path / "results.md").read_text()
  assert all(f"| {name} |" in table for name in NAMES)
  assert table.strip() in proc.stdout


def test_a_failing_part_is_reported_and_fails_the_run(tmp_path):
  proc = bench_gpu(tmp_path, "--smoke", "--parts=certify", "--timeout_s=1")
  assert proc.returncode == 1
  assert "| certify (local, resnet18) | failed: timed out after 1 s |" in proc.stdout


def test_unknown_part_is_refused_by_name(tmp_path):
  proc = bench_gpu(tmp_path, "--parts=train,nope")
  assert proc.returncode != 0
  assert "--parts: expected names from" in proc.stderr and "'nope'" in proc.stderr
