"""`experiments.compare_probabilistic`: the table over seeds (flag-free parts in
`certified_report`) and a tiny run of the whole comparison."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import certified_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(seed_value, certified=True):
  return {"model": "m", "certificate": "sound" if certified else "none (empirical)",
          "clean (certifier)": seed_value if certified else None,
          "clean (as attacked)": seed_value, "pgd": seed_value / 2, "decoupling": 0.25,
          "missing a": 0.5, "missing b": seed_value,
          "missing certified": {"a": 0.0, "b": seed_value / 4} if certified else None,
          "l2": [seed_value, seed_value / 2] if certified else None, "changed": None,
          "seconds": 0.01 if certified else None}


def test_rows_over_seeds_have_sample_stds_and_dashes_where_uncovered():
  per_seed = [[_row(0.8), _row(0.6, False)], [_row(1.0), _row(0.8, False)]]
  rows = certified_report.probabilistic_rows(per_seed, ["a", "b"])
  sound, defence = rows
  assert sound["clean (certifier)"]["mean"] == pytest.approx(0.9)
  assert sound["clean (certifier)"]["std"] == pytest.approx(np.std([0.8, 1.0], ddof=1))
  assert [c["mean"] for c in sound["l2"]] == pytest.approx([0.9, 0.45])
  assert sound["missing certified"]["b"]["values"] == pytest.approx([0.2, 0.25])
  assert defence["clean (certifier)"] is None and defence["l2"] is None
  assert defence["missing certified"] == {"a": None, "b": None}
  table = certified_report.probabilistic_markdown(rows, [0.5, 1.0], [3], ["a", "b"])
  header, _, first, second = table.strip().split("\n")
  assert "cert. missing a" in header and "cert. 3 changed" in header
  assert "0.900 ± 0.141" in first and first.count("—") == 1  # changed entries only
  # The defence certifies nothing: dashes for the certifier, 2 radii, 1 budget,
  # 2 certified missing modalities and the certification time.
  assert second.count("—") == 1 + 2 + 1 + 2 + 1


def test_keep_sweep_table_marks_the_chosen_setting():
  scores = [{"keep": {"a": 3, "b": 1}, "voter accuracy": 0.7, "certified": {"42": 0.1}},
            {"keep": {"a": 9, "b": 1}, "voter accuracy": 0.9, "certified": {"42": 0.0}}]
  table = certified_report.keep_sweep_markdown(scores, {"a": 3, "b": 1})
  assert "| a:3,b:1 (chosen) | 0.700 | 0.100 |" in table and "| a:9,b:1 | 0.900 |" in table


@pytest.mark.slow
def test_tiny_comparison_writes_every_row_table_and_plot(tmp_path):
  workdir = tmp_path / "runs"
  command = [sys.executable, "-m", "experiments.compare_probabilistic",
             "--config=experiments/configs/embedded.py:mfeat,runlocal", "--seeds=0",
             f"--workdir={workdir}", "--max_examples=6", "--num_samples=30",
             "--num_selection=10", "--sweep_samples=20", "--sigmas=0.5",
             "--keep=fou:3,pix:12", "--keep=fou:8,pix:24", "--decoupling_rounds=1",
             "--decoupling_steps=2", "--attack_steps=2", "--eot_samples=2", "--batch_size=6",
             "--chunk_size=30"]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads((workdir / "probabilistic_mfeat.json").read_text())
  names = [row["model"] for row in report["rows"]]
  assert names[:3] == ["crmt (free encoders)", "crmt_cert (1-Lipschitz encoders)",
                       "gaussian_aug σ=0.5"]
  assert names[3].startswith("ablated fou:") and names[4] == "decoupling_at"
  assert report["changed_entries"] == [0, 1, 3]  # 0.25%, 0.5%, 1% of 316 entries
  assert len(report["keep_sweep"]) == 2 and report["keep"] in [s["keep"] for s in
                                                                report["keep_sweep"]]
  ablated = report["per_seed"][0][3]
  # Nothing certifies more than the voter gets right; an ablation never
  # certifies losing a modality; the ceiling bounds every certified count.
  assert ablated["changed"][0] == ablated["clean (certifier)"]
  assert all(v == 0.0 for v in ablated["missing certified"].values())
  assert max(ablated["changed_curve"]["counts"]) <= report["keep_ceiling"] + 1
  for name in ("certified_accuracy_l2.png", "certified_accuracy_changed.png"):
    assert (workdir / name).stat().st_size > 10_000
  assert "(chosen)" in (workdir / "keep_sweep.md").read_text()
  assert "decoupling_at | none (empirical)" in (workdir / "probabilistic_mfeat.md").read_text()
