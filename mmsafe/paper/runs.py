"""One run of a reproduction: trained (resumably), evaluated on the test split,
the evaluation cached in the run's directory with the settings it was made
with; and the config changes the reproduction's parts make."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
import os
import time
from typing import Any

import ml_collections

from mmsafe import files
from mmsafe.eval import registry
from mmsafe.paper import budgets as budgets_lib
from mmsafe.train import loop, restore

MULTI = budgets_lib.MULTI
# Radii of the robust-accuracy curves (Figs. 1, 4, 5; areas); the paper's budgets
# and the calibrated ones are added to them.
MULTI_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
UNI_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
RESULTS_FILE = "reproduce.json"
DIVERGED_FILE = "diverged.json"


@dataclasses.dataclass(frozen=True)
class Presets:
  """The evaluator configs a reproduction starts from (`mmsafe.eval.registry`
  dicts: the robustness suite, and certification for the eta ratio), and the
  transformer part's training config per method (Table 3; {} when that part is
  not run)."""

  robustness: Mapping[str, Any]
  certify: Mapping[str, Any]
  transformer: Mapping[str, ml_collections.ConfigDict] = dataclasses.field(default_factory=dict)


def evaluation_settings(protocol: str, calibration: Mapping[str, Any], max_examples: int, *,
                        with_eta: bool, attacks: Sequence[str] = ("fgm", "pgd")
                        ) -> dict[str, Any]:
  """What one run's evaluation depends on (a cached evaluation is reused only
  when these are equal): the curve grids with the paper's and the calibrated
  budgets, the attacks, and whether the eta ratio is computed."""
  modalities = sorted(scope for scope in calibration if scope != MULTI)
  return {"protocol": protocol,
          "multi_eps": sorted({*MULTI_GRID, 0.5, *calibration[MULTI]["budgets"]}),
          "uni_eps": sorted({*UNI_GRID, 1.0}),
          "uni_extra_eps": {m: sorted(calibration[m]["budgets"]) for m in modalities},
          "attacks": list(attacks), "max_examples": int(max_examples),
          "with_eta": bool(with_eta)}


def evaluator_configs(settings: Mapping[str, Any], presets: Presets
                      ) -> dict[str, dict[str, Any]]:
  """The evaluators of one run: the robustness suite with per-example results
  (no decoupling attack) and, `with_eta`, certification with empirical
  constants (its eta ratio; no attack check), in normalised units: the
  paper's eta, and the units of the attacks it is compared with."""
  evals = {"robustness": budgets_lib.suite(
      presets.robustness, "test", settings["protocol"], settings["max_examples"],
      multi_eps=tuple(settings["multi_eps"]),
      uni_eps=tuple(settings["uni_eps"]), uni_extra_eps=dict(settings["uni_extra_eps"]),
      attacks=tuple(settings["attacks"]), per_example=True)}
  if settings["with_eta"]:
    evals["certify"] = dict(presets.certify)
    evals["certify"].update(kinds=("empirical",), attack_steps=0,
                            max_examples=settings["max_examples"], units="normalised")
  return evals


def evaluate_run(run_dir: str, settings: Mapping[str, Any], presets: Presets
                 ) -> dict[str, Any]:
  """Test-split numbers of the model selected on validation in `run_dir` (the
  evaluators of `presets`, changed by `settings`)."""
  _, model, variables, splits = restore.restore_run(run_dir)
  built = registry.build_evaluators(evaluator_configs(settings, presets), model=model,
                                    splits=splits)
  start = time.time()
  suite = built["robustness"].run(variables)
  result = {"settings": dict(settings), "num_classes": int(splits["test"].num_classes),
            **{key: suite[key] for key in ("headline", "curves", "per_example", "missing",
                                           "num_examples")}}
  if settings["with_eta"]:
    entry = built["certify"].run(variables)["kinds"]["empirical"]
    result["eta_ratio"] = entry["eta_ratio"]
  result["evaluation_seconds"] = time.time() - start
  return result


