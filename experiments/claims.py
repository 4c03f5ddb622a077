"""The CRMT paper's observations (Sec. 4.2-4.3), each checked on seeded runs.

A comparison "A beats B on metric" pairs the runs by seed: it holds ("yes")
when A is higher for every seed, fails ("no") when A is never higher, and is
"mixed" otherwise. A claim made of several comparisons is *reproduced* when all
hold, *not reproduced* when none does and *mixed* otherwise (a claim of the
form "X does not help" inverts this). Every row carries its numbers: the mean
difference, its sample standard deviation over seeds and how many seeds agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any

import numpy as np

Runs = Mapping[str, Sequence[Mapping[str, Any]]]
Metric = Callable[[Mapping[str, Any]], float]
CRMT_METHODS = ("crmt", "crmt_at", "crmt_mix")
# The paper's Table 1 rows (Sec. 4.1).
TABLE1_METHODS = ("jt", "gb", "ogm", "pmr", "msefm", "mmat", "mixup") + CRMT_METHODS
REPRODUCED, NOT_REPRODUCED, MIXED, NOT_RUN = "reproduced", "not reproduced", "mixed", "not run"


def headline(key: str) -> Metric:
  """The metric `run["headline"][key]` (e.g. "pgd/multi@0.5")."""
  return lambda run: float(run["headline"][key])


def curve_mean(kind: str, scope: str) -> Metric:
  """The mean accuracy over a curve's radii (its normalised area)."""
  return lambda run: float(np.mean(run["curves"][kind][scope]["accuracy"]))


def curve_at(kind: str, scope: str, eps: float) -> Metric:
  """The curve's accuracy at radius `eps` (a grid point)."""
  def metric(run):
    curve = run["curves"][kind][scope]
    return float(curve["accuracy"][[float(e) for e in curve["eps"]].index(float(eps))])
  return metric


def _outcome(diffs: Sequence[float], what: str) -> dict[str, Any]:
  """"yes" / "no" / "mixed" for per-seed differences that should be positive."""
  diffs = np.asarray(diffs, float)
  wins = int((diffs > 0).sum())
  std = diffs.std(ddof=1) if len(diffs) > 1 else 0.0
  return {"outcome": "yes" if wins == len(diffs) else "no" if wins == 0 else "mixed",
          "text": f"{what}: {diffs.mean():+.3f} ± {std:.3f} ({wins}/{len(diffs)} seeds > 0)"}


def compare(runs: Runs, better: str, worse: str, metric: Metric, what: str) -> dict[str, Any]:
  """`better` against `worse` on `metric`, paired by seed."""
  by_seed = {run["seed"]: run for run in runs[worse]}
  return _outcome([metric(run) - metric(by_seed[run["seed"]]) for run in runs[better]
                   if run["seed"] in by_seed], f"{better} − {worse} {what}")


def verdict(comparisons: Sequence[Mapping[str, Any]], *, inverted: bool = False) -> str:
  outcomes = {c["outcome"] for c in comparisons}
  if inverted:
    return REPRODUCED if "yes" not in outcomes else NOT_REPRODUCED if outcomes == {"yes"} \
        else MIXED
  return REPRODUCED if outcomes == {"yes"} else NOT_REPRODUCED if outcomes == {"no"} else MIXED


def _claim(claim: str, source: str, runs: Runs, needed: Sequence[str],
           comparisons: Callable[[], list[dict[str, Any]]], *, inverted: bool = False
           ) -> dict[str, Any]:
  missing = [m for m in needed if m not in runs]
  if missing:
    return {"claim": claim, "source": source, "verdict": NOT_RUN,
            "evidence": f"methods not run: {', '.join(missing)}"}
  made = comparisons()
  if not made:
    return {"claim": claim, "source": source, "verdict": NOT_RUN,
            "evidence": "no comparison could be made (results missing)"}
  return {"claim": claim, "source": source, "verdict": verdict(made, inverted=inverted),
          "evidence": "; ".join(c["text"] for c in made)}


def mean_over_seeds(runs: Sequence[Mapping[str, Any]], metric: Metric) -> float:
  return float(np.mean([metric(run) for run in runs]))


def preferred_modality(jt_runs: Sequence[Mapping[str, Any]], modalities: Sequence[str]) -> str:
  """The modality JT relies on most: the one whose absence costs most accuracy."""
  return min(modalities, key=lambda m: mean_over_seeds(jt_runs, headline(f"missing/{m}")))


