r"""Robustness report of a trained run: clean / FGM / PGD (multi- and uni-modal),
missing modality and the decoupling attack, written to <workdir>/robustness/.

  python -m experiments.evaluate --workdir=/tmp/mmsafe/ojt
  python -m experiments.evaluate --workdir=/tmp/mmsafe/ojt --protocol=paper_reference \
      --multi_eps=0.5 --uni_eps=1.0 --decoupling_fractions= --split=validation

Writes robustness.json, robustness.md and PNG plots (see mmsafe.eval.report).

With --strength_sweep it instead measures PGD robust accuracy over a steps x
restarts grid at the paper budgets (times --sweep_scales) and writes
pgd_strength.{json,md}: the evidence that a protocol's attack has converged.
"""

import json
import os

from absl import app
from absl import flags
import jax
import numpy as np
from tqdm.auto import tqdm

from mmsafe import data as data_lib
from mmsafe.attacks import PROTOCOLS
from mmsafe.eval import report
from mmsafe.eval import robustness
from mmsafe.train import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run's directory.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: <workdir>/robustness).")
_SPLIT = flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "Split to evaluate.")
_WHICH = flags.DEFINE_enum("which", "best", ["best", "latest"], "Checkpoint to evaluate.")
_PROTOCOL = flags.DEFINE_enum("protocol", "default", sorted(PROTOCOLS), "PGD protocol preset.")
_MULTI_EPS = flags.DEFINE_list("multi_eps", ["0.125", "0.25", "0.5", "1.0"],
                               "Eps grid of the multi-modal attacks (the protocol's budget "
                               "is always added).")
_UNI_EPS = flags.DEFINE_list("uni_eps", ["0.25", "0.5", "1.0", "2.0"],
                             "Eps grid of the uni-modal attacks.")
_ATTACKS = flags.DEFINE_list("attacks", ["fgm", "pgd"], "Subset of fgm,pgd.")
_UNI_MODALITIES = flags.DEFINE_list("uni_modalities", None,
                                    "Modalities attacked alone (default: each).")
_FILLS = flags.DEFINE_list("missing_fills", ["zeros"],
                           "Missing-modality fills: zeros,mean,noise (empty: skip).")
_FRACTIONS = flags.DEFINE_list("decoupling_fractions", ["0.0025", "0.005", "0.0116", "0.025",
                                                        "0.05"],
                               "Decoupling attack l0 budgets (empty: skip).")
_SCOPES = flags.DEFINE_list("decoupling_scopes", ["multi"],
                            "'multi' (all modalities jointly) and/or modality names.")
_MAX_CHANGE = flags.DEFINE_float("decoupling_max_change", 2.0,
                                 "Bound on each changed entry (normalised units).")
_ROUNDS = flags.DEFINE_integer("decoupling_rounds", 8, "Support-growing rounds.")
_STEPS = flags.DEFINE_integer("decoupling_steps", 10, "Signed-gradient steps per round.")
_BOX = flags.DEFINE_bool("box", False, "Clip attacks to the raw value range of bounded "
                         "modalities (Dataset.value_range).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Examples per compiled attack call.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Evaluate the first N examples (0: all).")
_FILL_EXAMPLES = flags.DEFINE_integer(
    "fill_examples", 0, "Training examples averaged for the 'mean' missing-modality fill (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the attacks' randomness.")
_SWEEP = flags.DEFINE_bool("strength_sweep", False, "Run the PGD steps x restarts sweep instead.")
_SWEEP_STEPS = flags.DEFINE_list("sweep_steps", ["4", "10", "20", "50", "100"], "Sweep steps.")
_SWEEP_RESTARTS = flags.DEFINE_list("sweep_restarts", ["1", "3", "5"], "Sweep restarts.")
_SWEEP_RANDOM = flags.DEFINE_bool("sweep_random_start", False,
                                  "Sweep: start restart 0 at a random point (else clean).")
_SWEEP_SCALES = flags.DEFINE_list("sweep_scales", ["1", "4"],
                                  "Multiples of the paper budgets (multi 0.5, uni 1.0) to sweep.")
flags.mark_flags_as_required(["workdir"])


