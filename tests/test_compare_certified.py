"""`experiments.compare_certified` end to end on a smoke budget: the
certificate-aware CRMT with Lipschitz encoders, sound radii checked by PGD, and
a rerun that resumes from each run's stored certification."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compare_certified(workdir, methods: str, encoders: str) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "experiments.compare_certified",
             "--config=experiments/configs/embedded.py:mfeat,runlocal",
             f"--methods={methods}", f"--encoders={encoders}", "--seeds=0",
             "--max_examples=48", "--attack_steps=20", "--attack_restarts=1",
             f"--workdir={workdir}"]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def test_compare_certified_writes_the_table_and_no_sound_radius_breaks(tmp_path):
  proc = compare_certified(tmp_path, "crmt_cert", "free,lipschitz")
  with open(tmp_path / "certified.json") as f:
    report = json.load(f)
  [row] = report["rows"]  # crmt_cert trains with Lipschitz encoders only
  assert (row["encoders"], row["method"]) == ("lipschitz", "crmt_cert")
  assert report["radii"] == [0.25, 0.5, 1.0, 2.0]
  assert row["seeds"] == 1 and row["clean"]["std"] == 0.0
  assert row["clean"]["mean"] > 0.5
  assert row["attacked"] > 0 and row["broken"] == 0  # sound radii are never broken
  assert row["certified"]["0.5"]["mean"] > 0
  curve = row["curve"]
  assert len(curve) == len(report["grid"]) and curve[0] <= row["clean"]["mean"] + 1e-6
  assert all(a >= b for a, b in zip(curve, curve[1:]))  # certified accuracy falls with r
  # 1-Lipschitz encoders own a bound of 1.
  assert all(b <= 1.0 + 1e-5 for b in row["encoder_lipschitz"].values())
  table = (tmp_path / "certified.md").read_text()
  assert "| lipschitz | crmt_cert |" in table and "sound cert. acc. r=0.5" in table
  assert (tmp_path / "certified_accuracy.png").stat().st_size > 10_000
  assert "sound certificates checked by l2-PGD" in proc.stdout

  # A rerun resumes: each run's certification is read back from its workdir
  # while the settings are unchanged (the marker below would be recomputed).
  cache = tmp_path / "lipschitz" / "crmt_cert" / "seed_0" / "certified_sound.json"
  cached = json.loads(cache.read_text())
  assert cached["settings"]["attack_steps"] == 20
  cached["result"]["mean_radius"] = 123.0
  cache.write_text(json.dumps(cached))
  compare_certified(tmp_path, "crmt_cert", "lipschitz")
  rerun = json.loads((tmp_path / "certified.json").read_text())
  assert rerun["rows"][0]["mean_radius"]["mean"] == 123.0
