"""`experiments.compare_certified` end to end on a smoke budget: a control and a
variant tuned on validation, every threat's sound radii checked by PGD, paired
intervals over two seeds, and a rerun that resumes from each run's stored
certification."""

import json
import os
import subprocess
import sys

import pytest

from experiments import certified_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_compare(workdir, *extra) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "experiments.compare_certified",
             "--config=experiments/configs/embedded.py:mfeat,runlocal",
             "--methods=jt_cert,uni", "--variant=uni=ojt_cert:cert_uni_weight=1:cert_uni_eps=2",
             "--grid=jt_cert:cert_eps=1,2", "--control=jt_cert", "--encoders=lipschitz",
             "--seeds=0,1", "--max_examples=32", "--attack_examples=24", "--attack_steps=5",
             "--attack_restarts=1", "--config.lipschitz_optimizer.learning_rate=0.04",
             f"--workdir={workdir}", *extra]
  proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_compare_certified_tunes_certifies_every_threat_and_pairs_the_seeds(tmp_path):
  results = tmp_path / "results"
  proc = run_compare(tmp_path, f"--results_dir={results}")
  report = json.loads((results / "certified_mfeat.json").read_text())
  assert report["radii"] == [0.25, 0.5, 1.0, 2.0] and report["control"] == "jt_cert"
  rows = {row["method"]: row for row in report["rows"]}
  assert sorted(rows) == ["jt_cert", "uni"]
  uni = rows["uni"]
  assert (uni["base_method"], uni["kwargs"]["cert_uni_weight"]) == ("ojt_cert", 1.0)
  # The tuned setting is the grid point with the best validation score.
  tuning = rows["jt_cert"]["tuning"]
  best = max(tuning, key=lambda p: p["score"])
  assert len(tuning) == 2 and rows["jt_cert"]["kwargs"]["cert_eps"] == best["kwargs"]["cert_eps"]
  assert uni["tuning"] == [] and uni["kwargs"]["cert_uni_eps"] == 2.0
  for row in rows.values():
    assert row["seeds"] == 2 and len(row["clean"]["values"]) == 2
    values = row["clean"]["values"]
    assert row["clean"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)  # ddof 1
    assert sorted(row["threats"]) == ["joint", "modality:fou", "modality:pix", "worst_modality"]
    for threat in ("joint", "modality:fou", "modality:pix"):
      attack = row["attack"][threat]
      assert 0 < attack["attacked"] <= 2 * 24 and attack["broken"] == 0  # never broken
    joint = [s["mean"] for s in row["threats"]["joint"]["certified"]]
    worst = [s["mean"] for s in row["threats"]["worst_modality"]["certified"]]
    assert all(w >= j - 1e-9 for w, j in zip(worst, joint))  # one modality is a joint move
    curve = row["threats"]["joint"]["curve"]
    assert all(a >= b for a, b in zip(curve, curve[1:])) and curve[0] > 0
    assert set(row["missing_measured"]) == {"fou", "pix"}
    assert set(row["missing_certified"]) == {"fou", "pix", "any"}
    assert all(b <= 1.0 + 1e-5 for b in row["encoder_lipschitz"].values())
  [difference] = report["differences"]
  assert (difference["method"], difference["control"]) == ("uni", "jt_cert")
  clean = difference["columns"]["clean"]
  assert clean["mean"] == pytest.approx(uni["clean"]["mean"] - rows["jt_cert"]["clean"]["mean"])
  assert clean["low"] <= clean["mean"] <= clean["high"] and clean["num_seeds"] == 2
  table = (results / "certified_mfeat.md").read_text()
  assert "| lipschitz | uni | cert_uni_eps=2, cert_uni_weight=1 |" in table and "Seed-paired difference to jt_cert" in table
  assert "| lipschitz | jt_cert | cert_eps=" in table and "| grid points |" in table
  assert "worst modality r=0.5" in table and "Tuning on the validation split" in table
  # Radii, and the attacks on them, in the input units (raw mfeat features).
  assert "Radii are l2 norms in input units (fou: raw, pix: raw)." in table
  assert all(row["units"] == "input units (fou: raw, pix: raw)" for row in rows.values())
  assert (results / "certified_mfeat.png").stat().st_size > 10_000
  assert "sound certificates checked by l2-PGD" in proc.stdout

  # A rerun resumes: each run's certification is read back from its workdir
  # while the settings are unchanged (the marker below would be recomputed).
  setting = certified_report.setting_key({"cert_eps": rows["jt_cert"]["kwargs"]["cert_eps"]})
  cache = tmp_path / "lipschitz" / "jt_cert" / setting / "seed_1" / "certified_sound.json"
  cached = json.loads(cache.read_text())
  trained = json.loads((cache.parent / "config.json").read_text())
  assert trained["optimizer"]["learning_rate"] == 0.04  # lipschitz_optimizer over optimizer
  assert cached["settings"]["attack_steps"] == 5
  cached["result"]["clean"] = 0.123
  cache.write_text(json.dumps(cached))
  run_compare(tmp_path)
  rerun = json.loads((tmp_path / "certified_mfeat.json").read_text())
  assert [r for r in rerun["rows"] if r["method"] == "jt_cert"][0]["clean"]["values"][1] == 0.123


@pytest.mark.slow
def test_unknown_labels_and_bad_settings_are_refused_before_training(tmp_path):
  base = [sys.executable, "-m", "experiments.compare_certified",
          "--config=experiments/configs/embedded.py:mfeat,runlocal", f"--workdir={tmp_path}",
          "--encoders=lipschitz"]
  for flags, message in ((["--methods=jt_cert", "--control=ojt_cert"],
                          "'ojt_cert' is not in --methods"),
                         (["--methods=jt_cert", "--grid=jt_cert:cert_eps"],
                          "--grid: expected key=value"),
                         (["--methods=v", "--variant=v=nope:cert_eps=1"],
                          "method: expected one of")):
    proc = subprocess.run(base + flags, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr, (flags, proc.stderr[-2000:])
  assert not os.path.exists(tmp_path / "lipschitz")
