"""Evaluators built from a config: `config.evals.<name> = dict(type=..., ...)`.

Each evaluator measures one thing on one split and has `name`, `every_steps`
(0: never inside training, only offline) and `run(variables) -> metrics`. The
training loop runs them every `every_steps` steps and logs `scalar_metrics`;
`experiments.evaluate` runs them on a restored checkpoint and writes their
reports (`mmsafe.eval.report.write_evaluation`). An evaluator compiles once
(on its first `run`): the variables, eps and budgets are traced arguments.

A type's keys are its constructor's keyword arguments (`config_keys`): those
every type takes (`base.Evaluator`: `split`, `every_steps`, `max_examples`,
`batch_size`, `seed`, `defence`) and its own, documented in its module:

  clean       clean accuracy (`mmsafe.eval.clean`).
  fgm, pgd    robust accuracy against l2 FGM / l2-PGD (`mmsafe.eval.attack`,
              `fgm`, `pgd`; pgd also `skip_certified`).
  missing     accuracy with each modality missing (`mmsafe.eval.missing`).
  decoupling  the l0 decoupling attack's success rate (`mmsafe.eval.decoupling`).
  robustness  the suite: the above merged into the robustness report's input
              (`mmsafe.eval.suite`).
  certify     certified radii per Lipschitz kind, checked by attacks
              (`mmsafe.eval.certify`).
  sweep       the PGD steps x restarts sweep (`mmsafe.eval.sweep`).

`defence` ("none", or a method that declares a test-time defence,
`methods.Defence`, when the run's config trained that method): "msefm"
evaluates an MSEFM model behind its test-time defence, ExFMem
(`mmsafe.methods.msefm`), attacks included (white box). Certificates are of
the undefended model, so `certify` takes only "none".
"""
from __future__ import annotations

from collections.abc import Mapping
import inspect
from typing import Any

import numpy as np

from mmsafe.eval.base import Evaluator
from mmsafe.eval.certify import Certify
from mmsafe.eval.clean import Clean
from mmsafe.eval.decoupling import Decoupling
from mmsafe.eval.fgm import FGM
from mmsafe.eval.missing import Missing
from mmsafe.eval.pgd import PGD
from mmsafe.eval.suite import Robustness
from mmsafe.eval.sweep import Sweep

EVALUATOR_TYPES: dict[str, type[Evaluator]] = {
    cls.type: cls for cls in (Clean, FGM, PGD, Missing, Decoupling, Robustness, Certify, Sweep)}
# What `build_evaluators` passes itself, not config keys.
_BUILD_ARGS = ("name", "model", "splits", "run_config")


def config_keys(cls: type[Evaluator]) -> dict[str, Any]:
  """The config keys of evaluator type `cls` and their defaults: the keyword-only
  parameters of its constructors up its class hierarchy, besides `_BUILD_ARGS`."""
  keys = {}
  for klass in reversed(cls.__mro__):
    if "__init__" in vars(klass) and issubclass(klass, Evaluator):
      for p in inspect.signature(klass.__init__).parameters.values():
        if p.kind is p.KEYWORD_ONLY and p.name not in _BUILD_ARGS:
          keys[p.name] = p.default
  return keys


def build(name: str, config: Mapping[str, Any], *, model, splits: Mapping[str, Any],
          seed: int = 0, run_config: Mapping[str, Any] | None = None) -> Evaluator:
  """The evaluator `name` of `config` (its `type` and keys; `seed` unless given)."""
  kind = config.get("type")
  if kind not in EVALUATOR_TYPES:
    raise ValueError(f"type: expected one of {sorted(EVALUATOR_TYPES)}, got {kind!r}")
  cls = EVALUATOR_TYPES[kind]
  keys = config_keys(cls)
  unknown = sorted(set(config) - {"type"} - set(keys))
  if unknown:
    raise ValueError(f"{unknown[0]}: unknown key for type {kind!r}; expected one of "
                     f"{sorted({'type', *keys})}, got {unknown}")
  settings = {"seed": seed, **{k: v for k, v in config.items() if k != "type"}}
  return cls(name=name, model=model, splits=splits, run_config=run_config, **settings)


def build_evaluators(evals: Mapping[str, Mapping[str, Any]] | None, *, model,
                     splits: Mapping[str, Any], seed: int = 0,
                     run_config: Mapping[str, Any] | None = None) -> dict[str, Evaluator]:
  """The evaluators of `evals` (name -> settings with a `type`; None: none), all
  validated before any runs. `run_config`: the training run's config (its
  `method` and `method_kwargs`), needed by a `defence` other than "none".

  Raises:
    ValueError naming `evals.<name>.<key>`, the expected and the actual value.
  """
  evaluators = {}
  for name, config in (evals or {}).items():
    if not isinstance(config, Mapping):
      raise ValueError(f"evals.{name}: expected a dict with a 'type', got {config!r}")
    try:
      evaluators[name] = build(name, config, model=model, splits=splits, seed=seed,
                               run_config=run_config)
    except ValueError as e:
      raise ValueError(f"evals.{name}.{e}") from e
  return evaluators


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """The int / float entries of `metrics`, nested keys joined with "/" (lists,
  strings, booleans and None dropped): what the training loop logs."""
  out = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(scalar_metrics(value, f"{name}/"))
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)):
      out[name] = float(value)
  return out
