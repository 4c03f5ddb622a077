"""The CRMT paper's experiments reproduced on one dataset (`experiments.reproduce`
is the command): seeded runs of every part, budgets calibrated where attacks
bite (`mmsafe.paper.budgets`), each run cached in its directory
(`mmsafe.paper.runs`); the report is `mmsafe.paper.report`.

Parts (`PARTS`), each with seeded runs under `<workdir>/runs/<part>/...`:

* "main": every Table 1 and ablation method on the dataset's default pair;
* "transformer": the multi-modal transformer, JT against CRMT step 1 (Table 3);
* "iterations": CRMT with two iterations of its two steps (App. 8.3);
* "pairs": JT, CRMT and the two strongest baselines on every other pair of
  the dataset's modalities (datasets with more than two; mfeat has 15 pairs);
* "imbalance": JT and CRMT with noise of growing strength dialled into one
  modality (`mmsafe.data.dataset.with_noise`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import itertools
import json
import os
from typing import Any

import jax
import ml_collections

from mmsafe import data as data_lib
from mmsafe import files
from mmsafe.data import mfeat
from mmsafe.paper import budgets as budgets_lib
from mmsafe.paper import evidence
from mmsafe.paper import runs as runs_lib
from mmsafe.paper.runs import Presets

TABLE1_METHODS = evidence.TABLE1_METHODS
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


def transformer_config(base: ml_collections.ConfigDict,
                       transformer: Mapping[str, ml_collections.ConfigDict] | None,
                       method: str, seed: int) -> ml_collections.ConfigDict:
  """`method`'s transformer config (Table 3) for `seed`, with `base`'s epochs,
  learning-rate decay and modalities, so that it compares with the main part's
  runs."""
  if not transformer or method not in transformer:
    raise ValueError(f"transformer: expected a config for each of {list(TRANSFORMER_METHODS)}, "
                     f"got {sorted(transformer or {})}")
  return runs_lib.configured(transformer[method], method, seed, **{
      field: runs_lib.field_value(base, field)
      for field in ("num_epochs", "optimizer.decay_epochs", "data.modalities")})


def part_jobs(part: str, base: ml_collections.ConfigDict, workdir: str, seeds: Sequence[int],
              *, methods: Sequence[str] = MAIN_METHODS, preferred: str | None = None,
              pairs: Sequence[tuple[str, str]] | None = None,
              pair_methods: Sequence[str] = PAIR_METHODS,
              noise_levels: Sequence[float] = NOISE_LEVELS,
              transformer: Mapping[str, ml_collections.ConfigDict] | None = None) -> list[Job]:
  """The runs of `part` (see the module docstring), the calibrating JT seed
  first within each setting. `methods`: those of the main part; `pairs`: the
  modality pairs of the pairs part (None: every pair but the default one);
  `preferred`: JT's preferred modality (the imbalance dial adds noise to the
  other one); `transformer`: the transformer part's config per method
  (`Presets.transformer`)."""
  root = os.path.join(workdir, "runs", part)
  jobs = []

  def add(setting, label, method, seed, config, with_eta, attacks=("fgm", "pgd")):
    run_dir = os.path.join(root, *([setting] if setting != "default" else []), label,
                           f"seed{seed}")
    jobs.append(Job(part, setting, label, seed, config, run_dir, with_eta, tuple(attacks)))

  if part == "main":
    # Seed by seed, so that a partial reproduction holds every method.
    for seed, method in itertools.product(seeds, methods):
      add("default", method, method, seed, runs_lib.configured(base, method, seed),
          method in ETA_METHODS)
  elif part == "transformer":
    for method, seed in itertools.product(TRANSFORMER_METHODS, seeds):
      add("default", method, method, seed, transformer_config(base, transformer, method, seed),
          False)
  elif part == "iterations":
    for seed in seeds:
      config = runs_lib.two_iterations(runs_lib.configured(base, "crmt", seed))
      add("default", "crmt_2iter", "crmt", seed, config, True)
  elif part == "pairs":
    if pairs is None:
      pairs = [pair for pair in itertools.combinations(all_modalities(base.dataset), 2)
               if set(pair) != set(default_pair(base))]  # the main part's runs
    for pair in pairs:
      for method, seed in itertools.product(pair_methods, seeds):
        add("+".join(pair), method, method, seed,
            runs_lib.configured(base, method, seed, **{"data.modalities": pair}), True, ("pgd",))
  elif part == "imbalance":
    if preferred is None:
      raise ValueError("imbalance: expected the preferred modality (from the main part)")
    noisy = next(m for m in default_pair(base) if m != preferred)
    for level, method, seed in itertools.product(noise_levels, IMBALANCE_METHODS, seeds):
      add(f"noise{level:g}", method, method, seed,
          runs_lib.configured(base, method, seed, **{"data.noise": {noisy: level}}), False)
  else:
    raise ValueError(f"part: expected one of {list(PARTS)}, got {part!r}")
  # JT seed 0 (or the first seed) of each setting first: it calibrates that setting.
  first = seeds[0]
  return sorted(jobs, key=lambda j: (j.setting, not (j.label == "jt" and j.seed == first)))


def budget_key(job: Job) -> str:
  """The setting whose budgets `job` uses (see `calibration_for`)."""
  return job.setting if job.part == "pairs" else "default"


def calibration_for(job: Job, workdir: str, preset: Mapping[str, Any], protocol: str,
                    max_examples: int, cache: dict[str, Any]) -> dict[str, Any]:
  """The budgets of `job`'s setting: calibrated (robustness suite `preset`)
  on that setting's JT run (the
  transformer and the imbalance dial use the default pair's, so that their
  numbers compare with the main part's), cached in `<workdir>/budgets.json`."""
  key = budget_key(job)
  if key not in cache:
    jt = job.run_dir if job.label == "jt" and job.part in ("main", "pairs") else None
    if jt is None:
      raise ValueError(f"budgets for {key!r} are calibrated on its JT run, which must come "
                       f"first")
    cache[key] = budgets_lib.calibrate(jt, preset, protocol, max_examples)
    files.write_json_atomic(os.path.join(workdir, budgets_lib.BUDGETS_FILE), cache)
  return cache[key]


