"""Reports of evaluation metrics (the side-effect end of `mmsafe.eval`): each
writer consumes the metrics of one evaluator type (`mmsafe.eval.registry`),
and `write_evaluation` picks the writer by type. Every file is written
atomically (`mmsafe.files`).

`write_report(results, directory)` (type "robustness": the results dict of
the `robustness` evaluator, `mmsafe.eval.suite`) writes:

    robustness.json          the metrics of the `robustness` evaluator, verbatim
    robustness.md            headline table (CRMT Tables 1/2 layout), curves,
                             missing-modality and decoupling tables
    pgd_accuracy.png         robust accuracy vs eps, multi-modal and per modality
    fgm_accuracy.png         (CRMT Fig. 1/4), one figure per attack kind run
    missing_modality.png     accuracy with each modality missing
    decoupling_asr.png       decoupling ASR vs fraction of input changed (MUROAN)

`write_certification_report` (type "certify"), `write_sweep` (type "sweep")
and `write_metrics` (any other type: `metrics.json`) write the others;
`figures` draws an evaluation's PNGs and `write_events` puts its numbers and
figures into TensorBoard event files.

`update_index(directory, entry)` keeps `<directory>/index.md`, the one page of
a run directory (`mmsafe.eval.run_index`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import io
import os
from typing import Any

import numpy as np

from mmsafe import files
from mmsafe.eval import plots
from mmsafe.eval.registry import scalar_metrics
# The run index, where the commands' callers have always found it.
from mmsafe.eval.run_index import artefact_files, update_index  # pylint: disable=unused-import
from mmsafe.train import metrics as metrics_lib


def _png(plot_fn: Callable[..., Any], *args, **kwargs) -> bytes:
  """The PNG that `plot_fn(*args, file, **kwargs)` draws."""
  buffer = io.BytesIO()
  plot_fn(*args, buffer, **kwargs)
  return buffer.getvalue()


def _write_png(path: str, png: bytes) -> str:
  """Writes `png` to `path` atomically; returns `path`."""
  return files.write_atomic(path, lambda f: f.write(png))


def _pct(value: float | None, digits: int = 1) -> str:
  return "-" if value is None else f"{100.0 * value:.{digits}f}"


def markdown(results: Mapping[str, Any], title: str = "Robustness report") -> str:
  """The markdown report of the `robustness` evaluator's metrics (`mmsafe.eval.suite`)."""
  protocol = results["protocol"]
  lines = [f"# {title}", ""]
  meta = results.get("meta") or {}
  for key, value in meta.items():
    lines.append(f"- {key}: {value}")
  lines += [
      f"- examples: {results['num_examples']}",
      f"- PGD protocol `{protocol['name']}`: {protocol.get('description', '')} "
      f"(steps={protocol['steps']}, restarts={protocol['restarts']}, "
      f"random_start={protocol['random_start']}, keep_best={protocol['keep_best']}, "
      f"loss={protocol['loss']})",
      f"- budgets (l2, normalised space): multi-modal eps = {protocol['multi_eps']}, "
      f"uni-modal eps = {protocol['uni_eps']}",
      f"- box constraints: {', '.join(results['config'].get('box_constraints') or []) or 'none'}",
      "", "Accuracies in %. Robust = correct both clean and attacked; PGD curves are the",
      "per-example worst case over the eps grid up to each eps (raw per-eps values in the JSON).",
      "", "## Headline (CRMT Tables 1-2 layout)", ""]
  headline = results["headline"]
  keys = list(headline)
  lines.append("| " + " | ".join(keys) + " |")
  lines.append("|" + "---|" * len(keys))
  lines.append("| " + " | ".join(_pct(headline[k]) for k in keys) + " |")
  for kind, scopes in results.get("curves", {}).items():
    lines += ["", f"## {kind.upper()}: robust accuracy vs eps", "",
              "| attacked | eps: accuracy |", "|---|---|"]
    for scope, curve in scopes.items():
      pairs = ", ".join(f"{e:g}: {_pct(a)}" for e, a in zip(curve["eps"], curve["accuracy"]))
      lines.append(f"| {scope} ({'+'.join(curve['modalities'])}) | {pairs} |")
    certified = {scope: ", ".join(f"{e:g}: {n}" for e, n in zip(curve["eps"], counts))
                 for scope, curve in scopes.items()
                 if (counts := curve.get("num_certified")) is not None}
    if certified:
      lines += ["", "Robust by their sound certified radius, so not attacked (examples per "
                "eps): " + "; ".join(f"{scope}: {pairs}" for scope, pairs in certified.items())
                + "."]
  if results.get("missing"):
    fills = sorted({f for per in results["missing"].values() for f in per})
    lines += ["", "## Missing modality (accuracy)", "",
              "| missing | " + " | ".join(fills) + " |", "|---|" + "---|" * len(fills)]
    for m, per in results["missing"].items():
      lines.append(f"| {m} | " + " | ".join(_pct(per.get(f)) for f in fills) + " |")
  if results.get("decoupling"):
    settings = results["config"].get("decoupling") or {}
    lines += ["", "## Decoupling attack (l0 budget; MUROAN)", "",
              f"Settings: {settings or 'defaults'}. ASR = fraction of clean-correct examples "
              "misclassified (worst case over budgets up to each fraction).", "",
              "| scope | entries | fraction % | changed (max) | mean changed % | ASR % | acc % |",
              "|---|---|---|---|---|---|---|"]
    for scope, curve in results["decoupling"].items():
      for i, fraction in enumerate(curve["fraction"]):
        lines.append(
            f"| {scope} | {curve['num_entries']} | {100 * fraction:.2f} | {curve['count'][i]} | "
            f"{100 * curve['mean_fraction_changed'][i]:.2f} | {_pct(curve['asr'][i])} | "
            f"{_pct(curve['accuracy'][i])} |")
  return "\n".join(lines) + "\n"


