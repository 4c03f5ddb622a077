"""Evaluators built from a config: `config.evals.<name> = dict(type=..., ...)`.

Each evaluator measures one thing on one split and has `name`, `every_steps`
(0: never inside training, only offline) and `run(variables) -> metrics`. The
training loop runs them every `every_steps` steps and logs `scalar_metrics`;
`experiments.evaluate` runs them on a restored checkpoint and writes their
reports (`mmsafe.eval.report.write_evaluation`). An evaluator compiles once
(on its first `run`): the variables, eps and budgets are traced arguments.

Keys every type takes: `type`, `split` ("validation"), `every_steps` (0),
`max_examples` (0: the whole split), `batch_size` (256; certify: 100), `seed`
(the `build_evaluators` seed) and `defence` ("none", or the name of a method
that declares a test-time defence, `methods.Defence`, when the run's config
trained that method): "msefm" evaluates an MSEFM model behind its test-time
defence, ExFMem (`mmsafe.methods.msefm`): the fused logits come from the
features reconstructed from a memory of `method_kwargs.msefm_memory_size`
clean training features of the evaluated model, drawn with `seed`; clean
accuracy and every attack (white box, gradients through the reconstruction)
are measured on that defended classifier. Certificates are of the undefended
model, so `certify` takes only "none". The types and their own keys:

  clean       clean accuracy.
  fgm, pgd    robust accuracy against l2 FGM / l2-PGD (`robustness`): `scope`
              ("multi": all modalities jointly; "uni": each modality alone; a
              modality name; or a list of these), `eps` (multi-modal grid),
              `uni_eps` (uni-modal grid), `protocol` (PGD preset; its budgets,
              CRMT's 0.5 / 1.0, are added to the grids), `box` (clip to the
              raw value range); pgd also `skip_certified` (True: the model's
              sound certified radii are computed first, and PGD does not
              attack an example at an eps its radius exceeds: it cannot be
              broken there, so the numbers are the same, up to the sound
              bounds' own failure probability for large convolutions, 1e-6;
              off behind a defence and for a model that states no Lipschitz
              bound).
  missing     accuracy with each modality missing: `fills`, `fill_examples`
              (training examples averaged for the "mean" fill, 0: all).
  decoupling  the l0 decoupling attack's success rate: `fractions`, `scopes`,
              `rounds`, `steps_per_round`, `max_change`, `step_size`, `loss`,
              `random_start`, `box`.
  robustness  the whole suite of `evaluate_robustness` (its metrics are the
              report's input): the `SuiteConfig` fields, `box`, `fill_examples`,
              `skip_certified` (as for pgd).
  certify     certified radii per Lipschitz kind, checked by attacks
              (`certification.Certification`): `kinds`, `empirical_split`,
              `mode`, `chunk_size`, `power_iterations`, `failure_probability`,
              `attack_steps`, `attack_restarts`, `num_thresholds`, `units`
              ("input": radii in the units a user perturbs; "normalised").
  sweep       the PGD steps x restarts sweep (`robustness.StrengthSweep`) at the
              protocol's budgets times `scales`: `protocol`, `scales`, `steps`,
              `restarts`, `loss`, `random_start`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import numpy as np

from mmsafe import certify as certify_lib
from mmsafe import checks
from mmsafe import data as data_lib
from mmsafe import methods
from mmsafe import models
from mmsafe.attacks.pgd import get_protocol
from mmsafe.eval import certification
from mmsafe.eval import robustness
from mmsafe.eval.robustness import MULTI

Progress = Callable[[int], None] | None
COMMON = {"type": None, "split": "validation", "every_steps": 0, "max_examples": 0,
          "batch_size": 256, "seed": None, "defence": "none"}


def _sequence(value: Any, field: str, kind: type, what: str) -> tuple:
  """`value` (one item or a list of them) as a tuple of `kind` items."""
  values = (value,) if isinstance(value, (str, int, float)) else value
  try:
    return tuple(v if kind is str else kind(v) for v in values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}: expected {what} or a list of them, got {value!r}") from e


def _floats(value: Any, field: str) -> tuple[float, ...]:
  return _sequence(value, field, float, "a number")


def _bounded_floats(value: Any, field: str, low: float, high: float = math.inf, *,
                    low_inclusive: bool = True) -> tuple[float, ...]:
  """`value` (one number or a list of them) as floats, each finite, >= `low` (>
  when not `low_inclusive`) and <= `high` (`checks.check_number`)."""
  return tuple(checks.check_number(v, field, low, low_inclusive, maximum=high,
                                   what="finite values") for v in _floats(value, field))


def _check_flag(settings: Mapping[str, Any], field: str) -> None:
  """ValueError unless `settings[field]` is a bool."""
  if not isinstance(settings[field], (bool, np.bool_)):
    raise ValueError(f"{field}: expected True or False, got {settings[field]!r}")


def _strings(value: Any, field: str) -> tuple[str, ...]:
  names = _sequence(value, field, str, "a name")
  if not all(isinstance(v, str) for v in names):
    raise ValueError(f"{field}: expected a name or a list of names, got {value!r}")
  return names


def _count(value: Any, field: str, minimum: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{field}: expected an integer >= {minimum}, got {value!r}")
  return int(value)


class TestTimeDefence:
  """The test-time defence of method `name` (`methods.Method.defence`) around a
  model trained with it: `apply_fn` takes `prepare(variables)`."""

  def __init__(self, name: str, model, run_config: Mapping[str, Any] | None,
               splits: Mapping[str, Any], *, seed: int, batch_size: int):
    method = (run_config or {}).get("method")
    if method != name:
      raise ValueError(f"defence: {name!r} applies to a model trained with method {name!r}, "
                       f"got method {method!r}")
    if "train" not in splits:
      raise ValueError(f"defence: {name!r} builds its state from a 'train' split, got splits "
                       f"{sorted(splits)}")
    self.defence = methods.get(name).defence
    self.settings = self.defence.settings(run_config.get("method_kwargs") or {})
    self.model, self.splits, self.seed, self.batch_size = model, splits, seed, batch_size

  def apply_fn(self, defended: Mapping[str, Any], inputs: Mapping[str, Any]) -> jax.Array:
    """Fused logits of the defended classifier."""
    return self.defence.logits(self.model, self.settings, defended, inputs)

  @functools.cached_property
  def train_inputs(self) -> Mapping[str, np.ndarray]:
    """The training split's inputs, loaded on first use."""
    return data_lib.in_memory(self.splits["train"], 0).inputs

  def prepare(self, variables: Any) -> Any:
    """What `apply_fn` reads, built from the evaluated variables."""
    return self.defence.prepare(self.model, variables, self.train_inputs, self.settings,
                                seed=self.seed, batch_size=self.batch_size)


