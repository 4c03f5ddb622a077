"""The report of a reproduction (`mmsafe.paper.reproduction`): the claims table
first, then the budgets, Tables 1-3 (mean ± sample std over seeds, at the
paper's and at the calibrated budgets), the modality-pair study, the imbalance
dial, the compute it took, and the figures (PNG)."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
import os
from typing import Any

import numpy as np

from mmsafe import files
from mmsafe.eval import plots
from mmsafe.eval import statistics
from mmsafe.paper import budgets as budgets_lib
from mmsafe.paper import claims as claims_lib
from mmsafe.paper import evidence
from mmsafe.paper import reproduction
from mmsafe.paper import runs as runs_lib
from mmsafe.paper.evidence import curve_point

MULTI = evidence.MULTI
Runs = dict[str, list[dict[str, Any]]]


def grouped(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Runs]]:
  """part -> setting -> method -> runs (sorted by seed); runs that diverged
  (nothing to evaluate) are left out: the report lists them."""
  out: dict[str, dict[str, Runs]] = {}
  for result in results:
    if result.get("diverged"):
      continue
    out.setdefault(result["part"], {}).setdefault(result["setting"], {}).setdefault(
        result["method"], []).append(dict(result))
  for settings in out.values():
    for runs in settings.values():
      for method in runs:
        runs[method].sort(key=lambda r: r["seed"])
  return out


def mean_std(values: Sequence[float]) -> dict[str, Any]:
  """Mean and sample standard deviation (ddof 1; 0 for one value)."""
  values = np.asarray(values, float)
  return {"mean": float(values.mean()),
          "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
          "values": values.tolist()}


def _cell(values: Sequence[float]) -> str:
  stat = mean_std(values)
  return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def columns(budgets: evidence.Budgets, modalities: Sequence[str], table: str
            ) -> dict[str, Any]:
  """Column name -> `run -> value` of Table 1 (clean, multi-modal FGM / PGD),
  Table 2 (clean, uni-modal FGM / PGD per modality, missing) or Table 3
  (clean, uni-modal then multi-modal FGM / PGD) at `budgets`."""
  multi = {f"{k.upper()}@{budgets.multi:g}":
           (lambda r, k=k: curve_point(r, k, MULTI, budgets.multi)) for k in ("fgm", "pgd")}
  uni = {f"{k.upper()} {m}@{budgets.uni[m]:g}":
         (lambda r, k=k, m=m: curve_point(r, k, m, budgets.uni[m]))
         for k in ("fgm", "pgd") for m in modalities}
  clean = {"clean": lambda r: float(r["headline"]["clean"])}
  if table == "Table 1":
    return {**clean, **multi}
  if table == "Table 2":
    return {**clean, **uni, **{f"without {m}": (lambda r, m=m: float(r["missing"][m]["zeros"]))
                               for m in modalities}}
  return {**clean, **uni, **multi}


def table_rows(runs: Runs, methods: Sequence[str], cols: Mapping[str, Any]) -> list[list[str]]:
  rows = [["method"] + list(cols)]
  for method in methods:
    if method in runs:
      rows.append([method] + [_cell([fn(r) for r in runs[method]]) for fn in cols.values()])
  return rows


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
  return "\n".join(lines) + "\n"


def curve_summary(runs: Sequence[Mapping[str, Any]], kind: str, scope: str,
                  grid: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
  """Mean, mean - std and mean + std over seeds of a curve at `grid`."""
  values = np.asarray([[curve_point(r, kind, scope, e) for e in grid] for r in runs])
  std = values.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(grid))
  return values.mean(0).tolist(), (values.mean(0) - std).tolist(), (values.mean(0) + std).tolist()


# ---------------------------------------------------------------------------
# The pairs study and the imbalance dial.


def pair_points(pairs: Mapping[str, Runs], uni_grid: Sequence[float]) -> list[dict[str, Any]]:
  """One point per run with an eta ratio: the pair "m1+m2", the method, the
  seed, x = mean log10 eta^(m1)/eta^(m2) over class pairs and y = PGD area on
  m2 minus on m1 (Prop. 3.4 predicts y rises with x: the modality with the
  larger eta is the easier one to attack)."""
  points = []
  for pair, runs in pairs.items():
    first, second = pair.split("+")
    for method, seeded in runs.items():
      for run in seeded:
        if "eta_ratio" not in run:
          continue
        area = lambda m: float(np.mean([curve_point(run, "pgd", m, e) for e in uni_grid]))
        points.append({"pair": pair, "method": method, "seed": run["seed"],
                       "eta_log_ratio": evidence.eta_log_ratio(run, first),
                       "attack_gap": area(second) - area(first)})
  return points


def pair_table(pairs: Mapping[str, Runs], budgets: Mapping[str, Any]) -> list[list[str]]:
  """Per pair: JT's clean and bite-budget PGD accuracy (multi-modal and on each
  modality), and CRMT's and each baseline's paired difference to JT at the
  multi-modal bite budget, with its 95% interval over seeds and examples."""
  present = {method for runs in pairs.values() for method in runs}
  others = [m for m in reproduction.PAIR_METHODS if m in present and m != "jt"]
  others += sorted(present - {"jt", *others})
  rows = [["pair", "bite eps (multi / m1 / m2)", "JT clean", "JT PGD multi", "JT PGD m1",
           "JT PGD m2"] + [f"{m} − JT PGD multi" for m in others]]
  for pair, runs in sorted(pairs.items()):
    if "jt" not in runs:
      continue
    first, second = pair.split("+")
    bite = budgets[pair][evidence.BITE]
    jt = runs["jt"]
    row = [pair, f"{bite.multi:g} / {bite.uni[first]:g} / {bite.uni[second]:g}",
           _cell([r["headline"]["clean"] for r in jt]),
           _cell([curve_point(r, "pgd", MULTI, bite.multi) for r in jt]),
           _cell([curve_point(r, "pgd", first, bite.uni[first]) for r in jt]),
           _cell([curve_point(r, "pgd", second, bite.uni[second]) for r in jt])]
    for method in others:
      if method not in runs:
        row.append("—")
        continue
      test = evidence.compare(runs, method, "jt",
                                evidence.robust("pgd", MULTI, bite.multi), "")
      row.append(test["text"].split(": ", 1)[1] + f" ({test['verdict']})"
                 if "interval" in test else test["verdict"])
    rows.append(row)
  return rows


def correlations(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Spearman's rank correlation of the pair points, pooled and per method, with
  bootstrap intervals over pairs."""
  out = {}
  for name in ["all"] + sorted({p["method"] for p in points}):
    chosen = [p for p in points if name == "all" or p["method"] == name]
    if len({p["pair"] for p in chosen}) < 3:
      continue
    interval = statistics.spearman_interval([p["eta_log_ratio"] for p in chosen],
                                            [p["attack_gap"] for p in chosen],
                                            groups=[p["pair"] for p in chosen])
    out[name] = dict(interval.to_dict(), num_points=len(chosen))
  return out


