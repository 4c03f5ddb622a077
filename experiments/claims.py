"""The CRMT paper's claims (Sec. 3.3, 4.2-4.3, Tables 1-3, Figs. 1, 3-5, App. 8.3),
each judged on seeded runs with an interval.

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
`CLAIMS` lists every claim of the experiments section, with the reason where
one is not checked.
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


def _stacked(runs: Runs, methods: Sequence[str], outcome: Outcome, seeds: Sequence[int]
             ) -> np.ndarray:
  """[S, N] (or [S]) of `outcome`, averaged over `methods` (a group's mean)."""
  return np.mean([[outcome(_by_seed(runs[m])[s]) for s in seeds] for m in methods], axis=0)


def common_seeds(runs: Runs, methods: Sequence[str]) -> list[int]:
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
      _stacked(runs, group_a, outcome, seeds),
      _stacked(runs, group_b, worse_outcome or outcome, seeds))
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
# The evidence a claim reads, and the claims.


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
      statistics (`experiments.reproduction_report.pair_points`), or [].
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


@dataclasses.dataclass(frozen=True)
class Claim:
  """One claim of the paper.

  Attributes:
    key: short identifier.
    text: the claim, as mmsafe tests it.
    source: where the paper makes it.
    needs: methods of `Evidence.runs` it reads (others are in `part`).
    judge: `(evidence, budgets) -> (tests, rule)`; None: not checked.
    budgeted: judged at each budget (PAPER, BITE) rather than once.
    part: the experiment it needs besides the main one ("transformer",
      "iterations", "pairs", "imbalance"), or "".
    reason: why it is not checked (when `judge` is None).
  """

  key: str
  text: str
  source: str
  needs: tuple[str, ...] = ()
  judge: Callable[[Evidence, Budgets], tuple[list[dict], str]] | None = None
  budgeted: bool = False
  part: str = ""
  reason: str = ""


def _attack(kind: str, scope: str, budgets: Budgets) -> Outcome:
  return robust(kind, scope, budgets.multi if scope == MULTI else budgets.uni[scope])


def _table1_columns(budgets: Budgets) -> dict[str, Outcome]:
  return {"clean": clean, f"FGM@{budgets.multi:g}": _attack("fgm", MULTI, budgets),
          f"PGD@{budgets.multi:g}": _attack("pgd", MULTI, budgets)}


def _imbalance_clean(ev: Evidence, _: Budgets):
  return [compare(ev.runs, m, "jt", clean, "clean") for m in IMBALANCE_METHODS], ALL


def _robust_defend(ev: Evidence, b: Budgets):
  return [compare(ev.runs, m, "jt", _attack(k, MULTI, b), f"{k.upper()}@{b.multi:g}")
          for m in ROBUSTNESS_METHODS for k in ("fgm", "pgd")], ALL


def _robust_vs_imbalance(ev: Evidence, b: Budgets):
  return [compare(ev.runs, ROBUSTNESS_METHODS, IMBALANCE_METHODS, _attack(k, MULTI, b),
                  f"{k.upper()}@{b.multi:g}") for k in ("fgm", "pgd")], ALL


def _gb_msefm(ev: Evidence, b: Budgets):
  return [compare(ev.runs, "gb", "msefm", outcome, column)
          for column, outcome in _table1_columns(b).items()], ANY


def _best(ev: Evidence, methods: Sequence[str], outcome: Outcome) -> str:
  present = [m for m in methods if m in ev.runs]
  return max(present, key=lambda m: float(np.mean([np.mean(outcome(r)) for r in ev.runs[m]])))


def _crmt_best(ev: Evidence, b: Budgets):
  others = [m for m in TABLE1_METHODS if m not in CRMT_METHODS]
  tests = []
  for column, outcome in _table1_columns(b).items():
    tests.append(compare(ev.runs, _best(ev, CRMT_METHODS, outcome), _best(ev, others, outcome),
                         outcome, f"{column} (best of each group by mean)"))
  return tests, MAJORITY


