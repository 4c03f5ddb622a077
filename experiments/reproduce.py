r"""The CRMT paper's experiments on one dataset, each method trained with several
seeds, in one command:

  python -m experiments.reproduce --config=experiments/configs/embedded.py:av_digits \
      --workdir=/tmp/mmsafe/reproduce/av_digits

Every method of the paper's Table 1 and of its ablation (Fig. 5) trains in
`<workdir>/runs/<method>/seed<k>` (resumable: a rerun skips finished runs and
evaluations). Each model selected on validation is then evaluated on the test
split: clean, FGM and l2-PGD accuracy over a grid of multi-modal and uni-modal
radii (the grids reach budgets at which the attacks bite), missing-modality
accuracy, and, for the methods of Fig. 3, the vulnerability-indicator ratio
eta^(m1) / eta^(m2) from certification with empirical Lipschitz constants.

`<workdir>/report/` receives report.md and report.json (mean +- sample
standard deviation over the seeds) and the figures: Table 1 (clean,
multi-modal FGM / PGD at eps 0.5, missing modality), Table 2 (uni-modal FGM /
PGD at eps 1.0, missing), Fig. 1 (uni-modal PGD accuracy against the radius,
one figure per attacked modality, every method), Fig. 3 (eta-ratio heat maps),
Fig. 4 (JT and CRMT under attacks on each modality), Fig. 5 (the ablation
under multi-modal PGD), and the table of the paper's claims
(`experiments/claims.py`), each marked reproduced / not reproduced / mixed.

The curves use `--protocol` (default: the `default` preset). With a cheaper
preset, the seed-0 JT and CRMT runs are also attacked with `default` at the
headline budgets and the report states the largest difference, so that the
cheaper numbers carry their own evidence.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
from tqdm.auto import tqdm

from experiments import claims as claims_lib
from experiments import cli
from experiments.configs import evals as evals_config
from mmsafe import files
from mmsafe import methods as methods_lib
from mmsafe.eval import evaluators
from mmsafe.eval import plots
from mmsafe.train import loop

# The paper's Table 1 rows (Sec. 4.1) and its ablation (Sec. 4.3, Fig. 5).
TABLE1_METHODS = ("jt", "gb", "ogm", "pmr", "msefm", "mmat", "mixup", "crmt", "crmt_at",
                  "crmt_mix")
ABLATION_METHODS = ("jt", "ojt", "crmt_step1", "crmt_step2", "crmt")
# Fig. 3 compares MMAT with CRMT-AT; mmsafe adds the JT-based pair.
ETA_METHODS = ("jt", "crmt_step1", "crmt", "mmat", "crmt_at")
MULTI = "multi"
RESULTS_FILE = "reproduce.json"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the runs and the report.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_METHODS = flags.DEFINE_list(
    "methods", list(dict.fromkeys(TABLE1_METHODS + ABLATION_METHODS)),
    "Methods to train (default: Table 1 and the ablation).")
_PROTOCOL = flags.DEFINE_string("protocol", "default", "PGD protocol preset of the curves.")
_MULTI_EPS = flags.DEFINE_list("multi_eps", ["0.25", "0.5", "1", "2", "4", "8"],
                               "Radii of the multi-modal attacks (must include 0.5).")
_UNI_EPS = flags.DEFINE_list("uni_eps", ["0.5", "1", "2", "4", "8", "16"],
                             "Radii of the uni-modal attacks (must include 1.0).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0,
                                     "Test examples evaluated (0: the whole split).")
flags.mark_flags_as_required(["config", "workdir"])


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


def protocol_check(run_dir: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  """The headline numbers of `run_dir` under the `default` protocol, against
  those under `settings["protocol"]` (evidence that a cheaper preset agrees)."""
  default = dict(settings, protocol="default", multi_eps=[0.5], uni_eps=[1.0])
  _, model, variables, splits = loop.restore_run(run_dir)
  built = evaluators.build_evaluators(evaluator_configs(default, with_eta=False),
                                      model=model, splits=splits)
  return built["robustness"].run(variables)["headline"]


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
           f"seeds. Wall time {meta['wall_seconds'] / 60:.1f} min on {meta['device']}.", ""]
  if meta.get("protocol_check"):
    lines += [meta["protocol_check"], ""]
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


def _floats(values: Sequence[str], name: str, must_have: float) -> list[float]:
  try:
    out = sorted({float(v) for v in values})
  except ValueError as error:
    raise ValueError(f"{name}: expected comma-separated numbers, got {values}") from error
  if must_have not in out or out[0] <= 0:
    raise ValueError(f"{name}: expected positive radii including {must_have}, got {out}")
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  for name in _METHODS.value:
    methods_lib.get(name)  # Unknown names fail before any training starts.
  seeds = [int(s) for s in _SEEDS.value]
  settings = evaluation_settings(_PROTOCOL.value, _floats(_MULTI_EPS.value, "multi_eps", 0.5),
                                 _floats(_UNI_EPS.value, "uni_eps", 1.0), _MAX_EXAMPLES.value)
  start = time.time()
  results: dict[str, list[dict[str, Any]]] = {}
  jobs = [(method, seed) for method in _METHODS.value for seed in seeds]
  for method, seed in tqdm(jobs, desc="reproduce (train + evaluate)", dynamic_ncols=True):
    run_dir = os.path.join(_WORKDIR.value, "runs", method, f"seed{seed}")
    results.setdefault(method, []).append(
        train_and_evaluate_run(_CONFIG.value, method, seed, run_dir, settings))
  first = next(iter(results.values()))[0]
  modalities = [scope for scope in first["curves"]["pgd"] if scope != MULTI]
  meta = {"dataset": _CONFIG.value.dataset, "seeds": seeds, **settings,
          "num_examples": first["num_examples"], "chance": 1.0 / first["num_classes"],
          "wall_seconds": time.time() - start, "device": device_description()}
  if settings["protocol"] != "default":
    meta["protocol_check"] = claims_lib.protocol_agreement(
        {method: (results[method][0]["headline"],
                  protocol_check(os.path.join(_WORKDIR.value, "runs", method,
                                              f"seed{seeds[0]}"), settings))
         for method in ("jt", "crmt") if method in results}, settings["protocol"])
  report = write_report(results, modalities, os.path.join(_WORKDIR.value, "report"), meta)
  print(claims_lib.markdown(report["claims"]))
  print(f"report: {os.path.join(_WORKDIR.value, 'report', 'report.md')}")


if __name__ == "__main__":
  cli.run(main)
