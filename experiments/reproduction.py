"""The pieces of `experiments.reproduce`: attack budgets calibrated where attacks
bite, one run's training and evaluation (cached in the run's directory), and
the experiment's parts. Flag-free, so that tests and notebooks import it; the
report is `experiments.reproduction_report`.

Parts (`PARTS`), each with seeded runs under `<workdir>/runs/<part>/...`:

* "main": every Table 1 and ablation method on the dataset's default pair;
* "transformer": the multi-modal transformer, JT against CRMT step 1 (Table 3);
* "iterations": CRMT with two iterations of its two steps (App. 8.3);
* "pairs": JT, CRMT and the two strongest baselines on every other pair of
  the dataset's modalities (datasets with more than two; mfeat has 15 pairs);
* "imbalance": JT and CRMT with noise of growing strength dialled into one
  modality (`mmsafe.data.dataset.with_noise`).

Budgets: besides the paper's (multi-modal eps 0.5, uni-modal 1.0), each
setting (a modality pair, or the default pair) gets budgets at which JT's
robust accuracy on the *validation* split is about 0.75, 0.5 and 0.25, per
modality and multi-modal (`calibrate`), from JT's seed-0 run: fixed before any
other run is evaluated, and written in the report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import itertools
import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import claims as claims_lib
from experiments.configs import evals as evals_config
from experiments.configs import mmt as mmt_config
from mmsafe import data as data_lib
from mmsafe import files
from mmsafe.data import mfeat
from mmsafe.eval import registry
from mmsafe.train import loop, restore

TABLE1_METHODS = claims_lib.TABLE1_METHODS
# The paper's ablation (Sec. 4.3, Fig. 5).
ABLATION_METHODS = ("jt", "ojt", "crmt_step1", "crmt_step2", "crmt")
MAIN_METHODS = tuple(dict.fromkeys(TABLE1_METHODS + ABLATION_METHODS))
# Methods whose eta ratio (Fig. 3) is computed in the main part; every run of
# the pairs part computes it.
ETA_METHODS = ("jt", "crmt_step1", "crmt", "mmat", "crmt_at", "gb")
# The pairs part: JT, CRMT and the two most robust baselines of mmsafe's
# 3-seed reproductions on both datasets (GB, MMAT).
PAIR_METHODS = ("jt", "crmt", "gb", "mmat")
TRANSFORMER_METHODS = ("jt", "crmt_step1")
IMBALANCE_METHODS = ("jt", "crmt")
NOISE_LEVELS = (1.0, 2.0, 4.0)
PARTS = ("main", "transformer", "iterations", "pairs", "imbalance")
MULTI = claims_lib.MULTI
# Radii of the robust-accuracy curves (Figs. 1, 4, 5; areas); the paper's budgets
# and the calibrated ones are added to them.
MULTI_GRID = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
UNI_GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
TARGETS = (0.75, 0.5, 0.25)  # JT's robust accuracy at the calibrated budgets
BITE_TARGET = 0.5  # the calibrated budget the claims are judged at
CALIBRATION_GRID = tuple(2.0 ** (k / 3) for k in range(-12, 19))  # 1/16 .. 64
RESULTS_FILE = "reproduce.json"
BUDGETS_FILE = "budgets.json"
PROTOCOL_CHECK_FILE = "protocol_check.json"
DIVERGED_FILE = "diverged.json"


# ---------------------------------------------------------------------------
# Budgets where attacks bite.


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


def _suite(settings: Mapping[str, Any], split: str, **changes) -> dict[str, Any]:
  suite = evals_config.get_config("robustness").to_dict()["robustness"]
  suite.update(split=split, protocol=settings["protocol"], decoupling_fractions=(),
               max_examples=settings["max_examples"], **changes)
  return suite


def calibrate(run_dir: str, protocol: str, max_examples: int = 0) -> dict[str, Any]:
  """Budgets at which the model of `run_dir` (JT) keeps robust accuracy
  `TARGETS` on the validation split, per scope ("multi" and each modality).

  Returns:
    {scope: {"budgets": [eps per target], "eps": grid, "accuracy": curve}}.
  """
  _, model, variables, splits = restore.restore_run(run_dir)
  settings = {"protocol": protocol, "max_examples": max_examples}
  suite = _suite(settings, "validation", multi_eps=CALIBRATION_GRID, uni_eps=CALIBRATION_GRID,
                 attacks=("pgd",), missing_fills=())
  built = registry.build_evaluators({"robustness": suite}, model=model, splits=splits)
  curves = built["robustness"].run(variables)["curves"]["pgd"]
  return {scope: {"budgets": [crossing(c["eps"], c["accuracy"], t) for t in TARGETS],
                  "eps": c["eps"], "accuracy": c["accuracy"]} for scope, c in curves.items()}


def budgets_of(calibration: Mapping[str, Any], modalities: Sequence[str]
               ) -> dict[str, claims_lib.Budgets]:
  """The paper's budgets and the calibrated bite budgets (`BITE_TARGET`)."""
  index = TARGETS.index(BITE_TARGET)
  return {claims_lib.PAPER: claims_lib.paper_budgets(modalities),
          claims_lib.BITE: claims_lib.Budgets(
              claims_lib.BITE, calibration[MULTI]["budgets"][index],
              {m: calibration[m]["budgets"][index] for m in modalities})}