def defences() -> tuple[str, ...]:
  """The `defence` values: "none" and every method that declares a test-time defence."""
  return ("none", *(name for name in methods.names() if methods.get(name).defence))


class Evaluator:
  """One measurement on one split; subclasses set `type`, `options` (their own
  keys and defaults) and implement `setup` (validate, build) and `measure`.

  Attributes:
    name: the key in `config.evals`.
    every_steps: run every this many training steps (0: only offline).
    split: the split evaluated.
    settings: the full settings (common keys, options and the config's values).
  """

  type: ClassVar[str] = ""
  options: ClassVar[Mapping[str, Any]] = {}
  default_batch_size: ClassVar[int] = 256

  def __init__(self, name: str, config: Mapping[str, Any], *, model,
               splits: Mapping[str, Any], seed: int = 0,
               run_config: Mapping[str, Any] | None = None):
    unknown = sorted(set(config) - set(COMMON) - set(self.options))
    if unknown:
      raise ValueError(f"{unknown[0]}: unknown key for type {self.type!r}; expected one of "
                       f"{sorted(set(COMMON) | set(self.options))}, got {unknown}")
    self.settings = {**COMMON, "batch_size": self.default_batch_size, "seed": seed,
                     **self.options, **config, "type": self.type}
    self.name = name
    self.every_steps = _count(self.settings["every_steps"], "every_steps")
    self.max_examples = _count(self.settings["max_examples"], "max_examples")
    self.batch_size = _count(self.settings["batch_size"], "batch_size", 1)
    self.seed = _count(self.settings["seed"], "seed")
    self.model, self.splits = model, splits
    self.split = self._split("split")
    defence = self.settings["defence"]
    if defence not in defences():
      raise ValueError(f"defence: expected one of {list(defences())}, got {defence!r}")
    self.defence = (None if defence == "none" else TestTimeDefence(
        defence, model, run_config, splits, seed=self.seed, batch_size=self.batch_size))
    self.apply_fn = self.defence.apply_fn if self.defence else robustness.logits_apply(model)
    self.input_shapes = dict(splits[self.split].modality_shapes)
    self.setup()

  def _split(self, key: str) -> str:
    split = self.settings[key]
    if split not in self.splits:
      raise ValueError(f"{key}: expected one of {sorted(self.splits)}, got {split!r}")
    return split

  def setup(self) -> None:
    """Validates the type's settings and builds its (lazily compiled) parts."""

  @functools.cached_property
  def data(self) -> data_lib.Dataset:
    """The evaluated split in memory (its first `max_examples`), loaded on first use."""
    return data_lib.in_memory(self.splits[self.split], self.max_examples)

  def bounds(self) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Box constraints (normalised space) of the bounded modalities when `box`."""
    if not self.settings.get("box"):
      return None
    return {m: self.data.normalized_range(m) for m in self.data.value_range
            if m in self.data.inputs}

  def run(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    """The metrics of `variables` (a dict of numbers, lists and dicts), of the
    defended classifier when there is a `defence`."""
    return self.measure(self.defence.prepare(variables) if self.defence else variables, progress)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    """The metrics of what `self.apply_fn` computes with `variables`."""
    raise NotImplementedError

  def sound_radii(self, variables: Any) -> dict[str, np.ndarray] | None:
    """Scope -> [N] sound certified radii of the evaluated split ("multi": Thm
    3.3 / 3.5; each modality alone: Prop. 3.4), for PGD to skip what it cannot
    break; None without `skip_certified`, behind a defence (the certificates
    are of the undefended model), for a model that does not compute in float32
    (they are of its float32 evaluation, not of the function attacked) or for
    a model that states no Lipschitz bound."""
    if (not self.settings.get("skip_certified", False) or self.defence
        or models.as_float32(self.model) is not self.model):
      return None
    try:
      constants = certify_lib.sound_constants(self.model, variables)
    except NotImplementedError:
      return None
    certifier = certification.make_certifier(self.model, mode="auto", chunk_size=None)
    cert, _ = certification.certify_dataset(
        certifier, variables, self.data.inputs, self.data.labels, "sound", constants=constants,
        batch_size=self.batch_size, description="sound radii")
    return {MULTI: np.asarray(cert.radius),
            **{m: np.asarray(r) for m, r in cert.per_modality.items()}}


class Clean(Evaluator):
  """Clean accuracy."""

  type = "clean"

  def setup(self) -> None:
    self._clean = robustness.CleanAccuracy(self.apply_fn, batch_size=self.batch_size,
                                           seed=self.seed)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    correct = self._clean(variables, self.data.inputs, self.data.labels, progress)
    return {"num_examples": int(correct.size), "clean_accuracy": float(correct.mean())}


class Attack(Clean):
  """Robust accuracy against l2 FGM or l2-PGD over eps grids (see `robustness`)."""

  options = {"scope": MULTI, "eps": (0.125, 0.25, 0.5, 1.0), "uni_eps": (0.25, 0.5, 1.0, 2.0),
             "protocol": "default", "box": False}

  def setup(self) -> None:
    super().setup()
    protocol = get_protocol(self.settings["protocol"])
    modalities = sorted(self.input_shapes)
    scopes: list[str] = []
    for scope in _strings(self.settings["scope"], "scope"):
      expanded = modalities if scope == "uni" else [scope]
      scopes += [s for s in expanded if s not in scopes]
    grids = {}
    for scope in scopes:
      if scope != MULTI and scope not in modalities:
        raise ValueError(f"scope: expected {MULTI!r}, 'uni' or one of {modalities}, "
                         f"got {scope!r}")
      key, budget = ("eps", protocol.multi_eps) if scope == MULTI else ("uni_eps",
                                                                        protocol.uni_eps)
      grids[scope] = robustness.eps_grid(_floats(self.settings[key], key), budget, key)
    self._curves = robustness.ATTACK_CURVES[self.type](
        self.apply_fn, grids, protocol=protocol, batch_size=self.batch_size, seed=self.seed)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    inputs, labels = self.data.inputs, self.data.labels
    self._curves.bounds = self.bounds()
    correct = self._clean(variables, inputs, labels, progress)
    curves = self._curves(variables, inputs, labels, correct, progress,
                          certified=self.sound_radii(variables))["curves"][self.type]
    return {"num_examples": int(correct.size), "clean_accuracy": float(correct.mean()),
            "accuracy": {f"{scope}@{eps:g}": acc for scope, curve in curves.items()
                         for eps, acc in zip(curve["eps"], curve["accuracy"])},
            "curves": curves}


class FGM(Attack):
  """Robust accuracy against l2 FGM (cross-entropy)."""

  type = "fgm"


class PGD(Attack):
  """Robust accuracy against l2-PGD (worst case over the eps grid)."""

  type = "pgd"
  options = {**Attack.options, "skip_certified": True}

  def setup(self) -> None:
    _check_flag(self.settings, "skip_certified")
    super().setup()


def _means_for(evaluator: Evaluator, fills: Sequence[str]) -> dict[str, np.ndarray]:
  """Training-split means for the "mean" / "noise" fills (empty when neither is used)."""
  if not {"mean", "noise"} & set(fills):
    return {}
  return data_lib.modality_means(evaluator.splits["train"], evaluator.settings["fill_examples"])


class Missing(Evaluator):
  """Accuracy with each modality missing, per fill."""

  type = "missing"
  options = {"fills": ("zeros",), "fill_examples": 0}

  def setup(self) -> None:
    _count(self.settings["fill_examples"], "fill_examples")
    fills = _strings(self.settings["fills"], "fills")
    if {"mean", "noise"} & set(fills) and "train" not in self.splits:
      raise ValueError(f"fills: the 'mean' and 'noise' fills need a 'train' split, got splits "
                       f"{sorted(self.splits)}")
    self._missing = robustness.MissingModality(self.apply_fn, sorted(self.input_shapes), fills,
                                               batch_size=self.batch_size, seed=self.seed)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    if not self._missing.fill_means:
      self._missing.fill_means = _means_for(self, self._missing.fills)
    section = self._missing(variables, self.data.inputs, self.data.labels, None, progress)
    return {"num_examples": len(self.data), "accuracy": section["missing"]}


class Decoupling(Clean):
  """Success rate of the l0 decoupling attack (MUROAN) against its budget."""

  type = "decoupling"
  options = {"fractions": (0.0025, 0.005, 0.0116, 0.025, 0.05), "scopes": (MULTI,),
             "rounds": 8, "steps_per_round": 10, "max_change": 2.0, "step_size": None,
             "loss": "margin", "random_start": False, "box": False}

  def setup(self) -> None:
    super().setup()
    attack = {k: self.settings[k] for k in ("rounds", "steps_per_round", "max_change",
                                            "step_size", "loss", "random_start")}
    _bounded_floats(attack["max_change"], "max_change", 0.0, low_inclusive=False)
    if attack["step_size"] is not None:
      _bounded_floats(attack["step_size"], "step_size", 0.0, low_inclusive=False)
    self._curves = robustness.DecouplingCurves(
        self.apply_fn, self.input_shapes, _bounded_floats(self.settings["fractions"],
                                                          "fractions", 0.0, 1.0),
        _strings(self.settings["scopes"], "scopes"), options=attack,
        batch_size=self.batch_size, seed=self.seed)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    inputs, labels = self.data.inputs, self.data.labels
    self._curves.bounds = self.bounds()
    correct = self._clean(variables, inputs, labels, progress)
    curves = self._curves(variables, inputs, labels, correct, progress)["decoupling"]
    return {"num_examples": int(correct.size), "clean_accuracy": float(correct.mean()),
            "asr": {f"{scope}@{fraction:g}": asr for scope, curve in curves.items()
                    for fraction, asr in zip(curve["fraction"], curve["asr"])},
            "curves": curves}


_SUITE_FIELDS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                 for f in dataclasses.fields(robustness.SuiteConfig)
                 if f.name not in ("batch_size", "seed")}


class Robustness(Evaluator):
  """The whole robustness suite (`evaluate_robustness`'s results: the report's input)."""

  type = "robustness"
  options = {**_SUITE_FIELDS, "box": False, "fill_examples": 0, "skip_certified": True}

  def setup(self) -> None:
    _count(self.settings["fill_examples"], "fill_examples")
    _check_flag(self.settings, "skip_certified")
    fields = {k: self.settings[k] for k in _SUITE_FIELDS}
    for key in ("multi_eps", "uni_eps"):
      fields[key] = _bounded_floats(fields[key], key, 0.0)
    fields["decoupling_fractions"] = _bounded_floats(fields["decoupling_fractions"],
                                                     "decoupling_fractions", 0.0, 1.0)
    for key in ("attacks", "missing_fills", "decoupling_scopes"):
      fields[key] = _strings(fields[key], key)
    if fields["uni_modalities"] is not None:
      fields["uni_modalities"] = _strings(fields["uni_modalities"], "uni_modalities")
    fields["decoupling"] = dict(fields["decoupling"] or {})
    self.suite_config = robustness.SuiteConfig(**fields, batch_size=self.batch_size,
                                               seed=self.seed)
    self._parts = robustness.suite(self.apply_fn, self.suite_config, self.input_shapes)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    bounds = self.bounds()
    for part in self._parts:
      if isinstance(part, robustness.MissingModality) and not part.fill_means:
        part.fill_means = _means_for(self, part.fills)
      part.bounds = bounds
    return robustness.run_suite(self._parts, self.suite_config, variables, self.data.inputs,
                                self.data.labels, bounds=bounds,
                                certified=self.sound_radii(variables), progress=progress)


def _reporting(progress: Progress) -> certification.Track:
  """A `Certification` track that reports each batch of its loops to `progress`."""
  def track(iterable, total, description):
    del total, description
    for item in iterable:
      yield item
      if progress is not None:
        progress(1)
  return track


class Certify(Evaluator):
  """Certified radii per Lipschitz kind, checked by attacks. The last run's
  certificates are kept as `certificates` ({kind: Certificate})."""

  type = "certify"
  default_batch_size = 100
  options = {"kinds": tuple(certify_lib.KINDS), "empirical_split": "train", "mode": "auto",
             "chunk_size": 0, "power_iterations": 300, "failure_probability": 1e-6,
             "attack_steps": 100, "attack_restarts": 5, "num_thresholds": 101,
             "units": "input"}

  def setup(self) -> None:
    if self.defence:
      raise ValueError(f"defence: the certificates are of the undefended model; expected "
                       f"'none', got {self.settings['defence']!r}")
    kinds = _strings(self.settings["kinds"], "kinds")
    self.empirical_split = self._split("empirical_split") if "empirical" in kinds else None
    self._certification = certification.Certification(
        self.model, kinds=kinds, batch_size=self.batch_size, mode=self.settings["mode"],
        chunk_size=_count(self.settings["chunk_size"], "chunk_size") or None,
        power_iterations=_count(self.settings["power_iterations"], "power_iterations", 1),
        failure_probability=_bounded_floats(self.settings["failure_probability"],
                                            "failure_probability", 0.0, 1.0,
                                            low_inclusive=False)[0],
        attack_steps=_count(self.settings["attack_steps"], "attack_steps"),
        attack_restarts=_count(self.settings["attack_restarts"], "attack_restarts", 1),
        num_thresholds=_count(self.settings["num_thresholds"], "num_thresholds", 2),
        seed=self.seed, units=self.settings["units"])
    self.certificates: dict[str, certify_lib.Certificate] = {}

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    self._certification.track = _reporting(progress)
    empirical = self.splits[self.empirical_split] if self.empirical_split else None
    results, self.certificates, _ = self._certification(
        variables, self.data, empirical, split=self.split,
        empirical_split=self.empirical_split or "")
    return results


class Sweep(Evaluator):
  """Robust accuracy of l2-PGD over a steps x restarts grid, at the protocol's
  budgets times `scales`, multi-modal and for each modality alone."""

  type = "sweep"
  options = {"protocol": "default", "scales": (1.0, 4.0), "steps": (4, 10, 20, 50, 100),
             "restarts": (1, 3, 5), "loss": "ce", "random_start": False}

  def setup(self) -> None:
    protocol = get_protocol(self.settings["protocol"])
    scales = _bounded_floats(self.settings["scales"], "scales", 0.0, low_inclusive=False)
    budgets = [(MULTI, protocol.multi_eps * s) for s in scales]
    budgets += [(m, protocol.uni_eps * s) for m in sorted(self.input_shapes) for s in scales]
    self._sweep = robustness.StrengthSweep(
        self.apply_fn, budgets, modalities=sorted(self.input_shapes),
        steps=_sequence(self.settings["steps"], "steps", int, "an integer"),
        restarts=_sequence(self.settings["restarts"], "restarts", int, "an integer"),
        loss=self.settings["loss"], random_start=bool(self.settings["random_start"]),
        batch_size=self.batch_size, seed=self.seed)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    return self._sweep(variables, self.data.inputs, self.data.labels, progress)


EVALUATOR_TYPES: dict[str, type[Evaluator]] = {
    cls.type: cls for cls in (Clean, FGM, PGD, Missing, Decoupling, Robustness, Certify, Sweep)}


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
    kind = config.get("type")
    if kind not in EVALUATOR_TYPES:
      raise ValueError(f"evals.{name}.type: expected one of {sorted(EVALUATOR_TYPES)}, "
                       f"got {kind!r}")
    try:
      evaluators[name] = EVALUATOR_TYPES[kind](name, config, model=model, splits=splits,
                                               seed=seed, run_config=run_config)
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