def dial(imbalance: Mapping[float, Runs], multi_grid: Sequence[float]) -> list[dict[str, Any]]:
  """Per noise strength: JT's and CRMT's multi-modal PGD area (mean over seeds)
  and CRMT − JT with its 95% interval over seeds and examples."""
  outcome = evidence.area("pgd", MULTI, multi_grid)
  rows = []
  for level in sorted(imbalance):
    runs = imbalance[level]
    if not all(m in runs for m in ("jt", "crmt")):
      continue
    test = evidence.compare(runs, "crmt", "jt", outcome, "multi-modal PGD area")
    rows.append({"noise": level, **{f"{m}_area": float(np.mean([np.mean(outcome(r))
                                                                  for r in runs[m]]))
                                    for m in ("jt", "crmt")},
                 **{f"{m}_clean": float(np.mean([r["headline"]["clean"] for r in runs[m]]))
                    for m in ("jt", "crmt")},
                 "gain": test.get("interval"), "verdict": test["verdict"]})
  return rows


# ---------------------------------------------------------------------------
# Figures.


def _study_figures(points, dial_rows, outdir: str) -> dict[str, str]:
  """The pairs scatter (eta ratio against the attack gap) and the imbalance dial."""
  paths = {}
  if points:
    by_method: dict[str, tuple[list, list]] = {}
    for p in points:
      xs, ys = by_method.setdefault(p["method"], ([], []))
      xs.append(p["eta_log_ratio"])
      ys.append(p["attack_gap"])
    paths["pairs"] = plots.plot_points(
        by_method, os.path.join(outdir, "pairs_eta_vs_attack_gap.png"),
        xlabel="mean log10 eta(m1) / eta(m2)", ylabel="PGD area on m2 − on m1",
        title="does eta predict the weaker modality? (one point per run)")
  if dial_rows:
    levels = [row["noise"] for row in dial_rows]
    gains = [row["gain"] for row in dial_rows]
    paths["imbalance"] = plots.plot_points(
        {"CRMT − JT": (levels, [g["mean"] for g in gains])},
        os.path.join(outdir, "imbalance_dial.png"), lines=True,
        errors={"CRMT − JT": ([g["low"] for g in gains], [g["high"] for g in gains])},
        xlabel="noise strength on the weaker modality",
        ylabel="gain in multi-modal PGD area", title="CRMT's gain against imbalance (95% CI)")
  return paths


