"""The evidence the CRMT paper's claims are judged on, and how a comparison is
judged (`mmsafe.paper.claims` lists the claims).

Every comparison pairs the runs of two methods by training seed and, where the
metric is an accuracy, by test example (the same examples for every run):
`mmsafe.eval.statistics.paired_difference` gives the mean difference and its
95% interval over seeds and examples. A comparison's verdict comes from its
interval against the claim's stated minimal effect (`statistics.verdict`):
"reproduced" when the interval lies above the effect, "contradicted" when it
lies below 0, "inconclusive" otherwise; a "does not help" claim is an
equivalence test (reproduced only inside +-effect). A claim made of several
comparisons combines their verdicts by its own rule: "all" (every one must
hold), "majority" ("in most columns") or "any" ("in some situations").

Claims about attacks are judged twice: at the paper's budgets (multi-modal
eps 0.5, uni-modal 1.0) and at the dataset's calibrated "bite" budgets (where
JT's robust accuracy on the validation split is about 0.5; `Budgets`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np

from mmsafe.eval import batching
from mmsafe.eval import statistics

Run = Mapping[str, Any]
Runs = Mapping[str, Sequence[Run]]
Outcome = Callable[[Run], np.ndarray]  # a run -> [N] per-example values, or a scalar

CRMT_METHODS = ("crmt", "crmt_at", "crmt_mix")
IMBALANCE_METHODS = ("gb", "ogm", "pmr")
ROBUSTNESS_METHODS = ("msefm", "mmat", "mixup")
# The paper's Table 1 rows (Sec. 4.1) and its CRMT variants' base methods.
TABLE1_METHODS = ("jt",) + IMBALANCE_METHODS + ROBUSTNESS_METHODS + CRMT_METHODS
CRMT_BASES = {"crmt": "jt", "crmt_at": "mmat", "crmt_mix": "mixup"}
MULTI = "multi"
PAPER, BITE = "paper", "bite"
# Minimal effects: one point of accuracy (4 mfeat / 3.6 av_digits test
# examples); 0.05 in mean |log10 eta ratio| (a 12% change of the ratio); 0.1 of
# rank correlation.
ACCURACY_EFFECT, ETA_EFFECT, CORRELATION_EFFECT = 0.01, 0.05, 0.1
ALL, MAJORITY, ANY = "all", "majority", "any"
NOT_RUN, NOT_CHECKED = "not run", "not checked"


@dataclasses.dataclass(frozen=True)
class Budgets:
  """The attack budgets one claim is judged at: `multi` (joint l2) and, per
  modality, `uni` (that modality alone)."""

  name: str
  multi: float
  uni: Mapping[str, float]


def paper_budgets(modalities: Sequence[str]) -> Budgets:
  """CRMT Sec. 4.1: multi-modal eps 0.5, uni-modal eps 1.0."""
  return Budgets(PAPER, 0.5, {m: 1.0 for m in modalities})


# ---------------------------------------------------------------------------
# Per-example outcomes of one run.


def _decode(run: Run, text: str) -> np.ndarray:
  return batching.decode_flags(text, int(run["num_examples"])).astype(np.float64)


def clean(run: Run) -> np.ndarray:
  """1 where the run classifies the test example correctly."""
  return _decode(run, run["per_example"]["clean"])


def robust(kind: str, scope: str, eps: float) -> Outcome:
  """1 where the example is robust to attack `kind` ("fgm"/"pgd") on `scope` at `eps`."""
  def outcome(run: Run) -> np.ndarray:
    grid = [float(e) for e in run["curves"][kind][scope]["eps"]]
    if float(eps) not in grid:
      raise ValueError(f"{kind}/{scope}: eps {eps} is not on the run's grid {grid}")
    return _decode(run, run["per_example"][kind][scope][grid.index(float(eps))])
  return outcome


def curve_point(run: Run, kind: str, scope: str, eps: float) -> float:
  """A run's robust accuracy against `kind` on `scope` at `eps` (a point of its curve)."""
  curve = run["curves"][kind][scope]
  return float(curve["accuracy"][[float(e) for e in curve["eps"]].index(float(eps))])


