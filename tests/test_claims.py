"""mmsafe.paper.claims: every claim judged on constructed runs, each verdict coming
out each way, and claims that cannot be judged saying why."""

import numpy as np
import pytest

from mmsafe.eval import batching
from mmsafe.eval import statistics
from mmsafe.paper import claims
from mmsafe.paper import evidence

N = 200
SEEDS = (0, 1, 2, 3, 4)
MODALITIES = ("pix", "fou")
MULTI_GRID = (0.5, 1.0, 2.0)
UNI_GRID = (1.0, 2.0, 4.0)
BITE = evidence.Budgets(evidence.BITE, 2.0, {"pix": 2.0, "fou": 4.0})
BUDGETS = {evidence.PAPER: evidence.paper_budgets(MODALITIES), evidence.BITE: BITE}


def _flags(rng, level: float) -> str:
  return batching.encode_flags(rng.random(N) < level)


def fake_run(seed: int, level: float, *, pix_drop: float = 0.0, eta: float = 2.0,
             draw: int = 0, missing_pix: float | None = None) -> dict:
  """A run whose every accuracy is about `level` (per example: independent
  draws with seed (seed, draw), so equal `draw` gives equal outcomes): attacks
  on pix `pix_drop` lower, curves falling by 0.1 per radius, the model without
  pix at `missing_pix` (default level - 0.3) and without fou at level - 0.1,
  and an eta ratio pix / fou of `eta` on every class pair (symmetric in the
  pair, as JT's is)."""
  rng = np.random.default_rng([seed, draw])
  curves, per_example = {}, {"clean": _flags(rng, level)}
  for kind in ("fgm", "pgd"):
    curves[kind], per_example[kind] = {}, {}
    for scope, grid in (("multi", MULTI_GRID), ("pix", UNI_GRID), ("fou", UNI_GRID)):
      drop = pix_drop if scope == "pix" else 0.0
      accuracy = [max(level - drop - 0.1 * i, 0.0) for i in range(len(grid))]
      curves[kind][scope] = {"eps": list(grid), "accuracy": accuracy}
      per_example[kind][scope] = [_flags(rng, a) for a in accuracy]
  missing = {"pix": level - 0.3 if missing_pix is None else missing_pix, "fou": level - 0.1}
  per_example["missing"] = {m: {"zeros": _flags(rng, a)} for m, a in missing.items()}
  return {"seed": seed, "num_examples": N, "curves": curves, "per_example": per_example,
          "headline": {"clean": level, **{f"missing/{m}": a for m, a in missing.items()}},
          "eta_ratio": {"numerator": "pix", "denominator": "fou",
                        "matrix": [[None, eta], [eta, None]]}}


def runs_at(level: float, **kwargs) -> list[dict]:
  return [fake_run(seed, level, **kwargs) for seed in SEEDS]


def make_evidence(runs, **parts) -> evidence.Evidence:
  return evidence.Evidence(runs=runs, modalities=MODALITIES, preferred="pix", budgets=BUDGETS,
                         multi_grid=MULTI_GRID, uni_grid=UNI_GRID, **parts)


def test_compare_comes_out_each_way():
  runs = {"good": runs_at(0.9), "bad": runs_at(0.5), "same": runs_at(0.7, draw=1),
          "same_too": runs_at(0.7, draw=2)}
  better = evidence.compare(runs, "good", "bad", evidence.clean, "clean")
  assert better["verdict"] == statistics.REPRODUCED and better["interval"]["low"] > 0.3
  assert better["interval"]["num_examples"] == N and better["interval"]["num_seeds"] == 5
  assert evidence.compare(runs, "bad", "good", evidence.clean, "")["verdict"] == (
      statistics.CONTRADICTED)
  assert evidence.compare(runs, "same", "same_too", evidence.clean, "")["verdict"] == (
      statistics.INCONCLUSIVE)
  # Equivalence: identical outcomes are equivalent; a large gain is not.
  runs["copy"] = runs_at(0.7, draw=1)
  assert evidence.compare(runs, "copy", "same", evidence.clean, "",
                        kind=statistics.EQUIVALENT)["verdict"] == statistics.REPRODUCED
  assert evidence.compare(runs, "good", "bad", evidence.clean, "",
                        kind=statistics.EQUIVALENT)["verdict"] == statistics.CONTRADICTED
  # A group is compared by its mean; per-seed metrics give a t interval.
  group = evidence.compare(runs, ("good", "bad"), "same", evidence.clean, "")
  assert "mean(good, bad) − same" in group["text"]
  eta = evidence.compare({"a": runs_at(0.7, eta=1.0), "b": runs_at(0.7, eta=10.0)}, "a", "b",
                       evidence.eta_balance, "", effect=evidence.ETA_EFFECT)
  assert eta["verdict"] == statistics.REPRODUCED and eta["interval"]["num_examples"] == 0


