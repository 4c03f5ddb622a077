"""experiments.reproduce and experiments.claims: the claims' verdicts on numbers
made to hold or fail, and the report of real (session-trained) mfeat runs."""

import json
import os
import shutil

import numpy as np
import pytest

from experiments import claims
from experiments import reproduction as reproduce
from tests.conftest import mfeat_config

MODALITIES = ("pix", "fou")
GRID = [0.5, 1.0, 2.0]


def fake_run(seed: int, level: float, *, pix_drop: float = 0.0, eta: float = 2.0) -> dict:
  """A run whose every accuracy is `level` (uni-modal attacks on pix `pix_drop`
  lower; PGD curves falling by 0.1 per grid point) and eta ratio `eta`."""
  headline = {"clean": level, "fgm/multi@0.5": level, "pgd/multi@0.5": level,
              "missing/pix": level - 0.2, "missing/fou": level - 0.1}
  for kind in ("fgm", "pgd"):
    headline.update({f"{kind}/pix@1.0": level - pix_drop, f"{kind}/fou@1.0": level})
  curve = {"eps": GRID, "accuracy": [level - 0.1 * i for i in range(len(GRID))]}
  return {"seed": seed, "headline": headline,
          "curves": {"pgd": {"multi": curve, "pix": curve, "fou": curve}},
          "eta_ratio": {"numerator": "pix", "denominator": "fou",
                        "matrix": [[None, eta], [1.0 / eta, None]]}}


def test_claims_follow_the_paired_seeds():
  seeds = (0, 1, 2)
  runs = {"jt": [fake_run(s, 0.5, pix_drop=0.2, eta=10.0) for s in seeds],
          # Every seed better than JT: reproduced.
          "crmt": [fake_run(s, 0.7, eta=2.0) for s in seeds],
          # One seed of three better than JT: mixed.
          "crmt_step1": [fake_run(s, 0.6 if s == 0 else 0.4) for s in seeds],
          # OJT never better: "OJT does not help" is reproduced (inverted claim).
          "ojt": [fake_run(s, 0.5) for s in seeds]}
  rows = {row["claim"]: row for row in claims.evaluate_claims(runs, MODALITIES, chance=0.1)}
  by_start = lambda text: next(row for claim, row in rows.items() if claim.startswith(text))
  assert by_start("Imbalance methods")["verdict"] == claims.NOT_RUN
  assert "gb, ogm, pmr" in by_start("Imbalance methods")["evidence"]
  preferred = by_start("Attacks on JT's preferred modality (pix")
  assert preferred["verdict"] == claims.REPRODUCED
  assert "+0.200 ± 0.000 (3/3 seeds > 0)" in preferred["evidence"]
  assert by_start("CRMT narrows")["verdict"] == claims.REPRODUCED
  eta = by_start("CRMT balances")
  assert eta["verdict"] == claims.REPRODUCED
  # |log10 10| - |log10 2| per seed.
  assert f"{1 - np.log10(2):+.3f}" in eta["evidence"]
  assert by_start("The orthogonal head alone")["verdict"] == claims.REPRODUCED
  assert by_start("Each CRMT step")["verdict"] == claims.NOT_RUN  # no crmt_step2

  runs["ojt"] = [fake_run(s, 0.6) for s in seeds]
  runs["crmt_step2"] = [fake_run(s, 0.6) for s in seeds]
  rows = {row["claim"]: row for row in claims.evaluate_claims(runs, MODALITIES, chance=0.1)}
  assert by_start("The orthogonal head alone")["verdict"] == claims.NOT_REPRODUCED
  steps = by_start("Each CRMT step")
  assert steps["verdict"] == claims.MIXED
  assert "crmt_step1 − jt mean PGD accuracy: -0.033 ± 0.115 (1/3 seeds > 0)" in steps["evidence"]
  markdown = claims.markdown(list(rows.values()))
  assert "−\\|gap\\| at 1.0" in markdown  # a pipe inside a cell does not split it