def missing(modality: str, fill: str = "zeros") -> Outcome:
  """1 where the example is classified correctly without `modality`."""
  return lambda run: _decode(run, run["per_example"]["missing"][modality][fill])


def area(kind: str, scope: str, grid: Sequence[float]) -> Outcome:
  """Per example, the fraction of `grid`'s radii at which it is robust (its mean
  over examples is the normalised area under the robust-accuracy curve)."""
  points = [robust(kind, scope, eps) for eps in grid]
  return lambda run: np.mean([point(run) for point in points], axis=0)


def eta_imbalance(matrix: Sequence[Sequence[float | None]]) -> float:
  """Mean |log10 eta^(m1)/eta^(m2)| over the class pairs (0: balanced modalities)."""
  ratio = np.asarray([[np.nan if v is None else v for v in row] for row in matrix], float)
  ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
  return float(np.abs(np.log10(ratio)).mean()) if ratio.size else float("nan")


def eta_log_ratio(run: Run, numerator: str) -> float:
  """Mean log10 eta^(numerator) / eta^(other) over class pairs (> 0: `numerator`
  is the more vulnerable modality by Prop. 3.4)."""
  eta = run["eta_ratio"]
  ratio = np.asarray([[np.nan if v is None else v for v in row] for row in eta["matrix"]],
                     float)
  ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
  sign = 1.0 if eta["numerator"] == numerator else -1.0
  return sign * float(np.log10(ratio).mean())


def eta_balance(run: Run) -> float:
  """Minus the eta imbalance (higher: more balanced vulnerability indicators)."""
  return -eta_imbalance(run["eta_ratio"]["matrix"])


# ---------------------------------------------------------------------------
# Comparisons.


def _by_seed(runs: Sequence[Run]) -> dict[int, Run]:
  return {int(run["seed"]): run for run in runs}


def stacked(runs: Runs, methods: Sequence[str], outcome: Outcome, seeds: Sequence[int]
            ) -> np.ndarray:
  """[S, N] (or [S]) of `outcome`, averaged over `methods` (a group's mean)."""
  return np.mean([[outcome(_by_seed(runs[m])[s]) for s in seeds] for m in methods], axis=0)


def common_seeds(runs: Runs, methods: Sequence[str]) -> list[int]:
  """The seeds every method of `methods` has a run for, in order."""
  seeds = set.intersection(*[set(_by_seed(runs[m])) for m in methods])
  return sorted(seeds)


def compare(runs: Runs, better: str | Sequence[str], worse: str | Sequence[str],
            outcome: Outcome, what: str, *, effect: float = ACCURACY_EFFECT,
            kind: str = statistics.IMPROVES, worse_outcome: Outcome | None = None
            ) -> dict[str, Any]:
  """`better` against `worse` (a method, or a group compared by its mean) on
  `outcome` (`worse_outcome` for `worse` when it differs), paired by seed and
  example; the verdict against `effect`."""
  group_a = [better] if isinstance(better, str) else list(better)
  group_b = [worse] if isinstance(worse, str) else list(worse)
  seeds = common_seeds(runs, group_a + group_b)
  if len(seeds) < 2:
    return {"verdict": NOT_RUN, "text": f"{what}: fewer than 2 common seeds"}
  interval = statistics.paired_difference(
      stacked(runs, group_a, outcome, seeds),
      stacked(runs, group_b, worse_outcome or outcome, seeds))
  result = statistics.verdict(interval, effect=effect, kind=kind)
  name = lambda group: group[0] if len(group) == 1 else "mean(" + ", ".join(group) + ")"
  sense = "≈" if kind == statistics.EQUIVALENT else "−"
  return {"verdict": result, "interval": interval.to_dict(), "effect": effect, "kind": kind,
          "text": f"{name(group_a)} {sense} {name(group_b)} {what}: {interval.text()}"}


