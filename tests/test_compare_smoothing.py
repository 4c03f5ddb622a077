"""`experiments.compare_smoothing`: smoothing's best sigma per radius, the
deterministic rows read from compare_certified runs, and a smoke run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import certified_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_certified_outcomes_and_the_best_sigma_envelope():
  radii = np.asarray([0.5, 1.0])
  np.testing.assert_array_equal(certified_report.certified([0.0, 0.7, 1.0], radii),
                                [[0, 1, 1], [0, 0, 1]])
  low = np.asarray([[[1, 1], [0, 0]]], float)  # sigma 0.25: good at 0.5, nothing at 1
  high = np.asarray([[[1, 0], [1, 0]]], float)  # sigma 1: worse at 0.5, better at 1
  best, envelope = certified_report.best_sigma_envelope({0.25: low, 1.0: high})
  assert best == [0.25, 1.0]
  np.testing.assert_array_equal(envelope, [[[1, 1], [1, 0]]])


@pytest.mark.slow
def test_compare_smoothing_smoke_run_reads_the_deterministic_radii(tmp_path):
  deterministic = tmp_path / "det" / "seed_0"
  deterministic.mkdir(parents=True)
  radius = [3.0, 0.3, 0.0, 1.5, 2.5, 0.1, 0.7, 9.0, 4.0]
  result = {"correct": [1, 1, 0, 1, 1, 1, 1, 0, 1], "certify_seconds_per_example": 0.001,
            "threats": {"joint": {"radius": radius}}}
  (deterministic / "certified_sound.json").write_text(json.dumps({"result": result}))
  command = [sys.executable, "-m", "experiments.compare_smoothing",
             "--config=experiments/configs/embedded.py:mfeat,runlocal", "--sigmas=0.5",
             "--seeds=0", "--num_samples=100", "--max_examples=8",
             f"--deterministic=lip={tmp_path / 'det'}", f"--workdir={tmp_path / 'runs'}",
             "--units=normalised"]  # The radii above say no units: normalised.
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((tmp_path / "runs" / "smoothing_mfeat.json").read_text())
  assert report["num_examples"] == 8 and report["num_samples"] == 100
  assert report["units"] == "normalised input space"
  # The first 8 examples: correct and radius >= r (misclassified ones count 0).
  np.testing.assert_allclose(report["certified"]["lip"], [5 / 8, 4 / 8, 3 / 8, 2 / 8])
  smoothed = report["certified"]["smoothing σ=0.5"]
  assert report["smoothing_best"]["certified"] == smoothed and smoothed[0] > 0
  assert report["smoothing_best"]["sigma"] == [0.5] * 4
  assert (tmp_path / "runs" / "smoothing_mfeat.png").stat().st_size > 10_000
  assert "smoothing, best σ per radius" in (tmp_path / "runs" / "smoothing_mfeat.md").read_text()
