"""The pieces of `experiments.reproduce`: one run's training and evaluation
(cached in the run's directory), the mean and spread over seeds, Tables 1-2,
the figures (Fig. 1/3/4/5) and the report with the paper's claims
(`experiments.claims`). Flag-free, so that tests and notebooks import it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import claims as claims_lib
from experiments.configs import evals as evals_config
from mmsafe import files
from mmsafe.eval import evaluators
from mmsafe.eval import plots
from mmsafe.train import loop

TABLE1_METHODS = claims_lib.TABLE1_METHODS
# The paper's ablation (Sec. 4.3, Fig. 5).
ABLATION_METHODS = ("jt", "ojt", "crmt_step1", "crmt_step2", "crmt")
# Fig. 3 compares MMAT with CRMT-AT; mmsafe adds the JT-based pair.
ETA_METHODS = ("jt", "crmt_step1", "crmt", "mmat", "crmt_at")
MULTI = "multi"
RESULTS_FILE = "reproduce.json"

def evaluation_settings(protocol: str, multi_eps: Sequence[float], uni_eps: Sequence[float],
                        max_examples: int) -> dict[str, Any]:
  """What one run's evaluation depends on (a cached evaluation is reused only
  when these are equal)."""
  return {"protocol": protocol, "multi_eps": [float(e) for e in multi_eps],
          "uni_eps": [float(e) for e in uni_eps], "max_examples": int(max_examples)}


def evaluator_configs(settings: Mapping[str, Any], *, with_eta: bool
                      ) -> dict[str, dict[str, Any]]:
  """The evaluators of one run: the robustness suite on the settings' grids (no
  decoupling attack) and, `with_eta`, certification with empirical constants
  (its eta ratio; no attack check)."""
  evals = evals_config.get_config("robustness").to_dict()
  evals["robustness"].update(
      protocol=settings["protocol"], multi_eps=tuple(settings["multi_eps"]),
      uni_eps=tuple(settings["uni_eps"]), decoupling_fractions=(),
      max_examples=settings["max_examples"])
  if with_eta:
    evals.update(evals_config.get_config("certify").to_dict())
    evals["certify"].update(kinds=("empirical",), attack_steps=0,
                            max_examples=settings["max_examples"])
  return evals


def evaluate_run(run_dir: str, settings: Mapping[str, Any], *, with_eta: bool
                 ) -> dict[str, Any]:
  """Test-split numbers of the model selected on validation in `run_dir`: the
  robustness headline and curves, and the eta ratio (`with_eta`)."""
  _, model, variables, splits = loop.restore_run(run_dir)
  built = evaluators.build_evaluators(evaluator_configs(settings, with_eta=with_eta),
                                      model=model, splits=splits)
  start = time.time()
  robustness = built["robustness"].run(variables)
  result = {"settings": dict(settings), "num_classes": int(splits["test"].num_classes),
            "headline": robustness["headline"], "curves": robustness["curves"],
            "num_examples": robustness["num_examples"]}
  if with_eta:
    entry = built["certify"].run(variables)["kinds"]["empirical"]
    result["eta_ratio"] = entry["eta_ratio"]
    result["mean_radius_empirical"] = entry["summary"]["mean_radius"]
  result["evaluation_seconds"] = time.time() - start
  return result


def train_and_evaluate_run(base: ml_collections.ConfigDict, method: str, seed: int,
                           run_dir: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  """Trains (or resumes, or skips when finished) one method and seed, then
  evaluates it unless `run_dir` already holds an evaluation with `settings`."""
  cached = os.path.join(run_dir, RESULTS_FILE)
  if os.path.exists(cached):
    with open(cached) as f:
      result = json.load(f)
    if result.get("settings") == dict(settings):
      return result
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.method, config.seed = method, seed
  start = time.time()
  trained = loop.train_and_evaluate(config, run_dir)
  result = evaluate_run(run_dir, settings, with_eta=method in ETA_METHODS)
  result.update(method=method, seed=seed, training_seconds=time.time() - start
                - result["evaluation_seconds"],
                validation_accuracy=trained["validation_accuracy"])
  files.write_json_atomic(cached, result)
  return result


def pgd_points(curves: Mapping[str, Any]) -> dict[str, float]:
  """`{"pgd/<scope>@<eps>": accuracy}` for every point of a run's PGD curves."""
  return {f"pgd/{scope}@{eps:g}": accuracy for scope, curve in curves["pgd"].items()
          for eps, accuracy in zip(curve["eps"], curve["accuracy"])}