def robustness_figures(results: Mapping[str, Any]) -> dict[str, bytes]:
  """The PNG figures of a robustness results dict, by file stem: robust accuracy
  vs eps per attack kind (`pgd_accuracy`, `fgm_accuracy`), `missing_modality`,
  `decoupling_asr`."""
  figures = {}
  clean = results.get("clean_accuracy")
  for kind, scopes in results.get("curves", {}).items():
    figures[f"{kind}_accuracy"] = _png(
        plots.plot_robust_accuracy,
        {scope: (c["eps"], c["accuracy"]) for scope, c in scopes.items()},
        clean_accuracy=clean, title=f"l2-{kind.upper()} ({results['protocol']['name']})"
        if kind == "pgd" else "l2-FGM")
  if results.get("missing"):
    figures["missing_modality"] = _png(plots.plot_missing_modality, results["missing"],
                                       clean_accuracy=clean, title="missing modality")
  if results.get("decoupling"):
    figures["decoupling_asr"] = _png(
        plots.plot_decoupling_asr,
        {scope: (c["fraction"], c["asr"]) for scope, c in results["decoupling"].items()},
        title="decoupling attack")
  return figures


def write_report(results: Mapping[str, Any], directory: str, *, title: str = "Robustness report"
                 ) -> dict[str, str]:
  """Writes JSON, markdown and PNG plots of `results` into `directory` (created).

  Returns:
    name -> path of every file written.
  """
  paths = {"json": os.path.join(directory, "robustness.json"),
           "markdown": os.path.join(directory, "robustness.md")}
  files.write_json_atomic(paths["json"], results)
  files.write_text_atomic(paths["markdown"], markdown(results, title))
  for stem, png in robustness_figures(results).items():
    paths[stem.split("_")[0] + "_plot"] = _write_png(os.path.join(directory, f"{stem}.png"), png)
  return paths


def sweep_markdown(sweep: Mapping[str, Any], title: str = "PGD strength sweep") -> str:
  """Markdown tables of a `sweep` evaluator's metrics (rows: steps; columns: restarts)."""
  lines = [f"# {title}", ""]
  for key, value in (sweep.get("meta") or {}).items():
    lines.append(f"- {key}: {value}")
  lines += [f"- examples: {sweep['num_examples']}, clean accuracy "
            f"{_pct(sweep['clean_accuracy'], 2)}%, loss {sweep['loss']}, "
            f"step size 2.5 eps / steps, "
            f"restart 0 from {'a random point' if sweep.get('random_start') else 'the clean input'}"
            ", later restarts random, worst iterate kept", "",
            "Robust accuracy (%) of l2-PGD; rows: steps, columns: restarts.", ""]
  for budget, rows in sweep["accuracy"].items():
    lines += [f"## {budget}", "",
              "| steps | " + " | ".join(f"{r} restart(s)" for r in sweep["restarts"]) + " |",
              "|---|" + "---|" * len(sweep["restarts"])]
    for steps, row in zip(sweep["steps"], rows):
      lines.append(f"| {steps} | " + " | ".join(_pct(v, 2) for v in row) + " |")
    lines.append("")
  return "\n".join(lines)


def write_sweep(sweep: Mapping[str, Any], directory: str) -> dict[str, str]:
  """Writes `pgd_strength.json` and `pgd_strength.md` into `directory`."""
  paths = {"json": os.path.join(directory, "pgd_strength.json"),
           "markdown": os.path.join(directory, "pgd_strength.md")}
  files.write_json_atomic(paths["json"], sweep)
  files.write_text_atomic(paths["markdown"], sweep_markdown(sweep))
  return paths