def train_and_evaluate_run(config: ml_collections.ConfigDict, run_dir: str,
                           settings: Mapping[str, Any], presets: Presets, *, label: str
                           ) -> dict[str, Any]:
  """Trains (or resumes, or skips when finished) `config` in `run_dir`, then
  evaluates it unless `run_dir` already holds an evaluation with `settings`.
  `label` names the run's method in the results (e.g. "crmt_2iter"). A run
  that diverged (`train_run`) has no evaluation: its result says "diverged"."""
  result = cached_result(run_dir, settings)
  if result is not None:
    return result
  trained = train_run(config, run_dir)
  identity = {"method": label, "seed": int(config.seed),
              "training_seconds": trained["train_seconds_this_run"]}
  if "diverged" in trained:  # nothing to evaluate: reported, not counted (`DIVERGED_FILE`)
    result = {"settings": dict(settings), "diverged": trained["diverged"],
              "evaluation_seconds": 0.0, **identity}
  else:
    result = dict(evaluate_run(run_dir, settings, presets), **identity,
                  validation_accuracy=trained["validation_accuracy"])
  files.write_json_atomic(os.path.join(run_dir, RESULTS_FILE), result)
  return result


def cached_result(run_dir: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
  """`run_dir`'s cached evaluation when it was made with `settings`, else None."""
  path = os.path.join(run_dir, RESULTS_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  return result if result.get("settings") == json.loads(json.dumps(dict(settings))) else None


def train_run(config: ml_collections.ConfigDict, run_dir: str) -> dict[str, Any]:
  """The training results of `run_dir`: read when the run has finished, else
  trained (or resumed) now. Their `train_seconds_this_run` is the time of the
  training that finished the run (of its last segment, when it was resumed).

  A run whose training loss turns non-finite has diverged: that is recorded
  (`DIVERGED_FILE`, with the step, so that a rerun does not train it again)
  and returned as {"diverged": message, "train_seconds_this_run"}."""
  for name in ("results.json", DIVERGED_FILE):  # (results.json: the run finished)
    path = os.path.join(run_dir, name)
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
  start = time.time()
  try:
    return loop.train_and_evaluate(config, run_dir)
  except FloatingPointError as error:
    diverged = {"diverged": str(error), "train_seconds_this_run": time.time() - start}
    files.write_json_atomic(os.path.join(run_dir, DIVERGED_FILE), diverged)
    return diverged


def _holder(config: ml_collections.ConfigDict, field: str) -> tuple[Any, str]:
  """The node of `config` holding the dotted `field`, and the field's last name."""
  *parents, leaf = field.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  return node, leaf


def field_value(config: ml_collections.ConfigDict, field: str) -> Any:
  """The value of the dotted `field` of `config` (e.g. "optimizer.decay_epochs")."""
  node, leaf = _holder(config, field)
  return node[leaf]


def configured(base: ml_collections.ConfigDict, method: str, seed: int, **changes
               ) -> ml_collections.ConfigDict:
  """`base` with `method`, `seed` and `changes` (dotted field -> value)."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.method, config.seed = method, seed
    for field, value in changes.items():
      node, leaf = _holder(config, field)
      node[leaf] = value
  return config


def two_iterations(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CRMT with its two steps run twice (App. 8.3): step 1, step 2, then step 1
  again for a third of the epochs at the decayed learning rate (where the first
  one ended), and step 2 again (its constants re-estimated)."""
  optimizer = dict(config.optimizer)
  step2_epochs = config.step2.num_epochs or config.num_epochs // 3
  again = dict(optimizer, learning_rate=optimizer["learning_rate"] * optimizer["decay_factor"],
               decay_epochs=())
  with config.unlocked():
    config.stages = (
        {"name": "step1", "objective": "crmt", "num_epochs": config.num_epochs},
        {"name": "step2", "objective": "crmt/step2", "num_epochs": step2_epochs},
        {"name": "step1_iter2", "objective": "crmt", "optimizer": again,
         "num_epochs": max(config.num_epochs // 3, 1), "restart_selection": True},
        {"name": "step2_iter2", "objective": "crmt/step2", "num_epochs": step2_epochs})
  return config