def _improves_base(variant: str):
  def judge(ev: Evidence, b: Budgets):
    return [compare(ev.runs, variant, CRMT_BASES[variant], outcome, column)
            for column, outcome in _table1_columns(b).items()], ALL
  return judge


def _non_crmt(ev: Evidence) -> list[str]:
  return [m for m in TABLE1_METHODS if m not in CRMT_METHODS and m in ev.runs]


def _missing_preferred(ev: Evidence, _: Budgets):
  return [compare(ev.runs, m, m, missing(ev.other), f"without {ev.other} − without "
                  f"{ev.preferred}", worse_outcome=missing(ev.preferred))
          for m in _non_crmt(ev)], ALL


def _common_radius(ev: Evidence, b: Budgets) -> float:
  """One radius for attacks on either modality: the paper's 1.0, or the curve
  radius nearest (in log scale) the preferred modality's bite budget."""
  target = b.uni[ev.preferred]
  return min(ev.uni_grid, key=lambda eps: abs(np.log(eps / target)))


def _uni_preferred(ev: Evidence, b: Budgets):
  eps = _common_radius(ev, b)
  return [compare(ev.runs, m, m, robust(k, ev.other, eps),
                  f"{k.upper()}@{eps:g} on {ev.other} − on {ev.preferred}",
                  worse_outcome=robust(k, ev.preferred, eps))
          for m in _non_crmt(ev) for k in ("fgm", "pgd")], ALL


def _crmt_uni(ev: Evidence, b: Budgets):
  tests = []
  for variant, base in CRMT_BASES.items():
    for m in ev.modalities:
      for k in ("fgm", "pgd"):
        tests.append(compare(ev.runs, variant, base, _attack(k, m, b),
                             f"{k.upper()}@{b.uni[m]:g} on {m}"))
      tests.append(compare(ev.runs, variant, base, missing(m), f"without {m}"))
  return tests, MAJORITY


def _preferred_curve(ev: Evidence, _: Budgets):
  return [compare(ev.runs, m, m, area("pgd", ev.other, ev.uni_grid),
                  f"PGD area on {ev.other} − on {ev.preferred}",
                  worse_outcome=area("pgd", ev.preferred, ev.uni_grid))
          for m in _non_crmt(ev)], ALL


def _eta_balance(ev: Evidence, _: Budgets):
  return [compare(ev.runs, a, b, eta_balance, "−mean|log10 eta ratio|", effect=ETA_EFFECT)
          for a, b in (("crmt", "jt"), ("crmt_at", "mmat"))], ALL


def _preferred_eta(ev: Evidence, _: Budgets):
  values = np.asarray([eta_log_ratio(r, ev.preferred) for r in ev.runs["jt"]])
  if len(values) < 2:
    return [{"verdict": NOT_RUN, "text": "fewer than 2 seeds"}], ALL
  return [against_zero(values, f"jt mean log10 eta({ev.preferred}) / eta({ev.other})",
                       effect=ETA_EFFECT)], ALL


def _gap(ev: Evidence) -> Outcome:
  """Per example: robust area on the other modality minus on the preferred one."""
  other, preferred = (area("pgd", m, ev.uni_grid) for m in (ev.other, ev.preferred))
  return lambda run: other(run) - preferred(run)


def _narrows_gap(ev: Evidence, _: Budgets):
  return [compare(ev.runs, "jt", "crmt", _gap(ev), "gap (area on "
                  f"{ev.other} − on {ev.preferred}): JT's − CRMT's")], ALL


def _ojt(ev: Evidence, _: Budgets):
  return [compare(ev.runs, "ojt", "jt", area("pgd", MULTI, ev.multi_grid),
                  "multi-modal PGD area", kind=statistics.EQUIVALENT)], ALL


def _steps(ev: Evidence, _: Budgets):
  outcome = area("pgd", MULTI, ev.multi_grid)
  return [compare(ev.runs, a, b, outcome, "multi-modal PGD area")
          for a, b in (("crmt_step1", "jt"), ("crmt_step2", "jt"), ("crmt", "crmt_step1"),
                       ("crmt", "crmt_step2"))], ALL