# ---------------------------------------------------------------------------
# One run: train, evaluate on the test split, cache.


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


def evaluator_configs(settings: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """The evaluators of one run: the robustness suite with per-example results
  (no decoupling attack) and, `with_eta`, certification with empirical
  constants (its eta ratio; no attack check), in normalised units: the
  paper's eta, and the units of the attacks it is compared with."""
  evals = {"robustness": _suite(
      settings, "test", multi_eps=tuple(settings["multi_eps"]),
      uni_eps=tuple(settings["uni_eps"]), uni_extra_eps=dict(settings["uni_extra_eps"]),
      attacks=tuple(settings["attacks"]), per_example=True)}
  if settings["with_eta"]:
    evals.update(evals_config.get_config("certify").to_dict())
    evals["certify"].update(kinds=("empirical",), attack_steps=0,
                            max_examples=settings["max_examples"], units="normalised")
  return evals


def evaluate_run(run_dir: str, settings: Mapping[str, Any]) -> dict[str, Any]:
  """Test-split numbers of the model selected on validation in `run_dir`."""
  _, model, variables, splits = restore.restore_run(run_dir)
  built = registry.build_evaluators(evaluator_configs(settings), model=model, splits=splits)
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
                           settings: Mapping[str, Any], *, label: str) -> dict[str, Any]:
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
    result = dict(evaluate_run(run_dir, settings), **identity,
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


# ---------------------------------------------------------------------------
# The parts' runs.


@dataclasses.dataclass(frozen=True)
class Job:
  """One training run of a part: its config, directory and evaluation."""

  part: str
  setting: str  # "default", a pair "m1+m2", or "noise<s>"
  label: str  # the method's name in the results
  seed: int
  config: ml_collections.ConfigDict
  run_dir: str
  with_eta: bool
  attacks: tuple[str, ...] = ("fgm", "pgd")


def configured(base: ml_collections.ConfigDict, method: str, seed: int, **changes
               ) -> ml_collections.ConfigDict:
  """`base` with `method`, `seed` and `changes` (dotted field -> value)."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.method, config.seed = method, seed
    for field, value in changes.items():
      *parents, leaf = field.split(".")
      node = config
      for parent in parents:
        node = node[parent]
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


def default_pair(base: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The modalities of `base`'s runs (its dataset's default pair unless set)."""
  modalities = base.data.get("modalities")
  if modalities:
    return tuple(modalities)
  return tuple(data_lib.load(base.dataset, "validation").inputs)


def all_modalities(dataset: str) -> tuple[str, ...]:
  """Every modality of an embedded dataset."""
  if dataset == "mfeat":
    return tuple(mfeat.MFEAT_VIEWS)
  return tuple(data_lib.load(dataset, "validation").inputs)


def parse_pair(text: str, dataset: str) -> tuple[str, str]:
  """"m1+m2" as a pair of two different modalities of `dataset`, in the
  dataset's order of modalities (the pairs part's setting names)."""
  names = tuple(text.split("+"))
  known = all_modalities(dataset)
  if len(names) != 2 or names[0] == names[1] or not set(names) <= set(known):
    raise ValueError(f"pairs: expected two different modalities of {dataset} joined by '+' "
                     f"(of {list(known)}), got {text!r}")
  return tuple(sorted(names, key=known.index))


def part_jobs(part: str, base: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int],
              *, methods: Sequence[str] = MAIN_METHODS, preferred: str | None = None,
              pairs: Sequence[tuple[str, str]] | None = None,
              pair_methods: Sequence[str] = PAIR_METHODS,
              noise_levels: Sequence[float] = NOISE_LEVELS) -> list[Job]:
  """The runs of `part` (see the module docstring), the calibrating JT seed
  first within each setting. `methods`: those of the main part; `pairs`: the
  modality pairs of the pairs part (None: every pair but the default one);
  `preferred`: JT's preferred modality (the imbalance dial adds noise to the
  other one)."""
  root = os.path.join(workdir, "runs", part)
  jobs = []

  def add(setting, label, method, seed, config, with_eta, attacks=("fgm", "pgd")):
    run_dir = os.path.join(root, *([setting] if setting != "default" else []), label,
                           f"seed{seed}")
    jobs.append(Job(part, setting, label, seed, config, run_dir, with_eta, tuple(attacks)))

  if part == "main":
    # Seed by seed, so that a partial reproduction holds every method.
    for seed, method in itertools.product(seeds, methods):
      add("default", method, method, seed, configured(base, method, seed),
          method in ETA_METHODS)
  elif part == "transformer":
    for method, seed in itertools.product(TRANSFORMER_METHODS, seeds):
      config = mmt_config.get_config(f"{method},{base.dataset}")
      for field in ("num_epochs", "optimizer.decay_epochs", "data.modalities"):
        *parents, leaf = field.split(".")
        source, target = base, config
        for parent in parents:
          source, target = source[parent], target[parent]
        with config.unlocked():
          target[leaf] = source[leaf]
      add("default", method, method, seed, configured(config, method, seed), False)
  elif part == "iterations":
    for seed in seeds:
      add("default", "crmt_2iter", "crmt", seed, two_iterations(configured(base, "crmt", seed)),
          True)
  elif part == "pairs":
    if pairs is None:
      pairs = [pair for pair in itertools.combinations(all_modalities(base.dataset), 2)
               if set(pair) != set(default_pair(base))]  # the main part's runs
    for pair in pairs:
      for method, seed in itertools.product(pair_methods, seeds):
        add("+".join(pair), method, method, seed,
            configured(base, method, seed, **{"data.modalities": pair}), True, ("pgd",))
  elif part == "imbalance":
    if preferred is None:
      raise ValueError("imbalance: expected the preferred modality (from the main part)")
    noisy = next(m for m in default_pair(base) if m != preferred)
    for level, method, seed in itertools.product(noise_levels, IMBALANCE_METHODS, seeds):
      add(f"noise{level:g}", method, method, seed,
          configured(base, method, seed, **{"data.noise": {noisy: level}}), False)
  else:
    raise ValueError(f"part: expected one of {list(PARTS)}, got {part!r}")
  # JT seed 0 (or the first seed) of each setting first: it calibrates that setting.
  first = seeds[0]
  return sorted(jobs, key=lambda j: (j.setting, not (j.label == "jt" and j.seed == first)))


