r"""Trains several methods with the same config, seed and budget; compares them.

  python -m experiments.compare --config=experiments/configs/embedded.py \
      --methods=jt,ojt,crmt --workdir=/tmp/mmsafe/compare

Each method trains in `<workdir>/<method>` (resumable). Then every model
selected on validation is evaluated on the test split: clean accuracy,
multi-modal FGM and l2-PGD at the paper's eps = 0.5, uni-modal FGM / l2-PGD at
eps = 1.0 and missing-modality accuracy per modality (the columns of the
CRMT paper's Tables 1-2), and the mean certified radius with `empirical`
(an estimate) and `sound` (a certificate) Lipschitz constants. The table is
printed and written to `<workdir>/comparison.{md,json}`.
"""

import os

from absl import flags
from ml_collections import config_flags

from experiments import cli
from experiments.configs import evals as evals_config
from mmsafe import files
from mmsafe import methods
from mmsafe.eval import evaluators
from mmsafe.train import loop

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
  without its attack check)."""
  config, model, variables, splits = loop.restore_run(workdir)
  evals = evals_config.get_config("paper").to_dict()
  evals["robustness"]["protocol"] = protocol
  if certify_kinds:
    evals.update(evals_config.get_config("certify").to_dict())
    evals["certify"].update(kinds=tuple(certify_kinds), attack_steps=0)
  built = evaluators.build_evaluators(evals, model=model, splits=splits)
  row = {"method": config["method"], **built["robustness"].run(variables)["headline"]}
  if certify_kinds:
    for kind, entry in built["certify"].run(variables)["kinds"].items():
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
  files.write_json_atomic(os.path.join(_WORKDIR.value, "comparison.json"), rows)
  files.write_text_atomic(os.path.join(_WORKDIR.value, "comparison.md"), table)


if __name__ == "__main__":
  cli.run(main)
