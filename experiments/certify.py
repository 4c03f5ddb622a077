r"""Certified radii of a trained run for each Lipschitz kind, checked by attacks.

  python -m experiments.certify --workdir=/tmp/mmsafe/ojt

Reads the run with `mmsafe.train.loop.restore_run` (the model selected on
validation) and writes to `<workdir>/certify/`:

  results.json                  per kind: clean accuracy, mean radius, the
                                certified-accuracy curve, uni-modal curves,
                                the Lipschitz constants' summary, the eta ratio
                                heat map and the attack check below
  certified_accuracy.png        certified accuracy vs radius, one line per kind
  unimodal_<kind>.png           uni-modal (Prop. 3.4) certified accuracy
  eta_ratio_<kind>.png          eta^(m1) / eta^(m2) over class pairs (CRMT Fig. 3)

Attack check (`mmsafe.eval.certification`): for every correctly classified
test sample with a positive radius r(x), an l2-PGD attack (margin loss,
`--attack_steps` steps of 2.5 r/steps, `--attack_restarts` random restarts,
worst iterate kept) searches the ball of radius `(1 - 1e-4) r(x)`. A success
inside a `sound` radius would be a bug; for `local`/`empirical` (estimates)
the report gives how often the radius is broken.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from tqdm.auto import tqdm

from mmsafe import certify as certify_lib
from mmsafe.eval import report
from mmsafe.eval.certification import run_certification
from mmsafe.train import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run (written by experiments.train).")
_KINDS = flags.DEFINE_list("kinds", list(certify_lib.KINDS), "Lipschitz kinds to certify with.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to certify.")
_EMPIRICAL_SPLIT = flags.DEFINE_string("empirical_split", "train",
                                       "Split the empirical constants are the maximum over.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 100, "Examples per certification batch.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Certify only the first N (0: all).")
_MODE = flags.DEFINE_enum("mode", "auto", ["auto", "jacfwd", "jacrev"], "Jacobian mode.")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Examples per Jacobian chunk (0: whole batch).")
_ITERATIONS = flags.DEFINE_integer("power_iterations", 300, "Power iterations per conv layer.")
_FAILURE = flags.DEFINE_float("failure_probability", 1e-6,
                              "Per-layer failure probability of the power-iteration bound.")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 100, "PGD steps (0: no attack check).")
_ATTACK_RESTARTS = flags.DEFINE_integer("attack_restarts", 5, "PGD restarts.")
_NUM_THRESHOLDS = flags.DEFINE_integer("num_thresholds", 101, "Radii in the curves' grid.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks and power iterations.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to certify.")

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  _, model, variables, splits = loop.restore_run(workdir, which=_WHICH.value)
  results, _, _ = run_certification(
      model, variables, splits, kinds=_KINDS.value, split=_SPLIT.value,
      empirical_split=_EMPIRICAL_SPLIT.value, batch_size=_BATCH_SIZE.value,
      max_examples=_MAX_EXAMPLES.value, mode=_MODE.value, chunk_size=_CHUNK.value or None,
      power_iterations=_ITERATIONS.value, failure_probability=_FAILURE.value,
      attack_steps=_ATTACK_STEPS.value, attack_restarts=_ATTACK_RESTARTS.value,
      num_thresholds=_NUM_THRESHOLDS.value, seed=_SEED.value,
      track=lambda iterable, total, description: tqdm(iterable, total=total, desc=description))
  paths = report.write_certification_report(results, os.path.join(workdir, "certify"))
  for kind, entry in results["kinds"].items():
    summary = entry["summary"]
    attack = entry.get("attack", {})
    print(f"{kind:>9}: clean acc {summary['clean_accuracy']:.4f}  mean radius "
          f"{summary['mean_radius']:.4g}  median radius (correct) "
          f"{summary['median_radius_correct']:.4g}  broken "
          f"{attack.get('broken', '-')}/{attack.get('attacked', '-')}")
  print("wrote", *paths, sep="\n  ")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