def _larger_radii(ev: Evidence, _: Budgets):
  small, large = ev.budgets[PAPER].multi, ev.budgets[BITE].multi
  outcome = lambda run: robust("pgd", MULTI, large)(run) - robust("pgd", MULTI, small)(run)
  return [compare(ev.runs, m, "jt", outcome, f"(PGD@{large:g} − PGD@{small:g})")
          for m in ("crmt_step1", "crmt_step2", "crmt")], ALL


def _transformer(ev: Evidence, b: Budgets):
  columns = dict(_table1_columns(b))
  for m in ev.modalities:
    for k in ("fgm", "pgd"):
      columns[f"{k.upper()}@{b.uni[m]:g} on {m}"] = _attack(k, m, b)
  return [compare(ev.transformer, "crmt_step1", "jt", outcome, column)
          for column, outcome in columns.items()], MAJORITY


def _one_iteration(ev: Evidence, _: Budgets):
  return [compare(ev.iterations, "crmt_2iter", "crmt", area("pgd", MULTI, ev.multi_grid),
                  "multi-modal PGD area", kind=statistics.EQUIVALENT)], ALL


def _eta_predicts(ev: Evidence, _: Budgets):
  x = [p["eta_log_ratio"] for p in ev.pairs]
  y = [p["attack_gap"] for p in ev.pairs]
  if len({p["pair"] for p in ev.pairs}) < 3:
    return [{"verdict": NOT_RUN, "text": "fewer than 3 modality pairs"}], ALL
  interval = statistics.spearman_interval(x, y, groups=[p["pair"] for p in ev.pairs])
  result = statistics.verdict(interval, effect=CORRELATION_EFFECT)
  return [{"verdict": result, "interval": interval.to_dict(), "effect": CORRELATION_EFFECT,
           "kind": statistics.IMPROVES,
           "text": f"Spearman(log10 eta(m1)/eta(m2), PGD area on m2 − on m1) over "
                   f"{len(x)} runs of {interval.num_seeds} pairs: {interval.text()}"}], ALL


def _imbalance_grows(ev: Evidence, _: Budgets):
  levels = sorted(ev.imbalance)
  low, high = levels[0], levels[-1]
  outcome = area("pgd", MULTI, ev.multi_grid)
  runs = {f"{m}@{level}": ev.imbalance[level][m] for level in (low, high)
          for m in ("jt", "crmt")}
  seeds = common_seeds(runs, list(runs))
  if len(seeds) < 2:
    return [{"verdict": NOT_RUN, "text": "fewer than 2 common seeds"}], ALL
  stacked = {name: _stacked(runs, [name], outcome, seeds) for name in runs}
  gain = lambda level: stacked[f"crmt@{level}"] - stacked[f"jt@{level}"]
  return [against_zero(gain(high) - gain(low), f"CRMT − JT multi-modal PGD area at noise "
                       f"{high:g} minus at {low:g}", effect=ACCURACY_EFFECT)], ALL