def test_protocol_check_compares_pgd_points_of_both_protocols():
  curves = {"pgd": {"multi": {"eps": [0.5, 2.0, 8.0], "accuracy": [0.9, 0.6, 0.0]},
                    "pix": {"eps": [1.0], "accuracy": [0.8]}}}
  cheap = reproduce.pgd_points(curves)
  assert cheap == {"pgd/multi@0.5": 0.9, "pgd/multi@2": 0.6, "pgd/multi@8": 0.0,
                   "pgd/pix@1": 0.8}
  default = {"pgd/multi@0.5": 0.85, "pgd/multi@2": 0.65, "pgd/pix@1": 0.8, "pgd/pix@4": 0.1}
  sentence = claims.protocol_agreement({"jt": (cheap, default)}, "quick")
  assert "differs from the `default` protocol's by at most 0.050 (mean +0.000; 3 numbers" in (
      sentence)


def test_mean_std_and_radius_flags():
  stat = reproduce.mean_std([0.5, 0.7, 0.9])
  assert stat["mean"] == pytest.approx(0.7) and stat["std"] == pytest.approx(0.2)
  assert reproduce.mean_std([0.4])["std"] == 0.0
  assert reproduce.parse_radii(["2", "0.5", "1"], "multi_eps", 0.5) == [0.5, 1.0, 2.0]
  with pytest.raises(ValueError, match=r"multi_eps: expected positive radii including 0.5"):
    reproduce.parse_radii(["1", "2"], "multi_eps", 0.5)
  with pytest.raises(ValueError, match="uni_eps: expected comma-separated numbers"):
    reproduce.parse_radii(["one"], "uni_eps", 1.0)


def test_report_of_trained_runs(trained_mfeat, tmp_path):
  """A real run (the session's JT model, as seed 0) through the evaluation and
  the report: tables, claims, figures, and the cached evaluation. OJT's entry is
  JT's evaluation with its numbers lowered (one real evaluation keeps this cheap)."""
  settings = reproduce.evaluation_settings("fast", [0.5, 4.0], [1.0, 8.0], 48)
  run_dir = tmp_path / "runs" / "jt" / "seed0"
  shutil.copytree(trained_mfeat["jt"][3], run_dir)
  jt = reproduce.train_and_evaluate_run(mfeat_config("jt"), "jt", 0, str(run_dir), settings)
  cached = run_dir / reproduce.RESULTS_FILE
  stamp = os.stat(cached).st_mtime_ns
  again = reproduce.train_and_evaluate_run(mfeat_config("jt"), "jt", 0, str(run_dir), settings)
  assert again == json.loads(cached.read_text()) and os.stat(cached).st_mtime_ns == stamp
  assert jt["num_examples"] == 48 and jt["eta_ratio"]["numerator"] in MODALITIES
  assert jt["curves"]["pgd"]["pix"]["eps"] == [1.0, 8.0]
  # At 16x the paper's budget the uni-modal attack bites.
  assert jt["curves"]["pgd"]["pix"]["accuracy"][-1] < jt["headline"]["clean"] - 0.1

  ojt = json.loads(json.dumps(jt))
  del ojt["eta_ratio"]
  ojt["curves"]["pgd"]["multi"]["accuracy"] = [
      a - 0.05 for a in jt["curves"]["pgd"]["multi"]["accuracy"]]
  results = {"jt": [jt], "ojt": [ojt]}
  meta = {"dataset": "mfeat", "seeds": [0], **settings, "num_examples": 48, "chance": 0.1,
          "wall_seconds": 1.0, "training_seconds": 60.0, "evaluation_seconds": 30.0,
          "device": reproduce.device_description(),
          "protocol_check": "Protocol check: (constructed)",
          "protocol_check_points": {"jt": {"pgd/multi@0.5": [0.9, 0.85]}}}
  report = reproduce.write_report(results, ["fou", "pix"], str(tmp_path / "report"), meta)
  assert report["summary"]["jt"]["headline"]["clean"]["mean"] == jt["headline"]["clean"]
  text = (tmp_path / "report" / "report.md").read_text()
  assert "| ojt | " in text and "## Table 2" in text
  assert "| jt | pgd/multi@0.5 | 0.900 | 0.850 |" in text
  assert "training 1.0 min and evaluation 0.5 min summed over the runs" in text
  ojt_claim = next(r for r in report["claims"] if r["claim"].startswith("The orthogonal"))
  assert ojt_claim["verdict"] == claims.REPRODUCED
  assert "ojt − jt mean PGD accuracy: -0.050 ± 0.000 (0/1 seeds > 0)" in ojt_claim["evidence"]
  for name in report["figures"].values():
    assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"
  assert set(report["figures"]) == {"fig1_fou", "fig1_pix", "fig4", "fig5", "fig3_jt"}
