"""Certification of a whole dataset split, checked by attacks (pure: plain dicts).

`Certification` certifies every example of a split with each Lipschitz kind
("local", "empirical", "sound"; `mmsafe.certify`), summarises the
certified-accuracy curves, uni-modal (Prop. 3.4) curves and the eta ratio
heat map (CRMT Fig. 3), and checks the radii with an attack
(`mmsafe.eval.radius_attack`): for every
correctly classified sample with a positive radius r(x), an l2-PGD attack
(margin loss, `attack_steps` steps of 2.5 r/steps, `attack_restarts` random
restarts, worst iterate kept) searches the ball of radius `(1 - 1e-4) r(x)`.
A success inside a `sound` radius would be a bug; for `local`/`empirical`
(estimates) the result gives how often the radius is broken. Each batch is
certified by one compiled program, compiled once per model, kind and shapes
(`mmsafe.certify.programs`: shared by every instance); the attack compiles
once per instance; `run_certification` runs one once.

What is certified, and attacked, is the model evaluated in float32
(`mmsafe.models.as_float32`: a bfloat16 model's parameters in float32). Radii
are l2 norms in the input units a user perturbs (`units="input"`, the default:
raw features, pixel/255 for clip frames; `mmsafe.certify.units`, with the
dataset's `stats`), and the attack check then perturbs inputs in those units
and standardises them before the model; `units="normalised"` keeps radii and
attacks in the model's standardised input space. The results' "units" say which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import certify as certify_lib
from mmsafe import data as data_lib
from mmsafe import models
from mmsafe import programs
from mmsafe.certify import units as units_lib
from mmsafe.eval.radius_attack import INSIDE, make_radius_attack

Track = Callable[[Iterable, int, str], Iterable]

# What the results say about the function they certify.
CERTIFIED_FUNCTION = "the model's parameters evaluated in float32"


def _batches(inputs, labels, batch_size):
  return data_lib.eval_batches(inputs, labels, batch_size=min(batch_size, len(labels)))


def make_certifier(model, *, mode: str, chunk_size: int | None):
  """`certify_batch(variables, inputs, labels, kind, constants=None, input_scale=None)
  -> (Certificate, LipschitzConstants)`: `mmsafe.certify.certify` as one program,
  compiled once per (model, kind, options) and shapes (`mmsafe.certify.programs`);
  without `constants` (kind "local") the local constants are computed in it and
  returned with the certificate; `input_scale`: radii in input units."""

  def certify_batch(variables, inputs, labels, kind, constants=None, input_scale=None):
    return programs.compiled(_certify_batch, model, kind, mode, chunk_size)(
        variables, inputs, labels, constants, input_scale)

  return certify_batch


def _certify_batch(model, kind: str, mode: str, chunk_size: int | None, variables, inputs,
                   labels, constants, input_scale):
  """The computation of `make_certifier`'s `certify_batch` (traced)."""
  if constants is None:
    constants = certify_lib.local_constants(model, variables, inputs, mode=mode,
                                            chunk_size=chunk_size)
  cert = certify_lib.certify(model, variables, inputs, labels, kind, constants=constants,
                             mode=mode, chunk_size=chunk_size, input_scale=input_scale)
  return cert, constants


def _no_progress(iterable: Iterable, total: int, description: str) -> Iterable:
  del total, description
  return iterable


def certify_dataset(certify_batch, variables, inputs, labels, kind: str, *, constants=None,
                    batch_size: int, description: str, track: Track = _no_progress,
                    input_scale=None
                    ) -> tuple[certify_lib.Certificate, certify_lib.LipschitzConstants]:
  """Certificate of every example (batched with `certify_batch` of `make_certifier`,
  padded batches trimmed on the host) and the Lipschitz constants of the first
  batch (`constants` when given); `input_scale`: radii in input units."""
  parts, valid = [], []
  total = math.ceil(len(labels) / min(batch_size, len(labels)))
  for batch in track(_batches(inputs, labels, batch_size), total, description):
    parts.append(certify_batch(variables, batch["inputs"], jnp.asarray(batch["label"]), kind,
                               constants, input_scale))
    valid.append(np.asarray(batch["valid"]))
  valid = np.concatenate(valid)
  certificates = jax.device_get([cert for cert, _ in parts])
  joined = jax.tree_util.tree_map(lambda *xs: jnp.asarray(np.concatenate(xs)[valid]),
                                  *certificates)
  return joined, parts[0][1]


