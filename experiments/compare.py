r"""Trains several methods with the same config, seed and budget; compares them.

  python -m experiments.compare --config=experiments/configs/embedded.py \
      --methods=jt,ojt,crmt --workdir=/tmp/mmsafe/compare

Each method trains in `<workdir>/<method>` (resumable). Then every model
selected on validation is evaluated on the test split: clean accuracy,
multi-modal FGM and l2-PGD at the paper's eps = 0.5, uni-modal FGM / l2-PGD at
eps = 1.0 and missing-modality accuracy per modality (the columns of the
CRMT paper's Tables 1-2), and the mean certified radius with `empirical`
(an estimate) and `sound` (a certificate) Lipschitz constants. The table is
printed and written to `<workdir>/comparison.{md,json}`; each method's reports
and figures to `<workdir>/<method>/compare_robustness/` and `compare_certify/`,
and its numbers and figures to TensorBoard (`tensorboard --logdir <workdir>`).
`<workdir>/index.md` links them all (its path is printed last).
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.configs import evals as evals_config
from mmsafe import files
from mmsafe import methods
from mmsafe.eval import registry
from mmsafe.eval import report
from mmsafe.train import loop, restore

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one run per method.")
_METHODS = flags.DEFINE_list("methods", ["jt", "ojt"], "Methods to train and compare.")
_PROTOCOL = flags.DEFINE_string("protocol", "default", "PGD protocol preset of the evaluation.")
_CERTIFY = flags.DEFINE_list("certify_kinds", ["empirical", "sound"],
                             "Lipschitz kinds of the mean certified radius (empty: none).")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate_method(workdir: str, protocol: str, certify_kinds) -> dict:
  """Headline robustness numbers and mean certified radii of one trained run
  (the `paper` evaluators of experiments/configs/evals.py, and `certify`
  without its attack check), each evaluator's report written into
  `<workdir>/compare_<name>/` and its numbers and figures into TensorBoard
  events."""
  config, model, variables, splits, step = restore.restore_run_and_step(workdir)
  evals = evals_config.get_config("paper").to_dict()
  evals["robustness"]["protocol"] = protocol
  if certify_kinds:
    evals.update(evals_config.get_config("certify").to_dict())
    evals["certify"].update(kinds=tuple(certify_kinds), attack_steps=0)
  built = registry.build_evaluators(evals, model=model, splits=splits)
  measured = {name: evaluator.run(variables) for name, evaluator in built.items()}
  for name, metrics in measured.items():
    # Named apart from experiments.evaluate's reports of the same run.
    paths = report.write_evaluation(built[name].type, metrics,
                                    os.path.join(workdir, f"compare_{name}"),
                                    title=f"Robustness of {config['method']} on "
                                    f"{config['dataset']} ({built[name].split})")
    report.write_events(workdir, f"compare_{name}", step, metrics, paths)
  row = {"method": config["method"], **measured["robustness"]["headline"]}
  for kind, entry in measured.get("certify", {"kinds": {}})["kinds"].items():
    row[f"radius/{kind}"] = entry["summary"]["mean_radius"]
  return row


def markdown_table(rows: list[dict]) -> str:
  """Rows of equal keys as a markdown table (accuracies as fractions)."""
  columns = list(rows[0])
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  for row in rows:
    cells = [row[c] if isinstance(row[c], str) else f"{row[c]:.4g}" for c in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  for name in _METHODS.value:
    methods.get(name)  # Unknown names fail before any training starts.
  rows = []
  for name in _METHODS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    with config.unlocked():
      config.method = name
    run_dir = os.path.join(_WORKDIR.value, name)
    trained = loop.train_and_evaluate(config, run_dir)
    row = evaluate_method(run_dir, _PROTOCOL.value, _CERTIFY.value)
    rows.append({**row, "validation_accuracy": trained["validation_accuracy"]})
  table = markdown_table(rows)
  print(f"\n{_CONFIG.value.dataset}, test split, models selected on validation "
        f"(PGD protocol {_PROTOCOL.value!r}; radius/sound is a certificate, "
        f"radius/empirical an estimate; radii and eps are l2 in normalised input "
        f"space):\n\n{table}")
  written = [files.write_text_atomic(os.path.join(_WORKDIR.value, "comparison.md"), table),
             files.write_json_atomic(os.path.join(_WORKDIR.value, "comparison.json"), rows)]
  index = cli.record_in_index(
      _WORKDIR.value, f"compare {', '.join(_METHODS.value)} on {_CONFIG.value.dataset}",
      written + [os.path.join(_WORKDIR.value, name) for name in _METHODS.value],
      config=_CONFIG.value, key="compare")
  print(f"index of the reports and figures: {index}")


if __name__ == "__main__":
  cli.run(main)