def _best_columns(runs: Runs, columns: Sequence[str]) -> dict[str, Any]:
  table = [m for m in TABLE1_METHODS if m in runs]
  best = {c: max(table, key=lambda m: mean_over_seeds(runs[m], headline(c))) for c in columns}
  wins = [c for c, m in best.items() if m in CRMT_METHODS]
  outcome = "yes" if 2 * len(wins) > len(columns) else "mixed" if wins else "no"
  return {"outcome": outcome, "text": f"a CRMT variant has the best mean in {len(wins)}/"
                                      f"{len(columns)} columns (" + ", ".join(
                                          f"{c}: {m}" for c, m in best.items()) + ")"}


def _gap(modalities: Sequence[str]) -> Metric:
  """Minus the accuracy gap between uni-modal PGD on the two modalities (higher: smaller gap)."""
  first, second = (headline(f"pgd/{m}@1.0") for m in modalities[:2])
  return lambda run: -abs(first(run) - second(run))


def eta_imbalance(matrix: Sequence[Sequence[float | None]]) -> float:
  """Mean |log10 eta^(m1)/eta^(m2)| over the class pairs (0: balanced modalities)."""
  ratio = np.asarray([[np.nan if v is None else v for v in row] for row in matrix], float)
  ratio = ratio[np.isfinite(ratio) & (ratio > 0)]
  return float(np.abs(np.log10(ratio)).mean()) if ratio.size else float("nan")


def _eta_balance(run: Mapping[str, Any]) -> float:
  """Minus the eta imbalance (higher: more balanced indicators)."""
  return -eta_imbalance(run["eta_ratio"]["matrix"])


def _larger_radius(runs: Runs) -> float:
  """The multi-modal grid point above the paper's 0.5 (2x it when on the grid)."""
  grid = [float(e) for e in runs["jt"][0]["curves"]["pgd"]["multi"]["eps"]]
  above = [e for e in grid if e > 0.5]
  return 1.0 if 1.0 in above else above[0] if above else 0.5


