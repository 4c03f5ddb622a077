"""experiments.reproduce: calibrated budgets, the parts' runs, a tiny reproduction
end to end (every part, cached on a rerun), and the report."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments.configs import embedded
from experiments.configs import reproduce as reproduce_config
from mmsafe import attacks
from mmsafe.methods import crmt
from mmsafe.paper import budgets
from mmsafe.paper import claims
from mmsafe.paper import evidence
from mmsafe.paper import report as report_lib
from mmsafe.paper import reproduction
from mmsafe.paper import runs


def test_crossing_interpolates_in_log_eps_and_rounds():
  eps, accuracy = [0.5, 1.0, 2.0, 4.0], [0.9, 0.8, 0.4, 0.1]
  # 0.5 lies a quarter of the way from 0.8 (eps 1) to 0.4 (eps 2) in log eps.
  assert budgets.crossing(eps, accuracy, 0.5) == float(f"{2 ** 0.75:.2g}") == 1.7
  assert budgets.crossing(eps, accuracy, 0.8) == 1.0
  assert budgets.crossing(eps, accuracy, 0.95) == 0.5  # already below at the start
  assert budgets.crossing(eps, accuracy, 0.05) == 4.0  # never reached: the grid's end


def test_the_eta_ratio_is_certified_in_normalised_units():
  # The paper's eta, compared with attacks whose budgets are in normalised space
  # (input units would divide each modality's eta by its own smallest std).
  settings = {"protocol": "fast", "multi_eps": (0.5,), "uni_eps": (1.0,), "uni_extra_eps": {},
              "attacks": ("pgd",), "max_examples": 8, "with_eta": True}
  evals = runs.evaluator_configs(settings, reproduce_config.get_presets("mfeat"))
  assert evals["certify"]["units"] == "normalised" and evals["certify"]["kinds"] == ("empirical",)


def test_two_iterations_lists_both_steps_twice():
  config = runs.two_iterations(runs.configured(
      embedded.get_config("mfeat"), "crmt", 3))
  stages = config.stages
  assert [s["name"] for s in stages] == ["step1", "step2", "step1_iter2", "step2_iter2"]
  assert [s["num_epochs"] for s in stages] == [30, 10, 10, 10] and config.seed == 3
  assert stages[2]["optimizer"]["learning_rate"] == pytest.approx(0.005)


def test_step2_constants_are_estimated_again_at_a_second_step2(monkeypatch):
  calls = []
  monkeypatch.setattr(crmt, "prepare_step2", lambda *a, **k: calls.append(a) or {"x": 1})

  class Context:
    model = variables = config = reduce_over_split = None
    split_names = ("train",)

  callback = crmt.PrepareStep2()
  assert callback.on_stage_start("step1_iter2", Context()) == {}
  assert callback.on_stage_start("step2", Context()) == {"x": 1}
  assert callback.on_stage_start("step2_iter2", Context()) == {"x": 1} and len(calls) == 2


@pytest.mark.slow
def test_a_diverged_run_is_recorded_once_and_not_evaluated(tmp_path):
  config = runs.configured(embedded.get_config("mfeat,runlocal"), "jt", 0,
                           **{"optimizer.learning_rate": 1000.0})
  run_dir = str(tmp_path / "run")
  settings = {"protocol": "fast"}
  result = runs.train_and_evaluate_run(config, run_dir, settings,
                                       reproduce_config.get_presets("mfeat"), label="jt")
  assert "non-finite training loss" in result["diverged"] and "headline" not in result
  assert result["training_seconds"] > 0
  stamp = os.stat(os.path.join(run_dir, runs.DIVERGED_FILE)).st_mtime_ns
  assert runs.train_run(config, run_dir)["diverged"] == result["diverged"]
  assert os.stat(os.path.join(run_dir, runs.DIVERGED_FILE)).st_mtime_ns == stamp
  groups = report_lib.grouped([dict(result, part="main", setting="default")])
  assert groups == {}


def test_part_jobs_order_and_layout(tmp_path):
  base = embedded.get_config("mfeat")
  jobs = reproduction.part_jobs("pairs", base, str(tmp_path), (0, 1), pair_methods=("crmt", "jt"))
  settings = sorted({job.setting for job in jobs})
  assert len(settings) == 14 and "fou+pix" not in settings and "pix+fou" not in settings
  first = [job for job in jobs if job.setting == "fac+kar"]
  assert (first[0].label, first[0].seed) == ("jt", 0)  # it calibrates its pair
  assert first[0].run_dir == str(tmp_path / "runs" / "pairs" / "fac+kar" / "jt" / "seed0")
  assert first[0].config.data.modalities == ("fac", "kar") and first[0].attacks == ("pgd",)
  dial = reproduction.part_jobs("imbalance", base, str(tmp_path), (0,), preferred="pix",
                                noise_levels=(2.0,))
  assert {job.config.data.noise["fou"] for job in dial} == {2.0}
  with pytest.raises(ValueError, match="imbalance: expected the preferred modality"):
    reproduction.part_jobs("imbalance", base, str(tmp_path), (0,))
  with pytest.raises(ValueError, match="transformer: expected a config for each of"):
    reproduction.part_jobs("transformer", base, str(tmp_path), (0,))
  presets = reproduce_config.get_presets("mfeat")
  transformer = reproduction.part_jobs("transformer", base, str(tmp_path), (0,),
                                       transformer=presets.transformer)
  assert {job.config.model.architecture for job in transformer} == {"transformer"}


@pytest.mark.slow
def test_tiny_reproduction_end_to_end(tmp_path, monkeypatch):
  """The parts on mfeat at smoke size (1-2 epochs, 2 seeds, 24 test examples,
  short eps grids): budgets calibrated on JT, runs cached, the report with
  every claim (OJT's, left out here, is judged in tests/test_claims.py). The
  transformer part is left out here (its compilation alone would double the
  test): its jobs are checked by `test_part_jobs_order_and_layout`, the model
  by tests/test_transformer.py and its claim by tests/test_claims.py."""
  base = embedded.get_config("mfeat,runlocal")
  with base.unlocked():
    base.num_epochs, base.optimizer.decay_epochs = 1, ()
  monkeypatch.setattr(budgets, "CALIBRATION_GRID", tuple(2.0 ** k for k in range(-3, 6)))
  monkeypatch.setattr(runs, "MULTI_GRID", (0.25, 1.0, 4.0))
  monkeypatch.setattr(runs, "UNI_GRID", (0.5, 2.0, 8.0))
  # The protocol check's reference, shrunk like the grids (same code path).
  monkeypatch.setitem(attacks.PROTOCOLS, "default", dataclasses.replace(
      attacks.PROTOCOLS["default"], steps=10, restarts=2))
  plan = reproduction.Plan(seeds=(0, 1), methods=("jt", "crmt"), protocol="fast",
                           max_examples=24, parts=("main", "iterations", "pairs", "imbalance"),
                           pairs=(("fou", "kar"),), pair_methods=("jt",), noise_levels=(2.0,))
  workdir = str(tmp_path / "reproduce")
  presets = reproduce_config.get_presets("mfeat")
  results, meta = reproduction.reproduce(base, workdir, plan, presets)
  assert {(r["part"], r["setting"]) for r in results} == {
      ("main", "default"), ("iterations", "default"), ("pairs", "fou+kar"),
      ("imbalance", "noise2")}
  calibration = json.loads((tmp_path / "reproduce" / budgets.BUDGETS_FILE).read_text())
  assert set(calibration) == {"default", "fou+kar"}
  for scope, entry in calibration["default"].items():
    assert len(entry["budgets"]) == 3 and entry["budgets"] == sorted(entry["budgets"]), scope
  jt = next(r for r in results if r["part"] == "main" and r["method"] == "jt")
  calibrated = calibration["default"]["multi"]["budgets"]
  assert set(calibrated) <= set(jt["curves"]["pgd"]["multi"]["eps"])
  assert set(calibration["default"]["fou"]["budgets"]) <= set(jt["curves"]["pgd"]["fou"]["eps"])
  assert "eta_ratio" in jt and jt["num_examples"] == 24
  assert "protocol_check" in meta and set(meta["protocol_check_points"]) == {"jt", "crmt"}

  # A rerun reuses every cached evaluation.
  cached = os.path.join(workdir, "runs", "main", "jt", "seed0", runs.RESULTS_FILE)
  stamp = os.stat(cached).st_mtime_ns
  again, _ = reproduction.reproduce(base, workdir, plan, presets)
  assert os.stat(cached).st_mtime_ns == stamp and len(again) == len(results)
  # --cached_only with a seed more: nothing trains; the new seed's runs are listed as missing.
  partial, partial_meta = reproduction.reproduce(
      base, workdir, dataclasses.replace(plan, seeds=(0, 1, 2), cached_only=True), presets)
  assert len(partial) == len(results) and not os.path.exists(
      os.path.join(workdir, "runs", "main", "jt", "seed2"))
  assert len(partial_meta["missing"]) == len(results) // 2
  assert "main default crmt seed 2" in partial_meta["missing"]

  partial_meta.update(wall_seconds=1.0, device=reproduction.device_description())
  outdir = tmp_path / "report"
  report = report_lib.write_report(partial, ("pix", "fou"), str(outdir), partial_meta)
  keys = {row["key"] for row in report["claims"]}
  assert keys == {claim.key for claim in claims.CLAIMS}
  rows = {row["key"]: row for row in report["claims"]}
  assert rows["crmt_jt_over_jt"]["verdicts"][evidence.PAPER] in (
      "reproduced", "contradicted", "inconclusive")
  assert rows["ojt_no_help"]["verdicts"][evidence.PAPER] == evidence.NOT_RUN
  assert rows["imbalance_clean"]["verdicts"] == {evidence.PAPER: evidence.NOT_RUN}
  assert rows["eta_predicts"]["verdicts"] == {evidence.PAPER: evidence.NOT_RUN}  # < 3 pairs
  text = (outdir / "report.md").read_text()
  assert text.index("## The paper's claims") < text.index("## Budgets")
  for section in ("## Table 1 (bite budgets)", "## Every modality pair",
                  "## The imbalance dial", "## Runs not done", "## Compute"):
    assert section in text, section
  assert "gb − JT" not in text  # the pair table has columns for the methods that ran only
  # The default pair joins the pair study with the pair methods' runs only (not CRMT's).
  assert {p["method"] for p in report["pair_points"]} == {"jt"}
  for name in report["figures"].values():
    assert (outdir / name).read_bytes()[:4] == b"\x89PNG"
  assert {"fig1_pix", "fig1_fou", "fig3", "fig4", "fig5", "pairs", "imbalance"} <= set(
      report["figures"])
  assert np.isfinite(report["dial"][-1]["gain"]["mean"])


def test_parse_pair_names_the_field_and_the_modalities():
  assert reproduction.parse_pair("fac+kar", "mfeat") == ("fac", "kar")
  assert reproduction.parse_pair("mor+zer", "mfeat") == ("zer", "mor")  # the views' order
  for bad in ("fac", "fac+fac", "fac+xyz", "fac+kar+pix"):
    with pytest.raises(ValueError, match=r"pairs: expected two different modalities of mfeat"):
      reproduction.parse_pair(bad, "mfeat")