def _json_matrix(matrix) -> list:
  return [[None if not np.isfinite(v) else float(v) for v in row] for row in np.asarray(matrix)]


def _constants_summary(constants) -> dict[str, Any]:
  out = {"kind": constants.kind, "target": constants.target}
  for m, value in sorted(constants.values.items()):
    v = np.asarray(value)
    off = v[v > 0] if v.size else v
    out[m] = {"max": float(v.max()), "mean_positive": float(off.mean()) if off.size else 0.0}
  if constants.encoder:
    out["encoder_lipschitz"] = {m: float(b) for m, b in sorted(constants.encoder.items())}
  return out


def _eta_pair(modalities):
  if "visual" in modalities and "audio" in modalities:
    return "visual", "audio"
  return modalities[0], modalities[1]


class Certification:
  """Certifies a split with each Lipschitz kind and attacks the radii (see the
  module docstring). The certification programs compile once per model (and
  shapes) and the attack once per instance, so it reruns on new variables
  (e.g. inside training) without recompiling.

  Args:
    model: a `mmsafe.models` model.
    kinds: subset of `mmsafe.certify.KINDS`.
    batch_size: examples per certification / attack batch.
    mode, chunk_size: Jacobian mode and chunking (`mmsafe.certify.certify`).
    power_iterations, failure_probability: the sound constants' power iteration.
    attack_steps, attack_restarts: the attack check (0 steps: none).
    num_thresholds: radii in the certified-accuracy curves.
    units: "input" (radii and attacks in the input units a user perturbs,
      from the dataset's `stats`) or "normalised" (`mmsafe.certify.units`).
    seed: seed of the attacks and power iterations.
    track: `track(iterable, total, description)` wraps each long loop (e.g. a
      progress bar; the identity by default).
  """

  def __init__(self, model, *, kinds: Sequence[str], batch_size: int = 100, mode: str = "auto",
               chunk_size: int | None = None, power_iterations: int = 300,
               failure_probability: float = 1e-6, attack_steps: int = 100,
               attack_restarts: int = 5, num_thresholds: int = 101, seed: int = 0,
               track: Track = _no_progress, units: str = units_lib.INPUT):
    for kind in kinds:
      if kind not in certify_lib.KINDS:
        raise ValueError(f"kinds: expected a subset of {certify_lib.KINDS}, got {kind!r}")
    model = models.as_float32(model)  # What `certify` certifies, so what is attacked.
    self.model, self.kinds, self.batch_size = model, tuple(kinds), int(batch_size)
    self.mode, self.chunk_size = mode, chunk_size
    self.attack_steps, self.attack_restarts = int(attack_steps), int(attack_restarts)
    self.num_thresholds, self.track = num_thresholds, track
    self.units = units_lib.check_units(units)
    self._key = jax.random.PRNGKey(seed)
    self._head_kind = None
    self._certify_batch = make_certifier(model, mode=mode, chunk_size=chunk_size)
    self._sound_options = {"iterations": power_iterations,
                           "failure_probability": failure_probability}
    self._attack_batches = {}  # modality (None: joint) -> its jitted radius attack

  def __call__(self, variables, dataset: data_lib.Dataset, empirical_source=None, *,
               split: str = "test", empirical_split: str = "train", attack: bool = True):
    """Certifies every example of the in-memory `dataset` (split `split`);
    `empirical_source` is the dataset the empirical constants are the maximum over;
    `attack`: run the attack check (`attack_check` can also be called alone).

    Returns:
      (results dict for JSON, {kind: Certificate}, labels [N]).
    """
    inputs, labels = dict(dataset.inputs), np.asarray(dataset.labels)
    if self._head_kind is None:  # the head's kind does not change with the variables
      self._head_kind = certify_lib.head_params(self.model, variables).kind
    input_scale = self.input_scale(dataset)
    results: dict[str, Any] = {"split": split, "num_examples": int(len(labels)),
                               "head": self._head_kind,
                               "units": units_lib.describe(self.units, dataset.stats),
                               "input_scale": input_scale,
                               "certified_function": CERTIFIED_FUNCTION, "kinds": {}}
    certificates = {}
    for kind in self.kinds:
      start = time.time()
      constants = self.constants(kind, variables, empirical_source, empirical_split)
      cert, used = certify_dataset(self._certify_batch, variables, inputs, labels, kind,
                                   constants=constants, batch_size=self.batch_size,
                                   description=f"certify ({kind})", track=self.track,
                                   input_scale=input_scale)
      seconds = time.time() - start
      certificates[kind] = cert
      entry = {"seconds": seconds, **self._summary(cert, labels, dataset.num_classes)}
      note = {"note": "local constants of the first batch"} if constants is None else {}
      entry["lipschitz"] = {**note, **_constants_summary(used)}
      if attack and self.attack_steps > 0:
        entry["attack"] = self.attack_check(variables, inputs, labels, np.asarray(cert.radius),
                                            kind, stats=dataset.stats)
      results["kinds"][kind] = entry
    return results, certificates, labels

  def input_scale(self, dataset: data_lib.Dataset) -> dict[str, float] | None:
    """modality -> `s^(m)` of the `dataset`'s stats in input units (None for
    normalised units): `mmsafe.certify.units.input_scales`.

    Raises:
      ValueError naming the modalities without a standardisation in `stats`.
    """
    if self.units == units_lib.NORMALISED:
      return None
    missing = sorted(set(dataset.inputs) - set(dataset.stats))
    if missing:
      raise ValueError(f"dataset.stats: expected the standardisation of every modality for "
                       f"radii in input units, got none for {missing} (units='normalised' "
                       f"certifies in the model's input space)")
    return units_lib.input_scales({m: dataset.stats[m] for m in dataset.inputs})

  def constants(self, kind: str, variables, empirical_source, empirical_split: str):
    """The precomputed Lipschitz constants of `kind` (None for "local": computed
    with the radii); each is a compiled program of `mmsafe.certify`, the
    empirical ones one per batch of the split."""
    if kind == "empirical":
      if empirical_source is None:
        raise ValueError("empirical_source: expected a dataset for the 'empirical' kind, got None")
      total = math.ceil(len(empirical_source) / min(self.batch_size, len(empirical_source)))
      batches = data_lib.eval_pass(
          empirical_source, batch_size=min(self.batch_size, len(empirical_source)),
          process_index=0, process_count=1)
      return certify_lib.empirical_constants(
          self.model, variables,
          self.track(batches, total, f"empirical constants ({empirical_split})"),
          head=certify_lib.head_params(self.model, variables), mode=self.mode,
          chunk_size=self.chunk_size)
    if kind == "sound":
      return certify_lib.sound_constants(self.model, variables,
                                         key=jax.random.fold_in(self._key, 1),
                                         **self._sound_options)
    return None

  def _summary(self, cert, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The certified-accuracy summary and, for two or more modalities, the eta ratio."""
    finite = np.asarray(cert.radius)[np.isfinite(np.asarray(cert.radius))]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    out = {"summary": certify_lib.summarize(
        cert, certify_lib.radius_grid(top, self.num_thresholds))}
    modalities = list(cert.modalities)
    if len(modalities) >= 2:
      num, den = _eta_pair(modalities)
      ratio = certify_lib.eta_ratio(cert, labels, num, den, num_classes=num_classes,
                                     valid=cert.finite)
      out["eta_ratio"] = {"numerator": num, "denominator": den, "matrix": _json_matrix(ratio)}
    return out

  def _attack_batch(self, modality: str | None):
    if modality not in self._attack_batches:
      self._attack_batches[modality] = make_radius_attack(
          lambda v, x: self.model.apply(v, x).logits, steps=max(self.attack_steps, 1),
          restarts=self.attack_restarts, modality=modality)
    return self._attack_batches[modality]

  def attack_check(self, variables, inputs, labels: np.ndarray, radius: np.ndarray,
                   kind: str, modality: str | None = None, *, stats=None) -> dict[str, Any]:
    """Attacks every certified radius (see `make_radius_attack`; `modality`:
    the uni-modal radius of that modality, attacked in it alone; in input
    units, from the dataset's `stats`, unless `units` is "normalised"): how
    many of the attacked samples had a misclassified point found inside
    their radius."""
    unit_stats = None
    if self.units == units_lib.INPUT:
      if stats is None:
        raise ValueError("stats: expected the dataset's stats to attack radii in input units, "
                         "got None")
      unit_stats = {m: tuple(jnp.asarray(a, jnp.float32) for a in pair)
                    for m, pair in units_lib.unit_standardization(stats).items()}
    size = min(self.batch_size, len(labels))
    attacked_all, broken_all = [], []
    attack_batch = self._attack_batch(modality)
    scope = "" if modality is None else f", {modality} alone"
    batches = self.track(_batches(inputs, labels, self.batch_size),
                         math.ceil(len(labels) / size), f"attack ({kind}{scope})")
    for i, batch in enumerate(batches):
      valid = np.asarray(batch["valid"])
      n = int(valid.sum())
      batch_radius = np.zeros(len(valid), np.float32)
      batch_radius[:n] = radius[i * size:i * size + n]
      attacked, broken = attack_batch(variables, batch["inputs"], batch["label"], batch_radius,
                                      jax.random.fold_in(self._key, 1000 + i), unit_stats)
      attacked_all.append(attacked & valid)
      broken_all.append(broken & valid)
    attacked, broken = np.concatenate(attacked_all), np.concatenate(broken_all)
    steps, restarts = self.attack_steps, self.attack_restarts
    return {"description": f"l2-PGD inside (1 - {INSIDE}) r(x) in {self.units} units: "
                           f"{steps} steps of 2.5 r/{steps}, {restarts} random restarts, "
                           f"margin loss, worst iterate kept",
            "attacked": int(attacked.sum()), "broken": int(broken.sum()),
            "broken_fraction": float(broken.sum() / max(attacked.sum(), 1))}


def run_certification(model, variables, splits, *, kinds, split="test", empirical_split="train",
                      batch_size=100, max_examples=0, mode="auto", chunk_size=None,
                      power_iterations=300, failure_probability=1e-6, attack_steps=100,
                      attack_restarts=5, num_thresholds=101, seed=0,
                      track: Track = _no_progress, units: str = units_lib.INPUT):
  """Certifies `splits[split]` (its first `max_examples`, 0: all) with each
  Lipschitz kind and attacks the radii: a `Certification` run once.

  Returns:
    (results dict for JSON, {kind: Certificate}, labels).
  """
  certification = Certification(
      model, kinds=kinds, batch_size=batch_size, mode=mode, chunk_size=chunk_size,
      power_iterations=power_iterations, failure_probability=failure_probability,
      attack_steps=attack_steps, attack_restarts=attack_restarts,
      num_thresholds=num_thresholds, seed=seed, track=track, units=units)
  dataset = data_lib.in_memory(splits[split], max(max_examples, 0))
  empirical = splits[empirical_split] if "empirical" in certification.kinds else None
  return certification(variables, dataset, empirical, split=split,
                       empirical_split=empirical_split)
