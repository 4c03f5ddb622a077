r"""Certified radii of a trained run for each Lipschitz kind, checked by attacks:
`experiments.evaluate` with the `certify` evals config by default.

  python -m experiments.certify --workdir=/tmp/mmsafe/ojt
  python -m experiments.certify --workdir=/tmp/mmsafe/ojt \
      --evals.certify.kinds="('sound',)" --evals.certify.max_examples=500

Reads the run with `mmsafe.train.restore.restore_run` (the model selected on
validation unless --which=latest) and writes to `<workdir>/certify/`
(settings: `experiments/configs/evals.py`, `certify`):

  results.json                  per kind: clean accuracy, mean radius, the
                                certified-accuracy curve, uni-modal curves,
                                the Lipschitz constants' summary, the eta ratio
                                heat map and the attack check below
  certified_accuracy.png        certified accuracy vs radius, one line per kind
  unimodal_<kind>.png           uni-modal (Prop. 3.4) certified accuracy
  eta_ratio_<kind>.png          eta^(m1) / eta^(m2) over class pairs (CRMT Fig. 3)

Attack check (`mmsafe.eval.certification`): for every correctly classified
test sample with a positive radius r(x), an l2-PGD attack (margin loss,
`attack_steps` steps of 2.5 r/steps, `attack_restarts` random restarts, worst
iterate kept) searches the ball of radius `(1 - 1e-4) r(x)`. A success inside
a `sound` radius would be a bug; for `local`/`empirical` (estimates) the
report gives how often the radius is broken.
"""

import os

from experiments import cli

DEFAULT_EVALS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                             "evals.py") + ":certify"
# Named before experiments.evaluate defines its flag (with its own default).
if __name__ == "__main__":
  cli.name_config_on_command_line("evals", DEFAULT_EVALS)

from experiments import evaluate  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv):
  evaluate.main(argv)


if __name__ == "__main__":
  cli.run(main)