def budget_key(job: Job) -> str:
  """The setting whose budgets `job` uses (see `calibration_for`)."""
  return job.setting if job.part == "pairs" else "default"


def calibration_for(job: Job, workdir: str, protocol: str, max_examples: int,
                    cache: dict[str, Any]) -> dict[str, Any]:
  """The budgets of `job`'s setting: calibrated on that setting's JT run (the
  transformer and the imbalance dial use the default pair's, so that their
  numbers compare with the main part's), cached in `<workdir>/budgets.json`."""
  key = budget_key(job)
  if key not in cache:
    jt = job.run_dir if job.label == "jt" and job.part in ("main", "pairs") else None
    if jt is None:
      raise ValueError(f"budgets for {key!r} are calibrated on its JT run, which must come "
                       f"first")
    cache[key] = calibrate(jt, protocol, max_examples)
    files.write_json_atomic(os.path.join(workdir, BUDGETS_FILE), cache)
  return cache[key]


def run_jobs(jobs: Sequence[Job], workdir: str, protocol: str, max_examples: int,
             progress: Callable[[Job], None] | None = None, *, cached_only: bool = False,
             missing: list[str] | None = None) -> list[dict[str, Any]]:
  """Trains and evaluates `jobs` in order; each setting's JT run is trained
  first and calibrates that setting's budgets. `cached_only`: nothing is
  trained or evaluated; a job without a cached evaluation (or whose setting
  has no budgets yet) is named in `missing` instead."""
  path = os.path.join(workdir, BUDGETS_FILE)
  cache: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  results = []
  for job in jobs:
    if cached_only:
      key = budget_key(job)
      result = key in cache and cached_result(job.run_dir, evaluation_settings(
          protocol, cache[key], max_examples, with_eta=job.with_eta, attacks=job.attacks))
      if result:
        results.append(dict(result, part=job.part, setting=job.setting))
      elif missing is not None:
        missing.append(f"{job.part} {job.setting} {job.label} seed {job.seed}")
      continue
    if job.label == "jt" and job.part in ("main", "pairs"):
      train_run(job.config, job.run_dir)  # the model that calibrates the budgets
    calibration = calibration_for(job, workdir, protocol, max_examples, cache)
    settings = evaluation_settings(protocol, calibration, max_examples,
                                   with_eta=job.with_eta, attacks=job.attacks)
    result = train_and_evaluate_run(job.config, job.run_dir, settings, label=job.label)
    results.append(dict(result, part=job.part, setting=job.setting))
    if progress is not None:
      progress(job)
  return results