def figures(main: Runs, judged: evidence.Evidence, points, dial_rows, outdir: str
            ) -> dict[str, str]:
  """Fig. 1 per modality (every method, distinct styles), Fig. 3 (one colour
  scale), Fig. 4 (JT and CRMT on each modality, seed spread shaded), Fig. 5
  (the ablation), the pairs scatter and the imbalance dial."""
  paths = {}
  methods = [m for m in reproduction.MAIN_METHODS if m in main]
  styles = plots.distinct_styles(methods)
  uni, multi = judged.uni_grid, judged.multi_grid
  for m in judged.modalities:
    paths[f"fig1_{m}"] = plots.plot_robust_accuracy(
        {method: (uni, curve_summary(main[method], "pgd", m, uni)[0]) for method in methods},
        os.path.join(outdir, f"fig1_pgd_{m}.png"), styles=styles, log_x=True,
        title=f"uni-modal l2-PGD on {m} (mean over seeds)")
  heat = {method: main[method][0]["eta_ratio"]["matrix"] for method in methods
          if "eta_ratio" in main[method][0]}
  if heat:
    eta = main[next(iter(heat))][0]["eta_ratio"]
    paths["fig3"] = plots.plot_eta_ratio_heatmaps(
        {method: np.asarray([[np.nan if v is None else v for v in row] for row in matrix])
         for method, matrix in heat.items()}, os.path.join(outdir, "fig3_eta.png"),
        numerator=eta["numerator"], denominator=eta["denominator"],
        title="eta ratio per class pair (seed 0), one colour scale")
  pair = [method for method in ("jt", "crmt") if method in main]
  if pair:
    curves, bands = {}, {}
    for method in pair:
      for m in judged.modalities:
        mean, low, high = curve_summary(main[method], "pgd", m, uni)
        curves[f"{method} (attack on {m})"] = (uni, mean)
        bands[f"{method} (attack on {m})"] = (low, high)
    paths["fig4"] = plots.plot_robust_accuracy(
        curves, os.path.join(outdir, "fig4_uni_modal_jt_crmt.png"), bands=bands, log_x=True,
        styles=plots.distinct_styles(list(curves)),
        title="attacks on each modality: JT vs CRMT (± std over seeds)")
  ablation = [m for m in reproduction.ABLATION_METHODS if m in main]
  if ablation:
    summaries = {m: curve_summary(main[m], "pgd", MULTI, multi) for m in ablation}
    paths["fig5"] = plots.plot_robust_accuracy(
        {m: (multi, s[0]) for m, s in summaries.items()},
        os.path.join(outdir, "fig5_ablation.png"), log_x=True,
        bands={m: (s[1], s[2]) for m, s in summaries.items()},
        styles=plots.distinct_styles(ablation), title="ablation: multi-modal l2-PGD (± std)")
  paths.update(_study_figures(points, dial_rows, outdir))
  return paths


# ---------------------------------------------------------------------------
# The report.


def build_evidence(groups: Mapping[str, Mapping[str, Runs]], modalities: Sequence[str],
                   calibration: Mapping[str, Any]) -> evidence.Evidence:
  """The claims' evidence from the grouped results (`grouped`) and the budgets."""
  main = groups["main"]["default"]
  preferred = evidence.preferred_modality(main["jt"], modalities)
  pairs = dict(groups.get("pairs", {}))
  if pairs:
    studied = {method for runs in pairs.values() for method in runs}  # (the plan's pair_methods)
    pairs["+".join(modalities)] = {m: main[m] for m in sorted(studied) if m in main}
  imbalance = {float(setting[len("noise"):]): runs
               for setting, runs in groups.get("imbalance", {}).items()}
  if imbalance:
    imbalance[0.0] = {m: main[m] for m in reproduction.IMBALANCE_METHODS if m in main}
  iterations = {}
  if "iterations" in groups and "crmt" in main:
    iterations = {"crmt": main["crmt"], **groups["iterations"]["default"]}
  return evidence.Evidence(
      runs=main, modalities=tuple(modalities), preferred=preferred,
      budgets=budgets_lib.budgets_of(calibration["default"], modalities),
      multi_grid=runs_lib.MULTI_GRID, uni_grid=runs_lib.UNI_GRID,
      transformer=groups.get("transformer", {}).get("default", {}), iterations=iterations,
      pairs=pair_points(pairs, runs_lib.UNI_GRID) if pairs else [], imbalance=imbalance)