def evaluate_claims(runs: Runs, modalities: Sequence[str], *, chance: float
                    ) -> list[dict[str, Any]]:
  """Each observation of the paper checked on `runs` (method -> per-seed results
  with "seed", "headline", "curves" and, for some, "eta_ratio")."""
  del chance  # The claims are relative; chance is reported with the tables.
  multi = [headline("fgm/multi@0.5"), headline("pgd/multi@0.5")]
  table1 = ["clean", "fgm/multi@0.5", "pgd/multi@0.5"] + [f"missing/{m}" for m in modalities]
  rows = [
      _claim("Imbalance methods (GB, OGM, PMR) improve clean accuracy over JT",
             "Sec. 4.2, Table 1", runs, ("jt", "gb", "ogm", "pmr"),
             lambda: [compare(runs, m, "jt", headline("clean"), "clean")
                      for m in ("gb", "ogm", "pmr")]),
      _claim("Robustness methods (MMAT, Mixup, MSEFM) defend better than JT against "
             "multi-modal FGM / PGD at eps 0.5", "Sec. 4.2, Table 1", runs,
             ("jt", "mmat", "mixup", "msefm"),
             lambda: [compare(runs, m, "jt", f, w) for m in ("mmat", "mixup", "msefm")
                      for f, w in zip(multi, ("FGM@0.5", "PGD@0.5"))]),
      _claim("CRMT-based methods are the best in most columns of Table 1", "Sec. 4.2, Table 1",
             runs, ("jt",) + CRMT_METHODS, lambda: [_best_columns(runs, table1)]),
      _claim("CRMT-AT and CRMT-Mix improve on MMAT and Mixup (multi-modal FGM / PGD at 0.5)",
             "Sec. 4.2, Table 1", runs, ("mmat", "crmt_at", "mixup", "crmt_mix"),
             lambda: [compare(runs, a, b, f, w) for a, b in (("crmt_at", "mmat"),
                                                             ("crmt_mix", "mixup"))
                      for f, w in zip(multi, ("FGM@0.5", "PGD@0.5"))]),
  ]
  if len(modalities) >= 2 and "jt" in runs:
    preferred = preferred_modality(runs["jt"], modalities)
    other = next(m for m in modalities if m != preferred)
    rows.append(_claim(
        f"Attacks on JT's preferred modality ({preferred}: its absence costs most) hurt "
        f"more than attacks on {other} (uni-modal FGM / PGD at 1.0)", "Sec. 3.3, Fig. 1, "
        "Table 2", runs, ("jt",),
        lambda: [_preferred_hurts(runs["jt"], preferred, other, kind)
                 for kind in ("fgm", "pgd")]))
    rows.append(_claim(
        "CRMT narrows the gap between uni-modal PGD attacks on the two modalities",
        "Sec. 4.3, Fig. 4, Table 2", runs, ("jt", "crmt"),
        lambda: [compare(runs, "crmt", "jt", _gap(modalities), "−|gap| at 1.0")]))
  rows.append(_claim(
      "CRMT balances the uni-modal vulnerability indicators (smaller |log10 eta ratio|)",
      "Sec. 4.3, Fig. 3", runs, ("jt", "crmt"),
      lambda: [compare(runs, a, b, _eta_balance, "−mean|log10 eta ratio|")
               for a, b in (("crmt", "jt"), ("crmt_at", "mmat"))
               if a in runs and b in runs and "eta_ratio" in runs[a][0]
               and "eta_ratio" in runs[b][0]]))
  rows.append(_claim(
      "The orthogonal head alone (OJT) does not improve robustness over JT", "Sec. 4.3, Fig. 5",
      runs, ("jt", "ojt"),
      lambda: [compare(runs, "ojt", "jt", curve_mean("pgd", "multi"), "mean PGD accuracy")],
      inverted=True))
  rows.append(_claim(
      "Each CRMT step improves multi-modal robustness, and together they do best",
      "Sec. 4.3, Fig. 5", runs, ("jt", "crmt_step1", "crmt_step2", "crmt"),
      lambda: [compare(runs, a, b, curve_mean("pgd", "multi"), "mean PGD accuracy")
               for a, b in (("crmt_step1", "jt"), ("crmt_step2", "jt"), ("crmt", "crmt_step1"),
                            ("crmt", "crmt_step2"))]))
  if "jt" in runs:
    large = _larger_radius(runs)
    at = functools.partial(curve_at, "pgd", "multi")
    rows.append(_claim(
        "The CRMT steps help most at larger radii", "Sec. 4.3, Fig. 5", runs,
        ("jt", "crmt_step1", "crmt_step2", "crmt"),
        lambda: [compare(runs, m, "jt", lambda run: at(large)(run) - at(0.5)(run),
                         f"(accuracy at {large:g} − at 0.5)")
                 for m in ("crmt_step1", "crmt_step2", "crmt")]))
  return rows


def _preferred_hurts(jt_runs: Sequence[Mapping[str, Any]], preferred: str, other: str,
                     kind: str) -> dict[str, Any]:
  """JT's accuracy under a uni-modal attack on `other` minus on `preferred`."""
  return _outcome([run["headline"][f"{kind}/{other}@1.0"]
                   - run["headline"][f"{kind}/{preferred}@1.0"] for run in jt_runs],
                  f"jt {kind.upper()}@1.0 on {other} − on {preferred}")


def markdown(rows: Sequence[Mapping[str, Any]]) -> str:
  """The claims as a markdown table."""
  lines = ["| claim | paper | verdict | evidence (mean ± std over seeds) |", "|---|---|---|---|"]
  cell = lambda text: text.replace("|", "\\|")
  lines += [f"| {cell(r['claim'])} | {r['source']} | **{r['verdict']}** | "
            f"{cell(r['evidence'])} |" for r in rows]
  return "\n".join(lines) + "\n"


def protocol_agreement(pairs: Mapping[str, tuple[Mapping[str, float], Mapping[str, float]]],
                       protocol: str) -> str:
  """One sentence: the largest difference between the PGD accuracies under
  `protocol` and under `default` at the points both measured (`method ->
  (cheap, default)`, each `{"pgd/<scope>@<eps>": accuracy}`), and the mean
  signed difference (positive: the cheaper protocol is weaker)."""
  diffs = [cheap[k] - default[k] for cheap, default in pairs.values()
           for k in default if k in cheap]
  return (f"Protocol check: on the seed-0 runs of {', '.join(pairs)}, PGD accuracy under "
          f"`{protocol}` differs from the `default` protocol's by at most "
          f"{max(abs(d) for d in diffs):.3f} (mean {sum(diffs) / len(diffs):+.3f}; "
          f"{len(diffs)} numbers: the paper's budgets and 4x them).")