def pgd_points(run: Mapping[str, Any], budgets: Mapping[str, claims_lib.Budgets]
               ) -> dict[str, float]:
  """`{"pgd/<scope>@<eps>": accuracy}` of a run's PGD curves at `budgets`."""
  out = {}
  for budget in budgets.values():
    for scope, eps in [(MULTI, budget.multi), *budget.uni.items()]:
      curve = run["curves"]["pgd"][scope]
      out[f"pgd/{scope}@{eps:g}"] = curve["accuracy"][
          [float(e) for e in curve["eps"]].index(float(eps))]
  return out


def protocol_check(run: Mapping[str, Any], run_dir: str,
                   budgets: Mapping[str, claims_lib.Budgets], max_examples: int
                   ) -> dict[str, list[float]]:
  """The PGD accuracies of `run` (evaluated with a cheaper protocol) at
  `budgets` against those of the `default` protocol (50 steps x 5 restarts,
  both losses) on the same model: `{"pgd/<scope>@<eps>": [cheap, default]}`
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
  suite = _suite({"protocol": "default", "max_examples": max_examples}, "test",
                 multi_eps=tuple(multi), uni_eps=(), uni_extra_eps=uni, attacks=("pgd",),
                 missing_fills=())
  _, model, variables, splits = restore.restore_run(run_dir)
  built = registry.build_evaluators({"robustness": suite}, model=model, splits=splits)
  default = pgd_points(built["robustness"].run(variables), budgets)
  cheap = pgd_points(run, budgets)
  points = {point: [cheap[point], default[point]] for point in default}
  files.write_json_atomic(cached, {"budgets": key, "points": points})
  return points


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `reproduce` runs (see `part_jobs` for the fields shared with it)."""

  seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
  parts: tuple[str, ...] = PARTS
  methods: tuple[str, ...] = MAIN_METHODS
  protocol: str = "quick"
  max_examples: int = 0
  pairs: tuple[tuple[str, str], ...] | None = None
  pair_methods: tuple[str, ...] = PAIR_METHODS
  noise_levels: tuple[float, ...] = NOISE_LEVELS
  cached_only: bool = False  # report what has finished; run nothing (see `run_jobs`)


