"""Certification of a whole dataset split, checked by attacks (pure: plain dicts).

`run_certification` certifies every example of a split with each Lipschitz
kind ("local", "empirical", "sound"; `mmsafe.certify`), summarises the
certified-accuracy curves, uni-modal (Prop. 3.4) curves and the eta ratio
heat map (CRMT Fig. 3), and checks the radii with an attack: for every
correctly classified sample with a positive radius r(x), an l2-PGD attack
(margin loss, `attack_steps` steps of 2.5 r/steps, `attack_restarts` random
restarts, worst iterate kept) searches the ball of radius `(1 - 1e-4) r(x)`.
A success inside a `sound` radius would be a bug; for `local`/`empirical`
(estimates) the result gives how often the radius is broken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe import certify as certify_lib
from mmsafe import data as data_lib

Track = Callable[[Iterable, int, str], Iterable]

# Attacks search the open ball of radius (1 - _INSIDE) r(x).
_INSIDE = 1e-4


def make_radius_attack(logits_apply, *, steps: int, restarts: int):
  """A jitted `attack(variables, inputs, labels, radius, key) -> (attacked [B],
  broken [B])` for `logits_apply(variables, inputs) -> [B, K]`.

  Searches for a misclassified point strictly inside each sample's radius with
  `mmsafe.attacks.pgd`: per-example budgets `eps = (1 - 1e-4) r(x)`, margin
  loss, `steps` steps of `2.5 eps / steps`, `restarts` random restarts, the
  worst iterate kept. Samples that are misclassified, or whose radius is 0 or
  infinite, are not attacked. `broken` marks attacked samples for which a
  misclassified point was found inside the ball (its norm is checked). The
  variables are an argument, not constants of the compiled program (XLA would
  otherwise fold e.g. the AOL rescaling of every layer at compile time).
  """

  def attack(variables, inputs, labels, radius, key):
    logits_fn = lambda x: logits_apply(variables, x)
    correct = jnp.argmax(logits_fn(inputs), -1) == labels
    attacked = correct & (radius > 0) & jnp.isfinite(radius)
    eps = jnp.where(attacked, radius * (1.0 - _INSIDE), 0.0)
    adversarial = attacks.pgd(logits_fn, inputs, labels, key, eps=eps, steps=steps,
                              restarts=restarts, random_start=True, loss="margin")
    delta = jnp.sqrt(sum(jnp.sum(jnp.square(adversarial[m] - inputs[m]).reshape(
        labels.shape[0], -1), axis=1) for m in inputs))
    flipped = jnp.argmax(logits_fn(adversarial), -1) != labels
    return attacked, attacked & flipped, delta - eps

  jitted = jax.jit(attack)

  def run(variables, inputs, labels, radius, key):
    attacked, broken, excess = jitted(variables, inputs, jnp.asarray(labels),
                                      jnp.asarray(radius, jnp.float32), key)
    if float(jnp.max(excess)) > 1e-5 * float(jnp.max(jnp.asarray(radius))) + 1e-6:
      raise AssertionError(f"attack left the ball: max excess {float(jnp.max(excess))}")
    return np.asarray(attacked), np.asarray(broken)

  return run


def _batches(inputs, labels, batch_size):
  return data_lib.eval_batches(inputs, labels, batch_size=min(batch_size, len(labels)))


def make_certifier(model, *, mode: str, chunk_size: int | None):
  """`run(variables, inputs, labels, kind, constants) -> Certificate`: `certify`
  compiled once per kind (local: Jacobians; empirical/sound: the precomputed
  `constants`, traced)."""
  return jax.jit(lambda variables, inputs, labels, kind, constants=None: certify_lib.certify(
      model, variables, inputs, labels, kind, constants=constants, mode=mode,
      chunk_size=chunk_size), static_argnums=3)


def _no_progress(iterable: Iterable, total: int, description: str) -> Iterable:
  del total, description
  return iterable


def certify_dataset(run, variables, inputs, labels, kind: str, *, constants=None,
                    batch_size: int, description: str, track: Track = _no_progress
                    ) -> certify_lib.Certificate:
  """Certificate of every example (batched, padded batches trimmed)."""
  parts = []
  total = math.ceil(len(labels) / min(batch_size, len(labels)))
  for batch in track(_batches(inputs, labels, batch_size), total, description):
    cert = run(variables, batch["inputs"], jnp.asarray(batch["label"]), kind, constants)
    valid = np.asarray(batch["valid"])
    parts.append(jax.tree_util.tree_map(lambda x: x[valid], cert))
  return certify_lib.concatenate(parts)


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


def run_certification(model, variables, splits, *, kinds, split="test", empirical_split="train",
                      batch_size=100, max_examples=0, mode="auto", chunk_size=None,
                      power_iterations=300, failure_probability=1e-6, attack_steps=100,
                      attack_restarts=5, num_thresholds=101, seed=0,
                      track: Track = _no_progress):
  """Certifies `splits[split]` with each Lipschitz kind and attacks the radii.

  `track(iterable, total, description)` wraps each long loop (e.g. a progress
  bar in the experiment script; the identity by default).

  Returns:
    (results dict for JSON, {kind: Certificate}, labels).
  """
  for kind in kinds:
    if kind not in certify_lib.KINDS:
      raise ValueError(f"kinds: expected a subset of {certify_lib.KINDS}, got {kind!r}")
  dataset = data_lib.in_memory(splits[split], max(max_examples, 0))
  inputs, labels = dict(dataset.inputs), np.asarray(dataset.labels)
  key = jax.random.PRNGKey(seed)
  head = certify_lib.lipschitz.head_params(model, variables)
  results: dict[str, Any] = {"split": split, "num_examples": int(len(labels)),
                             "head": head.kind, "kinds": {}}
  certificates = {}
  run = make_certifier(model, mode=mode, chunk_size=chunk_size)
  attack = make_radius_attack(lambda v, x: model.apply(v, x).logits, steps=attack_steps,
                              restarts=attack_restarts)
  for kind in kinds:
    start = time.time()
    constants = None
    if kind == "empirical":
      source = splits[empirical_split]
      total = math.ceil(len(source) / min(batch_size, len(source)))
      constants = certify_lib.empirical_constants(
          model, variables,
          track(data_lib.full_pass(source, batch_size=batch_size), total,
                f"empirical constants ({empirical_split})"),
          head=head, mode=mode, chunk_size=chunk_size)
    elif kind == "sound":
      constants = certify_lib.sound_constants(
          model, variables, head=head, key=jax.random.fold_in(key, 1),
          iterations=power_iterations, failure_probability=failure_probability)
    cert = certify_dataset(run, variables, inputs, labels, kind, constants=constants,
                           batch_size=batch_size, description=f"certify ({kind})",
                           track=track)
    seconds = time.time() - start
    certificates[kind] = cert
    finite = np.asarray(cert.radius)[np.isfinite(np.asarray(cert.radius))]
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    summary = certify_lib.summarize(cert, certify_lib.radius_grid(top, num_thresholds))
    entry = {"summary": summary, "seconds": seconds}
    if constants is None:
      constants = certify_lib.local_constants(
          model, variables, {m: x[:min(len(labels), batch_size)] for m, x in inputs.items()},
          head=head, mode=mode, chunk_size=chunk_size)
      entry["lipschitz"] = {"note": "local constants of the first batch",
                            **_constants_summary(constants)}
    else:
      entry["lipschitz"] = _constants_summary(constants)
    modalities = list(cert.modalities)
    if len(modalities) >= 2:
      num, den = _eta_pair(modalities)
      ratio = certify_lib.eta_ratio(cert, labels, num, den, num_classes=dataset.num_classes)
      entry["eta_ratio"] = {"numerator": num, "denominator": den,
                            "matrix": _json_matrix(ratio)}
    if attack_steps > 0:
      attacked_all, broken_all = [], []
      for i, batch in enumerate(track(_batches(inputs, labels, batch_size),
                                      math.ceil(len(labels) / min(batch_size, len(labels))),
                                      f"attack ({kind})")):
        valid = np.asarray(batch["valid"])
        n = int(valid.sum())
        offset = i * min(batch_size, len(labels))
        radius = np.zeros(len(valid), np.float32)
        radius[:n] = np.asarray(cert.radius)[offset:offset + n]
        attacked, broken = attack(variables, batch["inputs"], batch["label"], radius,
                                  jax.random.fold_in(key, 1000 + i))
        attacked_all.append(attacked & valid)
        broken_all.append(broken & valid)
      attacked, broken = np.concatenate(attacked_all), np.concatenate(broken_all)
      entry["attack"] = {
          "description": f"l2-PGD inside (1 - {_INSIDE}) r(x): {attack_steps} steps of "
                         f"2.5 r/{attack_steps}, {attack_restarts} random restarts, margin loss, "
                         f"worst iterate kept",
          "attacked": int(attacked.sum()), "broken": int(broken.sum()),
          "broken_fraction": float(broken.sum() / max(attacked.sum(), 1))}
    results["kinds"][kind] = entry
  return results, certificates, labels
