r"""Trains one method on one dataset.

  python -m experiments.train --config=experiments/configs/embedded.py \
      --config.method=ojt --config.dataset=mfeat --workdir=/tmp/mmsafe/ojt

Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import json

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mmsafe.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("results: %s", results)
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
  app.run(main)