def certification_figures(results: Mapping[str, Any]) -> dict[str, bytes]:
  """The PNG figures of `run_certification`'s results, by file stem: certified
  accuracy per kind (`certified_accuracy`), uni-modal curves (`unimodal_<kind>`),
  eta ratio heat maps (`eta_ratio_<kind>`, CRMT Fig. 3)."""
  curves = {kind: (entry["summary"]["thresholds"], entry["summary"]["certified_accuracy"])
            for kind, entry in results["kinds"].items()}
  xlabel = f"l2 radius ({results.get('units', 'normalised input space')})"
  figures = {"certified_accuracy": _png(
      plots.plot_certified_accuracy, curves,
      title=f"certified accuracy ({results['split']}, {results['head']} head)", xlabel=xlabel)}
  for kind, entry in results["kinds"].items():
    summary = entry["summary"]
    uni = {f"{m} only": (summary["thresholds"], acc)
           for m, acc in summary["unimodal_certified_accuracy"].items()}
    uni["all modalities"] = (summary["thresholds"], summary["certified_accuracy"])
    figures[f"unimodal_{kind}"] = _png(plots.plot_certified_accuracy, uni,
                                       title=f"uni-modal certified accuracy ({kind})",
                                       xlabel=xlabel)
    if "eta_ratio" in entry:
      eta = entry["eta_ratio"]
      matrix = np.array([[np.nan if v is None else v for v in row] for row in eta["matrix"]])
      figures[f"eta_ratio_{kind}"] = _png(
          plots.plot_eta_ratio_heatmap, matrix, numerator=eta["numerator"],
          denominator=eta["denominator"], title=f"vulnerability ratio ({kind})")
  return figures


def write_certification_report(results: Mapping[str, Any], outdir: str) -> list[str]:
  """Writes `run_certification`'s results.json and its PNG figures
  (`certification_figures`); returns the paths."""
  paths = [files.write_json_atomic(os.path.join(outdir, "results.json"), results)]
  for stem, png in certification_figures(results).items():
    paths.append(_write_png(os.path.join(outdir, f"{stem}.png"), png))
  return paths


def write_metrics(metrics: Mapping[str, Any], directory: str) -> list[str]:
  """Writes any evaluator's metrics as `metrics.json` into `directory`."""
  return [files.write_json_atomic(os.path.join(directory, "metrics.json"), metrics)]


def figures(evaluator_type: str, metrics: Mapping[str, Any], prefix: str = "") -> dict[str, bytes]:
  """The PNG figures of an evaluator's metrics by type ("robustness":
  `robustness_figures`, "certify": `certification_figures`, else none), keyed
  `<prefix>/<file stem>` (or the stem without a prefix)."""
  make = {"robustness": robustness_figures, "certify": certification_figures}.get(evaluator_type)
  drawn = make(metrics) if make else {}
  return {f"{prefix}/{stem}" if prefix else stem: png for stem, png in drawn.items()}


def write_events(logdir: str, name: str, step: int, metrics: Mapping[str, Any],
                 paths: Sequence[str] = ()) -> None:
  """The evaluation `name` of the model of training step `step` as TensorBoard
  events in `logdir`, replacing an earlier one of that name: its scalar metrics
  (`registry.scalar_metrics`, tagged `<name>/...`) and the PNG figures among
  `paths` (tagged `<name>/<file stem>`)."""
  writer = metrics_lib.EventWriter(logdir, f"evaluation-{name}", replace=True)
  writer.scalars(step, {f"{name}/{k}": v for k, v in scalar_metrics(metrics).items()})
  images = {}
  for path in paths:
    if path.endswith(".png"):
      with open(path, "rb") as f:
        images[f"{name}/{os.path.splitext(os.path.basename(path))[0]}"] = f.read()
  writer.images(step, images)
  writer.close()


def write_evaluation(evaluator_type: str, metrics: Mapping[str, Any], directory: str, *,
                     title: str | None = None) -> list[str]:
  """Writes the report of an evaluator's metrics by its type ("robustness":
  `write_report`, "certify": `write_certification_report`, "sweep":
  `write_sweep`, else `write_metrics`); returns the paths written."""
  if evaluator_type == "robustness":
    return list(write_report(metrics, directory, title=title or "Robustness report").values())
  if evaluator_type == "certify":
    return write_certification_report(metrics, directory)
  if evaluator_type == "sweep":
    return list(write_sweep(metrics, directory).values())
  return write_metrics(metrics, directory)
