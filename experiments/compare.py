r"""Trains several methods with the same config, seed and budget; prints a table.

  python -m experiments.compare --config=experiments/configs/embedded.py \
      --methods=jt,ojt --workdir=/tmp/mmsafe/compare

Each method trains in `<workdir>/<method>` (resumable); the table is also written
to `<workdir>/comparison.md` and `<workdir>/comparison.json`.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmsafe import methods
from mmsafe.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one run per method.")
_METHODS = flags.DEFINE_list("methods", ["jt", "ojt"], "Methods to train and compare.")
flags.mark_flags_as_required(["config", "workdir"])


def markdown_table(rows: list[dict]) -> str:
  header = "| method | validation acc | test acc | best step |\n|---|---|---|---|\n"
  return header + "".join(
      f"| {r['method']} | {r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
      f"{r['best_step']} |\n" for r in rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  for name in _METHODS.value:
    methods.get(name)  # Unknown names fail before any training starts.
  rows = []
  for name in _METHODS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    with config.unlocked():
      config.method = name
    rows.append(loop.train_and_evaluate(config, os.path.join(_WORKDIR.value, name)))
  table = markdown_table(rows)
  dataset = _CONFIG.value.dataset
  print(f"\n{dataset}: test accuracy of the model selected on validation\n\n{table}")
  loop.write_json_atomic(os.path.join(_WORKDIR.value, "comparison.json"), rows)
  with open(os.path.join(_WORKDIR.value, "comparison.md"), "w") as f:
    f.write(table)


if __name__ == "__main__":
  app.run(main)