def run_jobs(jobs: Sequence[Job], workdir: str, protocol: str, max_examples: int,
             presets: Presets, progress: Callable[[Job], None] | None = None, *,
             cached_only: bool = False, missing: list[str] | None = None
             ) -> list[dict[str, Any]]:
  """Trains and evaluates `jobs` in order, with the evaluators of `presets`;
  each setting's JT run is trained first and calibrates that setting's
  budgets. `cached_only`: nothing is trained or evaluated; a job without a
  cached evaluation (or whose setting has no budgets yet) is named in
  `missing` instead."""
  path = os.path.join(workdir, budgets_lib.BUDGETS_FILE)
  cache: dict[str, Any] = {}
  if os.path.exists(path):
    with open(path) as f:
      cache = json.load(f)
  results = []
  for job in jobs:
    if cached_only:
      key = budget_key(job)
      result = key in cache and runs_lib.cached_result(job.run_dir, runs_lib.evaluation_settings(
          protocol, cache[key], max_examples, with_eta=job.with_eta, attacks=job.attacks))
      if result:
        results.append(dict(result, part=job.part, setting=job.setting))
      elif missing is not None:
        missing.append(f"{job.part} {job.setting} {job.label} seed {job.seed}")
      continue
    if job.label == "jt" and job.part in ("main", "pairs"):
      runs_lib.train_run(job.config, job.run_dir)  # the model that calibrates the budgets
    calibration = calibration_for(job, workdir, presets.robustness, protocol, max_examples,
                                  cache)
    settings = runs_lib.evaluation_settings(protocol, calibration, max_examples,
                                   with_eta=job.with_eta, attacks=job.attacks)
    result = runs_lib.train_and_evaluate_run(job.config, job.run_dir, settings, presets,
                                             label=job.label)
    results.append(dict(result, part=job.part, setting=job.setting))
    if progress is not None:
      progress(job)
  return results


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


def reproduce(base: ml_collections.ConfigDict, workdir: str, plan: Plan, presets: Presets, *,
              progress: Callable[[Job], None] | None = None,
              on_part: Callable[[str, int], None] | None = None
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Runs `plan`'s parts in order (main first: it calibrates the default
  budgets and names JT's preferred modality), then the protocol check, with
  the evaluators and transformer configs of `presets`.

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
                     noise_levels=plan.noise_levels, transformer=presets.transformer)
    if on_part is not None:
      on_part(part, len(jobs))
    done = run_jobs(jobs, workdir, plan.protocol, plan.max_examples, presets, progress,
                    cached_only=plan.cached_only, missing=missing)
    results += done
    if part == "main":
      if not done:
        raise ValueError(f"cached_only: expected finished runs of the main part in {workdir}, "
                         f"found none")
      preferred = evidence.preferred_modality(
          [r for r in done if r["method"] == "jt" and not r.get("diverged")], modalities)
  with open(os.path.join(workdir, budgets_lib.BUDGETS_FILE)) as f:
    calibration = json.load(f)
  first = next(r for r in results if not r.get("diverged"))
  meta = {"dataset": base.dataset, "seeds": list(plan.seeds), "protocol": plan.protocol,
          "parts": list(plan.parts), "num_examples": first["num_examples"],
          "chance": 1.0 / first["num_classes"], "calibration": calibration,
          "noisy_modality": next(m for m in modalities if m != preferred), "missing": missing}
  if plan.protocol != "default":
    budgets = budgets_lib.budgets_of(calibration["default"], modalities)
    points = {}
    for job_result in results:
      if (job_result["part"] == "main" and job_result["seed"] == plan.seeds[0]
          and job_result["method"] in ("jt", "crmt") and not job_result.get("diverged")):
        run_dir = os.path.join(workdir, "runs", "main", job_result["method"],
                               f"seed{plan.seeds[0]}")
        points[job_result["method"]] = budgets_lib.protocol_check(
            job_result, run_dir, budgets, presets.robustness, plan.max_examples)
    if points:
      meta["protocol_check"] = evidence.protocol_agreement(points, plan.protocol)
      meta["protocol_check_points"] = points
  return results, meta


def device_description() -> str:
  """The first device's kind, and the core count on a CPU."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"CPU ({os.cpu_count()} cores, jax {jax.__version__})"
  return f"{jax.device_count()} x {device.device_kind} (jax {jax.__version__})"