@pytest.mark.parametrize("rule, verdicts, expected", [
    (evidence.ALL, ["reproduced", "reproduced"], "reproduced"),
    (evidence.ALL, ["reproduced", "inconclusive"], "inconclusive"),
    (evidence.ALL, ["reproduced", "contradicted"], "contradicted"),
    (evidence.MAJORITY, ["reproduced", "reproduced", "contradicted"], "reproduced"),
    (evidence.MAJORITY, ["reproduced", "inconclusive", "contradicted"], "inconclusive"),
    (evidence.MAJORITY, ["contradicted", "contradicted", "reproduced"], "contradicted"),
    (evidence.ANY, ["inconclusive", "reproduced"], "reproduced"),
    (evidence.ANY, ["contradicted", "contradicted"], "contradicted"),
    (evidence.ANY, ["contradicted", "inconclusive"], "inconclusive"),
    (evidence.ALL, ["reproduced", "not run"], "not run"),
])
def test_claim_rules(rule, verdicts, expected):
  assert evidence.combine([{"verdict": v} for v in verdicts], rule) == expected


def _verdicts(runs, **parts) -> dict:
  return {row["key"]: row for row in claims.evaluate_claims(make_evidence(runs, **parts))}


def test_every_claim_reproduced_on_runs_made_to_hold_it():
  """Runs shaped as the paper describes: each claim reproduced."""
  runs = {"jt": runs_at(0.4, pix_drop=0.3, eta=10.0),
          # imbalance methods: better clean than JT (and under attack)
          **{m: runs_at(0.55, pix_drop=0.3, eta=10.0, draw=i)
             for i, m in enumerate(evidence.IMBALANCE_METHODS, 1)},
          # robustness methods: better than JT and the imbalance methods
          **{m: runs_at(0.7, pix_drop=0.3, eta=10.0, draw=i)
             for i, m in enumerate(evidence.ROBUSTNESS_METHODS, 4)},
          "crmt": runs_at(0.8, eta=1.5, draw=7), "crmt_at": runs_at(0.9, eta=1.5, draw=8),
          "crmt_mix": runs_at(0.9, eta=1.5, draw=9),
          "ojt": runs_at(0.4, pix_drop=0.3, eta=10.0),  # JT's outcomes exactly
          "crmt_step1": runs_at(0.6, eta=3.0, draw=10),
          "crmt_step2": runs_at(0.6, eta=3.0, draw=11)}
  for run in runs["gb"]:  # GB beats MSEFM (0.7) on clean accuracy
    run["per_example"]["clean"] = _flags(np.random.default_rng([run["seed"], 98]), 0.95)
  # The steps help most at larger radii: their curves stay flat where JT's fall;
  # together (CRMT) they do best.
  for name, level in (("crmt_step1", 0.6), ("crmt_step2", 0.6), ("crmt", 0.8)):
    for run in runs[name]:
      rng = np.random.default_rng([run["seed"], 99, int(10 * level)])
      run["per_example"]["pgd"]["multi"] = [_flags(rng, level) for _ in MULTI_GRID]
  rng = np.random.default_rng(5)
  pairs = [{"pair": f"p{i}", "method": "jt", "seed": s, "eta_log_ratio": x,
            "attack_gap": x + rng.normal(scale=0.05)}
           for i, x in enumerate(np.linspace(-1, 1, 10)) for s in range(2)]
  imbalance = {0.0: {"jt": runs_at(0.5), "crmt": runs_at(0.5, draw=1)},
               4.0: {"jt": runs_at(0.3), "crmt": runs_at(0.6, draw=1)}}
  rows = _verdicts(runs, transformer={"jt": runs_at(0.5), "crmt_step1": runs_at(0.7, draw=3)},
                   iterations={"crmt": runs["crmt"], "crmt_2iter": runs["crmt"]}, pairs=pairs,
                   imbalance=imbalance)
  for key, row in rows.items():
    if row["verdicts"] == {evidence.PAPER: evidence.NOT_CHECKED}:
      assert row["reason"], key
      continue
    for budget, verdict in row["verdicts"].items():
      assert verdict == statistics.REPRODUCED, (key, budget, row["tests"][budget])
  assert set(rows["crmt_best"]["verdicts"]) == {evidence.PAPER, evidence.BITE}
  assert set(rows["ojt_no_help"]["verdicts"]) == {evidence.PAPER}  # not a budget claim
  assert "PGD@2" in " ".join(t["text"] for t in rows["crmt_best"]["tests"][evidence.BITE])