def _budget_lines(calibration: Mapping[str, Any]) -> list[str]:
  rows = [["setting", "scope"] + [f"JT ≈ {t:g}" for t in budgets_lib.TARGETS]]
  for setting, scopes in sorted(calibration.items()):
    for scope, entry in scopes.items():
      rows.append([setting, scope] + [f"{eps:g}" for eps in entry["budgets"]])
  return [markdown_table(rows)]


def _compute_lines(results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> list[str]:
  rows = [["part", "runs", "training (min)", "evaluation (min)"]]
  for part in reproduction.PARTS:
    chosen = [r for r in results if r["part"] == part]
    if chosen:
      rows.append([part, str(len(chosen)),
                   f"{sum(r['training_seconds'] for r in chosen) / 60:.1f}",
                   f"{sum(r['evaluation_seconds'] for r in chosen) / 60:.1f}"])
  return [f"On {meta['device']}; this invocation took {meta['wall_seconds'] / 60:.1f} min "
          f"wall (runs cached by earlier invocations count in the sums below, not in it).", "",
          markdown_table(rows)]


def _table_lines(judged: evidence.Evidence) -> list[str]:
  """Tables 1-3 at the paper's and the bite budgets, and the iterations table."""
  lines = []
  for name in (evidence.PAPER, evidence.BITE):
    budgets = judged.budgets[name]
    for table in ("Table 1", "Table 2"):
      lines += [f"## {table} ({name} budgets)", "",
                markdown_table(table_rows(judged.runs, reproduction.MAIN_METHODS,
                                          columns(budgets, judged.modalities, table)))]
    if judged.transformer:
      lines += [f"## Table 3: the transformer ({name} budgets)", "",
                markdown_table(table_rows(judged.transformer, reproduction.TRANSFORMER_METHODS,
                                          columns(budgets, judged.modalities, "Table 3")))]
  if judged.iterations:
    cols = columns(judged.budgets[evidence.BITE], judged.modalities, "Table 1")
    lines += ["## One or two iterations of CRMT's steps", "",
              markdown_table(table_rows(judged.iterations, ("crmt", "crmt_2iter"), cols))]
  return lines


def _pair_lines(pairs_rows, pair_correlations) -> list[str]:
  """The modality-pair table and the eta-ratio rank correlations."""
  lines = ["## Every modality pair", "", markdown_table(pairs_rows),
           "Rank correlation of the eta ratio with the attack gap (x: mean log10 "
           "eta(m1)/eta(m2); y: PGD area on m2 − on m1; 95% bootstrap interval over "
           "pairs):", ""]
  lines += [f"- {name}: {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}] "
            f"({c['num_points']} runs, {c['num_seeds']} pairs)"
            for name, c in pair_correlations.items()] or ["- (fewer than 3 pairs)"]
  return lines + [""]


def _dial_lines(dial_rows, meta: Mapping[str, Any], judged: evidence.Evidence) -> list[str]:
  """The imbalance dial's table."""
  rows = [["noise", "JT clean", "CRMT clean", "JT PGD area", "CRMT PGD area",
           "CRMT − JT [95% CI]", "verdict (> 0.01)"]]
  rows += [[f"{r['noise']:g}", f"{r['jt_clean']:.3f}", f"{r['crmt_clean']:.3f}",
            f"{r['jt_area']:.3f}", f"{r['crmt_area']:.3f}",
            f"{r['gain']['mean']:+.3f} [{r['gain']['low']:+.3f}, {r['gain']['high']:+.3f}]",
            r["verdict"]] for r in dial_rows]
  return ["## The imbalance dial", "",
          f"Noise of growing strength in {meta.get('noisy_modality', 'the other modality')}"
          f" (the modality JT prefers less; model-space x' = (x + s z) / sqrt(1 + s^2)); "
          f"areas are multi-modal PGD accuracy averaged over the radii "
          f"{list(judged.multi_grid)}.", "", markdown_table(rows)]


def _unfinished_lines(results: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
                      ) -> list[str]:
  """The runs that diverged and, with `--cached_only`, the runs not done."""
  lines = []
  diverged = [r for r in results if r.get("diverged")]
  if diverged:
    lines += ["## Runs that diverged", "",
              "Their training loss turned non-finite. Such a run has no model to evaluate: "
              "its method's tables and claims use its other seeds (comparisons pair the "
              "seeds both methods have).", ""]
    lines += [f"- {r['part']} {r['setting']} {r['method']} seed {r['seed']}: {r['diverged']}"
              for r in diverged] + [""]
  if meta.get("missing"):
    counts = collections.Counter(name.rsplit(" seed ", 1)[0] for name in meta["missing"])
    lines += ["## Runs not done", "",
              f"This report was written from the finished runs (`--cached_only`); "
              f"{len(meta['missing'])} planned runs had not finished (part, setting, method: "
              f"seeds missing):", ""]
    lines += [f"- {key}: {count}" for key, count in sorted(counts.items())] + [""]
  return lines


def report_markdown(meta: Mapping[str, Any], judged: evidence.Evidence, claim_rows, pairs_rows,
                    pair_correlations, dial_rows, paths, results) -> str:
  """The report, claims first."""
  lines = [f"# CRMT's claims on {meta['dataset']}", "",
           f"Seeds {meta['seeds']}; PGD protocol `{meta['protocol']}`; {meta['num_examples']} "
           f"test examples; chance {meta['chance']:.3f}; JT's preferred modality: "
           f"**{judged.preferred}** (its absence costs JT most). Verdicts come from 95% "
           f"intervals of seed-paired differences over seeds and test examples, against a "
           f"minimal effect of {evidence.ACCURACY_EFFECT} accuracy "
           f"({evidence.ETA_EFFECT} in mean |log10 eta ratio|, "
           f"{evidence.CORRELATION_EFFECT} in rank correlation): reproduced when the "
           f"interval lies above it, contradicted when below 0 (for equivalence claims: "
           f"inside / wholly outside ± the effect), inconclusive otherwise.", "",
           "## The paper's claims", "", claims_lib.markdown(claim_rows)]
  if meta.get("protocol_check"):
    lines += [meta["protocol_check"], ""]
  lines += ["## Budgets", "",
            "The paper's (multi-modal 0.5, uni-modal 1.0) and calibrated ones: where JT's "
            "seed-0 robust accuracy on the validation split is about 0.75 / 0.5 / 0.25 "
            "(PGD, same protocol). Claims are judged at the paper's and at the 0.5 "
            "(\"bite\") budgets.", ""] + _budget_lines(meta["calibration"])
  lines += _table_lines(judged)
  if pairs_rows:
    lines += _pair_lines(pairs_rows, pair_correlations)
  if dial_rows:
    lines += _dial_lines(dial_rows, meta, judged)
  lines += _unfinished_lines(results, meta)
  lines += ["## Compute", ""] + _compute_lines(results, meta)
  lines += ["## Figures", ""] + [f"- {key}: `{os.path.basename(path)}`"
                                 for key, path in paths.items()]
  return "\n".join(lines) + "\n"


def write_report(results: Sequence[Mapping[str, Any]], modalities: Sequence[str], outdir: str,
                 meta: Mapping[str, Any]) -> dict[str, Any]:
  """Judges the claims on `results` (`reproduction.run_jobs`) and writes
  report.{md,json} and the figures into `outdir`."""
  os.makedirs(outdir, exist_ok=True)
  groups = grouped(results)
  judged = build_evidence(groups, modalities, meta["calibration"])
  claim_rows = claims_lib.evaluate_claims(judged)
  pairs = {**groups.get("pairs", {})}
  budgets = {setting: budgets_lib.budgets_of(meta["calibration"][setting], setting.split("+"))
             for setting in pairs}
  pairs_rows = pair_table(pairs, budgets) if pairs else []
  pair_correlations = correlations(judged.pairs) if judged.pairs else {}
  dial_rows = dial(judged.imbalance, judged.multi_grid) if judged.imbalance else []
  paths = figures(judged.runs, judged, judged.pairs, dial_rows, outdir)
  summary = {part: {setting: {method: {"seeds": [r["seed"] for r in runs],
                                       "headline": {k: mean_std([r["headline"][k] for r in runs])
                                                    for k in runs[0]["headline"]}}
                              for method, runs in by_method.items()}
                    for setting, by_method in settings.items()}
             for part, settings in groups.items()}
  report = {"meta": dict(meta, preferred=judged.preferred), "claims": claim_rows,
            "summary": summary, "pair_points": list(judged.pairs),
            "pair_correlations": pair_correlations, "dial": dial_rows,
            "figures": {k: os.path.basename(v) for k, v in paths.items()}}
  files.write_json_atomic(os.path.join(outdir, "report.json"), report)
  files.write_text_atomic(os.path.join(outdir, "report.md"), report_markdown(
      meta, judged, claim_rows, pairs_rows, pair_correlations, dial_rows, paths, results))
  return report
