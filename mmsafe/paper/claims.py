"""The CRMT paper's claims (Sec. 3.3, 4.2-4.3, Tables 1-3, Figs. 1, 3-5, App. 8.3):
`CLAIMS` lists every claim of the experiments section, each with the comparisons
that judge it on seeded runs (`mmsafe.paper.evidence`), or the reason it is not
checked; `evaluate_claims` gives every verdict, `markdown` the table."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np

from mmsafe.eval import statistics
from mmsafe.paper.evidence import (
    ACCURACY_EFFECT, ALL, ANY, BITE, CORRELATION_EFFECT, CRMT_BASES, CRMT_METHODS,
    ETA_EFFECT, IMBALANCE_METHODS, MAJORITY, MULTI, NOT_CHECKED, NOT_RUN, PAPER,
    ROBUSTNESS_METHODS, TABLE1_METHODS, Budgets, Evidence, Outcome, against_zero, area, clean,
    combine, common_seeds, compare, eta_balance, eta_log_ratio, missing, robust, stacked)


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
  values = {name: stacked(runs, [name], outcome, seeds) for name in runs}
  gain = lambda level: values[f"crmt@{level}"] - values[f"jt@{level}"]
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
