r"""Evaluates a trained run on a restored checkpoint with the evaluators of an
evals config (`experiments/configs/evals.py`, `mmsafe.eval.registry`) and
writes each one's report.

  python -m experiments.evaluate --workdir=/tmp/mmsafe/ojt
  python -m experiments.evaluate --workdir=/tmp/mmsafe/ojt \
      --evals=experiments/configs/evals.py:paper \
      --evals.robustness.protocol=paper_reference --evals.robustness.split=validation
  python -m experiments.evaluate --workdir=/tmp/mmsafe/ojt \
      --evals=experiments/configs/evals.py:sweep
  python -m experiments.evaluate --workdir=/tmp/mmsafe/msefm \
      --evals.robustness.defence=msefm --out=/tmp/mmsafe/msefm/defended

Evaluator `<name>` writes into `<out>/<name>/` (`--out`, default: the
workdir; `mmsafe.eval.report.write_evaluation`): type "robustness" (the
default config's `robustness`) robustness.json, robustness.md and PNG plots;
"certify" results.json and figures; "sweep" pgd_strength.{json,md}, the
evidence that a protocol's attack has converged; any other type metrics.json.
Its numbers and figures also go to TensorBoard event files in `<out>` (at the
evaluated model's training step; an evaluation run again replaces them), and
the command's entry to `<out>/index.md`.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
import os
from typing import Any

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
from tqdm.auto import tqdm

from experiments import cli
from mmsafe.eval import registry
from mmsafe.eval import report
from mmsafe.files import check_writable
from mmsafe.train import restore

# The evals config beside this file (found wherever mmsafe is installed).
DEFAULT_EVALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                             "evals.py") + ":robustness"
if __name__ == "__main__":
  cli.name_config_on_command_line("evals", DEFAULT_EVALS)
_EVALS = config_flags.DEFINE_config_file(
    "evals", DEFAULT_EVALS,
    "Evaluators: name -> dict(type=..., ...) (see mmsafe.eval.registry).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
_OUT = flags.DEFINE_string("out", None, "Output directory: evaluator <name> writes into "
                           "<out>/<name> (default: the workdir).")


def summary(evaluator_type: str, metrics: Mapping[str, Any]) -> Any:
  """The few numbers printed for an evaluator's metrics."""
  if evaluator_type == "robustness":
    return metrics["headline"]
  if evaluator_type == "certify":
    return {kind: {"clean_accuracy": entry["summary"]["clean_accuracy"],
                   "mean_radius": entry["summary"]["mean_radius"],
                   "broken": entry.get("attack", {}).get("broken"),
                   "attacked": entry.get("attack", {}).get("attacked")}
            for kind, entry in metrics["kinds"].items()}
  if evaluator_type == "sweep":
    return metrics["accuracy"]
  return registry.scalar_metrics(metrics)


def evaluate_run(workdir: str, evals: Mapping[str, Mapping[str, Any]], *, which: str = "best",
                 out: str | None = None) -> dict[str, dict[str, Any]]:
  """Runs the evaluators `evals` on the run in `workdir` and writes their reports
  (`<out>/<name>/`) and TensorBoard events (`<out>`, at the evaluated model's
  training step; `report.write_events`).

  Returns:
    name -> {"summary": printed numbers, "files": paths written}.

  Raises:
    OSError: a report directory cannot be written (checked before anything is
      computed).
  """
  for name in evals:
    check_writable(os.path.join(out or workdir, name),
                   "--out" if out else "--workdir (--out writes the reports elsewhere)")
  config, model, variables, splits, step = restore.restore_run_and_step(workdir, which=which)
  evaluators = registry.build_evaluators(evals, model=model, splits=splits,
                                               run_config=config)
  out = out or workdir
  done = {}
  for name, evaluator in evaluators.items():
    where = f"{config['method']} on {config['dataset']} ({evaluator.split})"
    with tqdm(desc=f"{name}: {where}", unit="batch", dynamic_ncols=True) as bar:
      metrics = evaluator.run(variables, progress=bar.update)
    metrics["meta"] = {"workdir": os.path.abspath(workdir), "method": config["method"],
                       "dataset": config["dataset"], "split": evaluator.split,
                       "defence": evaluator.defence_name,
                       "checkpoint": which, "step": step, "device": str(jax.devices()[0])}
    files = report.write_evaluation(evaluator.type, metrics, os.path.join(out, name),
                                    title=f"Robustness of {where}")
    report.write_events(out, name, step, metrics, files)
    done[name] = {"summary": summary(evaluator.type, metrics), "files": files}
  return done


def main(argv):
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir: expected a training run's directory, got none")
  evals = _EVALS.value.to_dict()
  done = evaluate_run(_WORKDIR.value, evals, which=_WHICH.value, out=_OUT.value)
  names = ", ".join(evals)
  cli.record_in_index(_OUT.value or _WORKDIR.value,
                      f"evaluation ({names}) of the {_WHICH.value} checkpoint",
                      [path for entry in done.values() for path in entry["files"]],
                      config=evals, key=f"evaluate:{names}:{_WHICH.value}")
  print(json.dumps(done, indent=2))


if __name__ == "__main__":
  cli.run(main)