def protocol_check(run_dir: str, settings: Mapping[str, Any]) -> dict[str, float]:
  """`pgd_points` of `run_dir` under the `default` protocol at the paper's budgets
  and four times them (multi-modal 0.5 and 2, uni-modal 1 and 4), to set
  against those under `settings["protocol"]` (evidence that a cheaper preset
  agrees where attacks do not bite and where they do)."""
  default = dict(settings, protocol="default", multi_eps=[0.5, 2.0], uni_eps=[1.0, 4.0])
  _, model, variables, splits = loop.restore_run(run_dir)
  built = evaluators.build_evaluators(evaluator_configs(default, with_eta=False),
                                      model=model, splits=splits)
  return pgd_points(built["robustness"].run(variables)["curves"])


def mean_std(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (0 for one value) of `values`."""
  values = np.asarray(values, float)
  std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(values.mean()), "std": std, "values": values.tolist()}


def aggregate(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
  """Per method: each headline entry and each curve point as mean +- std over seeds.

  Args:
    results: method -> the evaluation of each seed (`train_and_evaluate_run`).
  Returns:
    method -> {"seeds", "headline": {key: mean_std}, "curves": {kind: {scope:
    {"eps", "accuracy": [mean], "std": [std]}}}, "eta_imbalance": mean_std of
    the mean |log10 eta ratio| (when computed)}.
  """
  summary = {}
  for method, runs in results.items():
    keys = runs[0]["headline"].keys()
    entry = {"seeds": [run["seed"] for run in runs],
             "headline": {k: mean_std([run["headline"][k] for run in runs]) for k in keys},
             "curves": {}}
    for kind, scopes in runs[0]["curves"].items():
      entry["curves"][kind] = {}
      for scope, curve in scopes.items():
        stacked = np.asarray([run["curves"][kind][scope]["accuracy"] for run in runs], float)
        entry["curves"][kind][scope] = {
            "eps": curve["eps"], "accuracy": stacked.mean(0).tolist(),
            "std": (stacked.std(0, ddof=1) if len(runs) > 1 else 0 * stacked[0]).tolist()}
    if all("eta_ratio" in run for run in runs):
      entry["eta_imbalance"] = mean_std([claims_lib.eta_imbalance(run["eta_ratio"]["matrix"])
                                         for run in runs])
    summary[method] = entry
  return summary


def _cell(stat: Mapping[str, float]) -> str:
  return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def tables(summary: Mapping[str, Any], modalities: Sequence[str]) -> dict[str, list[list[str]]]:
  """Table 1 (clean, multi-modal FGM / PGD at 0.5, missing) and Table 2 (uni-modal
  FGM / PGD at 1.0 per modality, missing) as rows of cells; the first row names
  the columns (headline keys)."""
  table1 = ["clean", "fgm/multi@0.5", "pgd/multi@0.5"] + [f"missing/{m}" for m in modalities]
  table2 = (["clean"] + [f"fgm/{m}@1.0" for m in modalities]
            + [f"pgd/{m}@1.0" for m in modalities] + [f"missing/{m}" for m in modalities])
  out = {}
  for name, columns in (("Table 1", table1), ("Table 2", table2)):
    rows = [["method"] + columns]
    for method in TABLE1_METHODS + ABLATION_METHODS:
      if method in summary and [method] not in [row[:1] for row in rows]:
        rows.append([method] + [_cell(summary[method]["headline"][c]) for c in columns])
    out[name] = rows
  return out


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
  return "\n".join(lines) + "\n"


def _curve(summary, method: str, kind: str, scope: str) -> tuple[list, list]:
  curve = summary[method]["curves"][kind][scope]
  return curve["eps"], curve["accuracy"]


def figures(summary: Mapping[str, Any], results: Mapping[str, Sequence[Mapping[str, Any]]],
            modalities: Sequence[str], outdir: str) -> dict[str, str]:
  """The PNG figures (Fig. 1 per modality, Fig. 3 per method, Fig. 4, Fig. 5)."""
  paths = {}
  for m in modalities:
    curves = {method: _curve(summary, method, "pgd", m) for method in summary}
    paths[f"fig1_{m}"] = plots.plot_robust_accuracy(
        curves, os.path.join(outdir, f"fig1_pgd_{m}.png"),
        title=f"uni-modal l2-PGD on {m} (mean of {len(results['jt'])} seeds)"
        if "jt" in results else f"uni-modal l2-PGD on {m}")
  pair = [method for method in ("jt", "crmt") if method in summary]
  if pair:
    curves = {f"{method} (attack on {m})": _curve(summary, method, "pgd", m)
              for method in pair for m in modalities}
    paths["fig4"] = plots.plot_robust_accuracy(
        curves, os.path.join(outdir, "fig4_uni_modal_jt_crmt.png"),
        title="attacks on each modality: JT vs CRMT")
  ablation = [method for method in ABLATION_METHODS if method in summary]
  if ablation:
    paths["fig5"] = plots.plot_robust_accuracy(
        {method: _curve(summary, method, "pgd", MULTI) for method in ablation},
        os.path.join(outdir, "fig5_ablation.png"), title="ablation: multi-modal l2-PGD")
  for method, runs in results.items():
    if "eta_ratio" in runs[0]:
      eta = runs[0]["eta_ratio"]
      paths[f"fig3_{method}"] = plots.plot_eta_ratio_heatmap(
          np.asarray([[np.nan if v is None else v for v in row] for row in eta["matrix"]]),
          os.path.join(outdir, f"fig3_eta_{method}.png"), numerator=eta["numerator"],
          denominator=eta["denominator"], title=f"{method} (seed {runs[0]['seed']})")
  return paths


def report_markdown(dataset: str, summary, table_rows, claim_rows, paths, meta) -> str:
  """The report: settings, Tables 1-2, the claims and the figures."""
  lines = [f"# CRMT experiments on {dataset}", "",
           f"Seeds {meta['seeds']}; PGD protocol `{meta['protocol']}`; multi-modal radii "
           f"{meta['multi_eps']}, uni-modal radii {meta['uni_eps']}; {meta['num_examples']} "
           f"test examples; chance {meta['chance']:.3f}. Cells: mean ± sample std over "
           f"seeds. On {meta['device']}: training {meta['training_seconds'] / 60:.1f} min and "
           f"evaluation {meta['evaluation_seconds'] / 60:.1f} min summed over the runs "
           f"(whenever each ran), this invocation {meta['wall_seconds'] / 60:.1f} min.", ""]
  if meta.get("protocol_check"):
    lines += [meta["protocol_check"], ""]
    rows = [["method", "point", f"`{meta['protocol']}`", "`default`"]]
    rows += [[method, point, f"{cheap:.3f}", f"{default:.3f}"]
             for method, points in meta.get("protocol_check_points", {}).items()
             for point, (cheap, default) in points.items()]
    lines += [markdown_table(rows)] if len(rows) > 1 else []
  for name, rows in table_rows.items():
    lines += [f"## {name}", "", markdown_table(rows)]
  lines += ["## The paper's claims", "", claims_lib.markdown(claim_rows), "## Figures", ""]
  lines += [f"- {key}: `{os.path.basename(path)}`" for key, path in paths.items()]
  return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Sequence[Mapping[str, Any]]], modalities: Sequence[str],
                 outdir: str, meta: Mapping[str, Any]) -> dict[str, Any]:
  """Aggregates the runs and writes report.{md,json} and the figures into `outdir`."""
  os.makedirs(outdir, exist_ok=True)
  summary = aggregate(results)
  table_rows = tables(summary, modalities)
  claim_rows = claims_lib.evaluate_claims(results, modalities, chance=meta["chance"])
  paths = figures(summary, results, modalities, outdir)
  report = {"meta": dict(meta), "summary": summary, "claims": claim_rows,
            "figures": {k: os.path.basename(v) for k, v in paths.items()}}
  files.write_json_atomic(os.path.join(outdir, "report.json"), report)
  files.write_text_atomic(os.path.join(outdir, "report.md"),
                          report_markdown(meta["dataset"], summary, table_rows, claim_rows,
                                          paths, meta))
  return report


def device_description() -> str:
  """The first device's kind, and the core count on a CPU."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({os.cpu_count()} cores, jax {jax.__version__})"
  return f"{jax.device_count()} x {device.device_kind} (jax {jax.__version__})"


def parse_radii(values: Sequence[str], name: str, must_have: float) -> list[float]:
  """Sorted distinct radii from strings; ValueError naming `name` unless all are
  positive numbers and `must_have` (the paper's budget) is among them."""
  try:
    out = sorted({float(v) for v in values})
  except ValueError as error:
    raise ValueError(f"{name}: expected comma-separated numbers, got {values}") from error
  if must_have not in out or out[0] <= 0:
    raise ValueError(f"{name}: expected positive radii including {must_have}, got {out}")
  return out