def combine(tests: Sequence[Mapping[str, Any]], rule: str) -> str:
  """A claim's verdict from its comparisons' verdicts (see the module docstring)."""
  verdicts = [t["verdict"] for t in tests]
  if not verdicts or NOT_RUN in verdicts:
    return NOT_RUN
  won = verdicts.count(statistics.REPRODUCED)
  lost = verdicts.count(statistics.CONTRADICTED)
  if rule == ALL:
    return (statistics.REPRODUCED if won == len(verdicts) else
            statistics.CONTRADICTED if lost else statistics.INCONCLUSIVE)
  if rule == MAJORITY:
    return (statistics.REPRODUCED if 2 * won > len(verdicts) else
            statistics.CONTRADICTED if 2 * lost > len(verdicts) else statistics.INCONCLUSIVE)
  if rule == ANY:
    return (statistics.REPRODUCED if won else
            statistics.CONTRADICTED if lost == len(verdicts) else statistics.INCONCLUSIVE)
  raise ValueError(f"rule: expected one of {[ALL, MAJORITY, ANY]}, got {rule!r}")


def against_zero(values: np.ndarray, what: str, *, effect: float) -> dict[str, Any]:
  """The verdict on "`values` (one per seed, or [S, N]) are above `effect`"."""
  interval = statistics.paired_interval(values)
  return {"verdict": statistics.verdict(interval, effect=effect), "interval": interval.to_dict(),
          "effect": effect, "kind": statistics.IMPROVES, "text": f"{what}: {interval.text()}"}


# ---------------------------------------------------------------------------
# The evidence a claim reads.


@dataclasses.dataclass(frozen=True)
class Evidence:
  """What the claims are judged on.

  Attributes:
    runs: method -> per-seed evaluations of the main experiment (the dataset's
      default modality pair).
    modalities: its two modalities.
    preferred: JT's preferred modality (its absence costs JT most accuracy).
    budgets: PAPER and BITE -> `Budgets`.
    multi_grid, uni_grid: the radii of the robust-accuracy curves (areas).
    transformer: method -> runs of the transformer experiment (Table 3), or {}.
    iterations: {"crmt": runs, "crmt_2iter": runs} (App. 8.3), or {}.
    pairs: one record per modality pair with JT's and each method's pair
      statistics (`pair_points` of the reproduction report), or [].
    imbalance: noise strength -> method -> runs (the imbalance dial), or {}.
  """

  runs: Runs
  modalities: tuple[str, ...]
  preferred: str
  budgets: Mapping[str, Budgets]
  multi_grid: tuple[float, ...]
  uni_grid: tuple[float, ...]
  transformer: Runs = dataclasses.field(default_factory=dict)
  iterations: Runs = dataclasses.field(default_factory=dict)
  pairs: Sequence[Mapping[str, Any]] = ()
  imbalance: Mapping[float, Runs] = dataclasses.field(default_factory=dict)

  @property
  def other(self) -> str:
    return next(m for m in self.modalities if m != self.preferred)


def preferred_modality(jt_runs: Sequence[Run], modalities: Sequence[str]) -> str:
  """The modality JT relies on most: the one whose absence costs most accuracy."""
  return min(modalities, key=lambda m: np.mean([r["headline"][f"missing/{m}"] for r in jt_runs]))




def protocol_agreement(points: Mapping[str, Mapping[str, Sequence[float]]], protocol: str
                       ) -> str:
  """One sentence: the largest difference between the PGD accuracies under
  `protocol` and under `default` (`method -> {"pgd/<scope>@<eps>": [cheap,
  default]}`), and the mean signed difference (positive: the cheaper protocol
  is weaker)."""
  diffs = [cheap - default for per_method in points.values()
           for cheap, default in per_method.values()]
  return (f"Protocol check: on the seed-0 runs of {', '.join(points)}, PGD accuracy under "
          f"`{protocol}` differs from the `default` protocol's (50 steps x 5 restarts, both "
          f"losses) by at most {max(abs(d) for d in diffs):.3f} (mean "
          f"{sum(diffs) / len(diffs):+.3f}; {len(diffs)} numbers: the paper's and the bite "
          f"budgets).")