def reproduce(base: ml_collections.ConfigDict, workdir: str, plan: Plan, *,
              progress: Callable[[Job], None] | None = None,
              on_part: Callable[[str, int], None] | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Runs `plan`'s parts in order (main first: it calibrates the default
  budgets and names JT's preferred modality), then the protocol check.

  Returns:
    (every run's results, the report's meta: budgets, protocol check, ...).
  """
  unknown = sorted(set(plan.parts) - set(PARTS))
  if unknown or "main" not in plan.parts:
    raise ValueError(f"parts: expected 'main' and others among {list(PARTS)}, got "
                     f"{list(plan.parts)}")
  if len(plan.seeds) < 2:
    raise ValueError(f"seeds: expected >= 2 seeds for paired intervals, got {list(plan.seeds)}")
  modalities = default_pair(base)
  results: list[dict[str, Any]] = []
  missing: list[str] = []
  preferred = None
  for part in plan.parts:
    if part == "pairs" and len(all_modalities(base.dataset)) < 3:
      continue
    jobs = part_jobs(part, base, workdir, plan.seeds, methods=plan.methods, preferred=preferred,
                     pairs=plan.pairs, pair_methods=plan.pair_methods,
                     noise_levels=plan.noise_levels)
    if on_part is not None:
      on_part(part, len(jobs))
    done = run_jobs(jobs, workdir, plan.protocol, plan.max_examples, progress,
                    cached_only=plan.cached_only, missing=missing)
    results += done
    if part == "main":
      if not done:
        raise ValueError(f"cached_only: expected finished runs of the main part in {workdir}, "
                         f"found none")
      preferred = claims_lib.preferred_modality(
          [r for r in done if r["method"] == "jt" and not r.get("diverged")], modalities)
  with open(os.path.join(workdir, BUDGETS_FILE)) as f:
    calibration = json.load(f)
  first = next(r for r in results if not r.get("diverged"))
  meta = {"dataset": base.dataset, "seeds": list(plan.seeds), "protocol": plan.protocol,
          "parts": list(plan.parts), "num_examples": first["num_examples"],
          "chance": 1.0 / first["num_classes"], "calibration": calibration,
          "noisy_modality": next(m for m in modalities if m != preferred), "missing": missing}
  if plan.protocol != "default":
    budgets = budgets_of(calibration["default"], modalities)
    points = {}
    for job_result in results:
      if (job_result["part"] == "main" and job_result["seed"] == plan.seeds[0]
          and job_result["method"] in ("jt", "crmt") and not job_result.get("diverged")):
        run_dir = os.path.join(workdir, "runs", "main", job_result["method"],
                               f"seed{plan.seeds[0]}")
        points[job_result["method"]] = protocol_check(job_result, run_dir, budgets,
                                                      plan.max_examples)
    if points:
      meta["protocol_check"] = claims_lib.protocol_agreement(points, plan.protocol)
      meta["protocol_check_points"] = points
  return results, meta


def device_description() -> str:
  """The first device's kind, and the core count on a CPU."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({os.cpu_count()} cores, jax {jax.__version__})"
  return f"{jax.device_count()} x {device.device_kind} (jax {jax.__version__})"