def _floats(values, name):
  try:
    return tuple(float(v) for v in values or ())
  except ValueError as e:
    raise app.UsageError(f"--{name}: expected comma-separated numbers, got {values}") from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, model, variables, splits = loop.restore_run(_WORKDIR.value, which=_WHICH.value)
  data = data_lib.in_memory(splits[_SPLIT.value], _MAX_EXAMPLES.value)
  inputs, labels = dict(data.inputs), np.asarray(data.labels)
  if _SWEEP.value:
    _strength_sweep(config, model, variables, inputs, labels)
    return
  suite = robustness.SuiteConfig(
      protocol=_PROTOCOL.value,
      multi_eps=_floats(_MULTI_EPS.value, "multi_eps"),
      uni_eps=_floats(_UNI_EPS.value, "uni_eps"),
      attacks=tuple(_ATTACKS.value or ()),
      uni_modalities=None if _UNI_MODALITIES.value is None else tuple(_UNI_MODALITIES.value),
      missing_fills=tuple(_FILLS.value or ()),
      decoupling_fractions=_floats(_FRACTIONS.value, "decoupling_fractions"),
      decoupling_scopes=tuple(_SCOPES.value or ()),
      decoupling={"max_change": _MAX_CHANGE.value, "rounds": _ROUNDS.value,
                  "steps_per_round": _STEPS.value},
      batch_size=_BATCH.value, seed=_SEED.value)
  bounds = ({m: data.normalized_range(m) for m in data.value_range if m in inputs}
            if _BOX.value else None)
  fill_means = data_lib.modality_means(splits["train"], _FILL_EXAMPLES.value)
  total = robustness.num_work_units(suite, data.modality_shapes, len(labels))
  with tqdm(total=total, desc=f"robustness of {config['method']} on {config['dataset']}/"
            f"{_SPLIT.value}", unit="batch", dynamic_ncols=True) as bar:
    results = robustness.evaluate_robustness(
        robustness.logits_apply(model), variables, inputs, labels, suite, bounds=bounds,
        fill_means=fill_means, progress=bar.update)
  results["meta"] = {"workdir": os.path.abspath(_WORKDIR.value), "method": config["method"],
                     "dataset": config["dataset"], "split": _SPLIT.value,
                     "checkpoint": _WHICH.value, "device": str(jax.devices()[0])}
  out = _OUT.value or os.path.join(_WORKDIR.value, "robustness")
  paths = report.write_report(results, out, title=f"Robustness of {config['method']} on "
                              f"{config['dataset']} ({_SPLIT.value})")
  print(json.dumps({"headline": results["headline"], "files": paths}, indent=2))


def _strength_sweep(config, model, variables, inputs, labels):
  protocol = PROTOCOLS[_PROTOCOL.value]
  scales = _floats(_SWEEP_SCALES.value, "sweep_scales")
  budgets = [(robustness.MULTI, protocol.multi_eps * s) for s in scales]
  budgets += [(m, protocol.uni_eps * s) for m in sorted(inputs) for s in scales]
  steps = [int(v) for v in _SWEEP_STEPS.value]
  restarts = [int(v) for v in _SWEEP_RESTARTS.value]
  batches = -(-len(labels) // _BATCH.value)
  total = len(budgets) * len(steps) * max(restarts) * batches
  with tqdm(total=total, desc="PGD strength sweep", unit="batch", dynamic_ncols=True) as bar:
    sweep = robustness.pgd_strength_sweep(
        robustness.logits_apply(model), variables, inputs, labels, budgets=budgets, steps=steps,
        restarts=restarts, random_start=_SWEEP_RANDOM.value, batch_size=_BATCH.value,
        seed=_SEED.value, progress=bar.update)
  sweep["meta"] = {"workdir": os.path.abspath(_WORKDIR.value), "method": config["method"],
                   "dataset": config["dataset"], "split": _SPLIT.value,
                   "device": str(jax.devices()[0])}
  out = _OUT.value or os.path.join(_WORKDIR.value, "robustness")
  paths = report.write_sweep(sweep, out)
  print(json.dumps({"accuracy": sweep["accuracy"], "files": paths}, indent=2))


if __name__ == "__main__":
  app.run(main)
