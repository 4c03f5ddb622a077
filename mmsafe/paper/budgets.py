"""Attack budgets where attacks bite, calibrated on JT's validation curves, and
the check of a cheap attack protocol against `default` at those budgets.

Besides the paper's budgets (multi-modal eps 0.5, uni-modal 1.0), each setting
of a reproduction (a modality pair, or the default pair) gets budgets at which
JT's robust accuracy on the *validation* split is about 0.75, 0.5 and 0.25,
per modality and multi-modal (`calibrate`), from JT's seed-0 run: fixed before
any other run is evaluated, and written in the report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

from mmsafe import files
from mmsafe.eval import registry
from mmsafe.paper import evidence
from mmsafe.train import restore

MULTI = evidence.MULTI
TARGETS = (0.75, 0.5, 0.25)  # JT's robust accuracy at the calibrated budgets
BITE_TARGET = 0.5  # the calibrated budget the claims are judged at
CALIBRATION_GRID = tuple(2.0 ** (k / 3) for k in range(-12, 19))  # 1/16 .. 64
BUDGETS_FILE = "budgets.json"
PROTOCOL_CHECK_FILE = "protocol_check.json"


def crossing(eps: Sequence[float], accuracy: Sequence[float], target: float) -> float:
  """The radius at which a falling robust-accuracy curve reaches `target`, linear
  in log eps between the grid points around it, to 2 significant digits (the
  grid's ends when the curve starts below or never reaches the target)."""
  eps, accuracy = np.asarray(eps, float), np.asarray(accuracy, float)
  below = np.flatnonzero(accuracy <= target)
  if not below.size:
    value = eps[-1]
  elif below[0] == 0:
    value = eps[0]
  else:
    i = below[0]
    t = (accuracy[i - 1] - target) / max(accuracy[i - 1] - accuracy[i], 1e-12)
    value = math.exp(math.log(eps[i - 1]) + t * (math.log(eps[i]) - math.log(eps[i - 1])))
  return float(f"{value:.2g}")


def suite(preset: Mapping[str, Any], split: str, protocol: str, max_examples: int,
          **changes) -> dict[str, Any]:
  """The robustness suite `preset` on `split` under `protocol`, without the
  decoupling attack, with `changes`."""
  return dict(preset, split=split, protocol=protocol, decoupling_fractions=(),
              max_examples=max_examples, **changes)


def run_suite(run_dir: str, config: Mapping[str, Any]) -> dict[str, Any]:
  """The robustness suite `config` run on the model selected in `run_dir`."""
  _, model, variables, splits = restore.restore_run(run_dir)
  built = registry.build_evaluators({"robustness": config}, model=model, splits=splits)
  return built["robustness"].run(variables)


def calibrate(run_dir: str, preset: Mapping[str, Any], protocol: str, max_examples: int = 0
              ) -> dict[str, Any]:
  """Budgets at which the model of `run_dir` (JT) keeps robust accuracy
  `TARGETS` on the validation split, per scope ("multi" and each modality),
  attacked by the robustness suite `preset` under `protocol`.

  Returns:
    {scope: {"budgets": [eps per target], "eps": grid, "accuracy": curve}}.
  """
  curves = run_suite(run_dir, suite(
      preset, "validation", protocol, max_examples, multi_eps=CALIBRATION_GRID,
      uni_eps=CALIBRATION_GRID, attacks=("pgd",), missing_fills=()))["curves"]["pgd"]
  return {scope: {"budgets": [crossing(c["eps"], c["accuracy"], t) for t in TARGETS],
                  "eps": c["eps"], "accuracy": c["accuracy"]} for scope, c in curves.items()}


def budgets_of(calibration: Mapping[str, Any], modalities: Sequence[str]
               ) -> dict[str, evidence.Budgets]:
  """The paper's budgets and the calibrated bite budgets (`BITE_TARGET`)."""
  index = TARGETS.index(BITE_TARGET)
  return {evidence.PAPER: evidence.paper_budgets(modalities),
          evidence.BITE: evidence.Budgets(
              evidence.BITE, calibration[MULTI]["budgets"][index],
              {m: calibration[m]["budgets"][index] for m in modalities})}


def pgd_points(run: Mapping[str, Any], budgets: Mapping[str, evidence.Budgets]
               ) -> dict[str, float]:
  """`{"pgd/<scope>@<eps>": accuracy}` of a run's PGD curves at `budgets`."""
  return {f"pgd/{scope}@{eps:g}": evidence.curve_point(run, "pgd", scope, eps)
          for budget in budgets.values()
          for scope, eps in [(MULTI, budget.multi), *budget.uni.items()]}


def protocol_check(run: Mapping[str, Any], run_dir: str,
                   budgets: Mapping[str, evidence.Budgets], preset: Mapping[str, Any],
                   max_examples: int) -> dict[str, list[float]]:
  """The PGD accuracies of `run` (evaluated with a cheaper protocol) at
  `budgets` against those of the `default` protocol (50 steps x 5 restarts,
  both losses; the robustness suite `preset`) on the same model:
  `{"pgd/<scope>@<eps>": [cheap, default]}`
  (cached in `run_dir` for these budgets)."""
  cached = os.path.join(run_dir, PROTOCOL_CHECK_FILE)
  key = {name: dataclasses.asdict(b) for name, b in budgets.items()}
  if os.path.exists(cached):
    with open(cached) as f:
      stored = json.load(f)
    if stored["budgets"] == json.loads(json.dumps(key)):
      return stored["points"]
  multi = sorted({b.multi for b in budgets.values()})
  modalities = sorted(next(iter(budgets.values())).uni)
  uni = {m: sorted({b.uni[m] for b in budgets.values()}) for m in modalities}
  default = pgd_points(run_suite(run_dir, suite(
      preset, "test", "default", max_examples, multi_eps=tuple(multi), uni_eps=(),
      uni_extra_eps=uni, attacks=("pgd",), missing_fills=())), budgets)
  cheap = pgd_points(run, budgets)
  points = {point: [cheap[point], default[point]] for point in default}
  files.write_json_atomic(cached, {"budgets": key, "points": points})
  return points