CLAIMS: tuple[Claim, ...] = (
    Claim("imbalance_clean", "Imbalance methods (GB, OGM, PMR) improve clean accuracy over JT",
          "Sec. 4.2 (1st observation), Table 1", ("jt",) + IMBALANCE_METHODS, _imbalance_clean),
    Claim("robustness_defend", "Robustness methods (MSEFM, MMAT, Mixup) defend better than JT "
          "against multi-modal FGM and PGD", "Sec. 4.2 (1st observation), Table 1",
          ("jt",) + ROBUSTNESS_METHODS, _robust_defend, budgeted=True),
    Claim("robustness_vs_imbalance", "Robustness methods defend better than imbalance methods "
          "(group means, multi-modal FGM and PGD)", "Sec. 4.2 (1st observation), Table 1",
          IMBALANCE_METHODS + ROBUSTNESS_METHODS, _robust_vs_imbalance, budgeted=True),
    Claim("gb_over_msefm", "GB can be superior to MSEFM in some situations (some Table 1 "
          "column)", "Sec. 4.2 (2nd observation), Table 1", ("gb", "msefm"), _gb_msefm,
          budgeted=True),
    Claim("crmt_best", "CRMT-based methods are the best in most Table 1 columns (clean, FGM, "
          "PGD): best CRMT variant vs best other method", "Sec. 4.2 (3rd observation), Table 1",
          TABLE1_METHODS, _crmt_best, budgeted=True),
    Claim("crmt_jt_over_jt", "CRMT-JT improves on JT in clean, FGM and PGD accuracy",
          "Table 1 caption", ("crmt", "jt"), _improves_base("crmt"), budgeted=True),
    Claim("crmt_at_over_mmat", "CRMT-AT improves on MMAT in clean, FGM and PGD accuracy",
          "Sec. 4.2 (4th observation), Table 1", ("crmt_at", "mmat"), _improves_base("crmt_at"),
          budgeted=True),
    Claim("crmt_mix_over_mixup", "CRMT-Mix improves on Mixup in clean, FGM and PGD accuracy",
          "Sec. 4.2 (4th observation), Table 1", ("crmt_mix", "mixup"),
          _improves_base("crmt_mix"), budgeted=True),
    Claim("missing_preferred", "Without the preferred modality, accuracy falls further than "
          "without the other (every method without CRMT)", "Sec. 4.2, Table 2",
          TABLE1_METHODS[:7], _missing_preferred),
    Claim("uni_preferred", "Methods without CRMT are more vulnerable to uni-modal FGM / PGD on "
          "the preferred modality (same eps on both modalities)", "Sec. 4.2, Table 2",
          TABLE1_METHODS[:7], _uni_preferred, budgeted=True),
    Claim("crmt_uni", "CRMT variants are more robust than their base methods against uni-modal "
          "attacks and a missing modality (most Table 2 columns)", "Sec. 4.2, Table 2",
          TABLE1_METHODS, _crmt_uni, budgeted=True),
    Claim("preferred_curve", "Every method without CRMT is more vulnerable to PGD on the "
          "preferred modality over the whole range of radii", "Sec. 1, Fig. 1",
          TABLE1_METHODS[:7], _preferred_curve),
    Claim("preferred_eta", "JT's preferred modality has the larger vulnerability indicator eta",
          "Sec. 3.3", ("jt",), _preferred_eta),
    Claim("eta_predicts", "Across modality pairs, the modality with the larger eta is the one "
          "whose attack hurts more (rank correlation > 0.1)", "Sec. 3.3, Prop. 3.4", (),
          _eta_predicts, part="pairs"),
    Claim("eta_balanced", "CRMT balances the vulnerability indicators (CRMT vs JT, CRMT-AT vs "
          "MMAT)", "Sec. 4.2, Fig. 3", ("jt", "crmt", "mmat", "crmt_at"), _eta_balance),
    Claim("gap_narrows", "CRMT narrows the gap between uni-modal PGD on the two modalities over "
          "the whole curve", "Sec. 4.2, Fig. 4", ("jt", "crmt"), _narrows_gap),
    Claim("ojt_no_help", "The orthogonal head alone (OJT) does not change robustness "
          "(equivalence, multi-modal PGD area)", "Sec. 4.3, Fig. 5", ("jt", "ojt"), _ojt),
    Claim("each_step_helps", "Each CRMT step improves multi-modal robustness, and together they "
          "do best", "Sec. 4.3, Fig. 5", ("jt", "crmt_step1", "crmt_step2", "crmt"), _steps),
    Claim("larger_radii", "The CRMT steps help most at larger radii (gain at the bite budget "
          "minus gain at 0.5)", "Sec. 4.3, Fig. 5", ("jt", "crmt_step1", "crmt_step2", "crmt"),
          _larger_radii),
    Claim("transformer", "CRMT step 1 improves the multi-modal transformer in most Table 3 "
          "columns", "Sec. 4.3, Table 3", (), _transformer, budgeted=True, part="transformer"),
    Claim("one_iteration", "One iteration of the two steps suffices: a second one does not "
          "change robustness (equivalence)", "Sec. 3.4, App. 8.3", (), _one_iteration,
          part="iterations"),
    Claim("gain_grows_with_imbalance", "CRMT's gain over JT grows with the modality imbalance "
          "(noise dialled into one modality)", "Sec. 3.3-3.4 (the argument; mmsafe's dial)",
          (), _imbalance_grows, part="imbalance"),
    Claim("paper_datasets", "The numbers of Tables 1-3 on Kinetics-Sounds, UCF101 and VGGSound",
          "Sec. 4, Tables 1-3", reason="the paper's datasets are manual YouTube downloads; "
          "mmsafe checks the claims' direction on its embedded datasets"),
    Claim("gb_margin_explanation", "GB beats MSEFM because its uni-modal tasks enlarge the "
          "uni-modal margins", "Sec. 4.2 (2nd observation)",
          reason="an explanation, not an observation; its observation is gb_over_msefm"),
    Claim("superiority_explanation", "CRMT's gains stem from enlarged uni-modal margins and the "
          "certified adjustment of the modality weights", "Sec. 4.2 (3rd observation)",
          reason="an explanation; its parts are tested by each_step_helps and ojt_no_help"),
)