def test_claims_contradicted_when_runs_say_the_opposite_and_not_run_without_parts():
  runs = {"jt": runs_at(0.8, eta=1.0), "ojt": runs_at(0.95, draw=1),
          "crmt": runs_at(0.5, eta=10.0, draw=2), "mmat": runs_at(0.8, eta=1.0, draw=3),
          "crmt_at": runs_at(0.5, eta=10.0, draw=4), "crmt_step1": runs_at(0.5, draw=5),
          "crmt_step2": runs_at(0.5, draw=6)}
  rows = _verdicts(runs)
  contradicted = statistics.CONTRADICTED
  assert rows["ojt_no_help"]["verdicts"][evidence.PAPER] == contradicted  # OJT clearly helps
  assert rows["each_step_helps"]["verdicts"][evidence.PAPER] == contradicted
  assert rows["eta_balanced"]["verdicts"][evidence.PAPER] == contradicted
  assert rows["crmt_jt_over_jt"]["verdicts"] == {evidence.PAPER: contradicted,
                                                 evidence.BITE: contradicted}
  # Methods or parts that did not run: "not run", with the reason.
  assert rows["imbalance_clean"]["verdicts"] == {evidence.PAPER: evidence.NOT_RUN}
  assert "gb, ogm, pmr" in rows["imbalance_clean"]["reason"]
  assert rows["transformer"]["reason"] == "experiment part 'transformer' not run"
  assert rows["paper_datasets"]["verdicts"] == {evidence.PAPER: evidence.NOT_CHECKED}
  markdown = claims.markdown(list(rows.values()))
  assert "| The orthogonal head alone (OJT) does not change robustness" in markdown
  assert "ojt ≈ jt multi-modal PGD area: +0." in markdown


def test_preferred_modality_and_eta_helpers():
  runs = runs_at(0.8, eta=4.0)
  assert evidence.preferred_modality(runs, MODALITIES) == "pix"  # without pix: 0.5 < 0.7
  assert evidence.eta_log_ratio(runs[0], "pix") == pytest.approx(np.log10(4.0))
  run = fake_run(0, 0.8)
  run["eta_ratio"]["matrix"] = [[None, 10.0], [10.0, None]]
  assert evidence.eta_log_ratio(run, "pix") == pytest.approx(1.0)
  assert evidence.eta_log_ratio(run, "fou") == pytest.approx(-1.0)
  assert evidence.eta_imbalance(run["eta_ratio"]["matrix"]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match=r"pgd/multi: eps 3.0 is not on the run's grid"):
    evidence.robust("pgd", "multi", 3.0)(run)