def evaluate_claims(evidence: Evidence) -> list[dict[str, Any]]:
  """Every claim of `CLAIMS` judged on `evidence`: {"key", "claim", "source",
  "verdicts": {PAPER | BITE: verdict} (one entry, PAPER, for a claim that is not
  judged per budget), "tests": {budget: [comparison]}, "reason"}."""
  parts = {"transformer": evidence.transformer, "iterations": evidence.iterations,
           "pairs": evidence.pairs, "imbalance": evidence.imbalance}
  rows = []
  for claim in CLAIMS:
    row = {"key": claim.key, "claim": claim.text, "source": claim.source, "verdicts": {},
           "tests": {}, "reason": claim.reason}
    lacking = [m for m in claim.needs if m not in evidence.runs]
    if claim.judge is None:
      row["verdicts"] = {PAPER: NOT_CHECKED}
    elif lacking or (claim.part and not parts[claim.part]):
      row["verdicts"] = {PAPER: NOT_RUN}
      row["reason"] = (f"methods not run: {', '.join(lacking)}" if lacking
                       else f"experiment part {claim.part!r} not run")
    else:
      for name in ((PAPER, BITE) if claim.budgeted else (PAPER,)):
        if name not in evidence.budgets:
          continue
        tests, rule = claim.judge(evidence, evidence.budgets[name])
        row["verdicts"][name] = combine(tests, rule)
        row["tests"][name] = tests
        row["rule"] = rule
    rows.append(row)
  return rows


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The claims as a markdown table: verdicts at the paper's and the bite
  budgets ("—": not a budget claim) and the evidence (mean difference [95%
  interval] per comparison)."""
  lines = ["| claim | paper | verdict (paper budgets) | verdict (bite budgets) | evidence |",
           "|---|---|---|---|---|"]
  cell = lambda text: str(text).replace("|", "\\|")
  for row in rows:
    verdicts = row["verdicts"]
    evidence = row["reason"] or " / ".join(
        (f"{name}: " if len(row["tests"]) > 1 else "") + "; ".join(t["text"] for t in tests)
        for name, tests in row["tests"].items())
    if row.get("rule") and row["tests"]:
      evidence = f"({row['rule']} of {len(next(iter(row['tests'].values())))}) " + evidence
    lines.append(f"| {cell(row['claim'])} | {row['source']} | **{verdicts.get(PAPER, '')}** | "
                 f"{'**' + verdicts[BITE] + '**' if BITE in verdicts else '—'} | "
                 f"{cell(evidence)} |")
  return "\n".join(lines) + "\n"


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
