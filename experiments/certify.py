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

Attack check: for every correctly classified test sample with a positive
radius r(x), an l2-PGD attack (margin loss, `--attack_steps` steps of
2.5 r/steps, `--attack_restarts` random restarts, worst iterate kept) searches
the ball of radius `(1 - 1e-4) r(x)`. A success inside a `sound` radius would
be a bug; for `local`/`empirical` (estimates) the report gives how often the
radius is broken.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mmsafe import attacks
from mmsafe import certify as certify_lib
from mmsafe import data as data_lib
from mmsafe.eval import plots
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

# Attacks search the open ball of radius (1 - _INSIDE) r(x).
_INSIDE = 1e-4


def make_radius_attack(logits_fn, *, steps: int, restarts: int):
  """A jitted `attack(inputs, labels, radius, key) -> (attacked [B], broken [B])`.

  Searches for a misclassified point strictly inside each sample's radius with
  `mmsafe.attacks.pgd`: per-example budgets `eps = (1 - 1e-4) r(x)`, margin
  loss, `steps` steps of `2.5 eps / steps`, `restarts` random restarts, the
  worst iterate kept. Samples that are misclassified, or whose radius is 0 or
  infinite, are not attacked. `broken` marks attacked samples for which a
  misclassified point was found inside the ball (its norm is checked).
  """

  def attack(inputs, labels, radius, key):
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

  def run(inputs, labels, radius, key):
    attacked, broken, excess = jitted(inputs, jnp.asarray(labels),
                                      jnp.asarray(radius, jnp.float32), key)
    if float(jnp.max(excess)) > 1e-5 * float(jnp.max(jnp.asarray(radius))) + 1e-6:
      raise AssertionError(f"attack left the ball: max excess {float(jnp.max(excess))}")
    return np.asarray(attacked), np.asarray(broken)

  return run


def _subset(dataset, max_examples: int):
  n = len(dataset.labels) if max_examples <= 0 else min(max_examples, len(dataset.labels))
  index = np.arange(n)
  return {m: x[index] for m, x in dataset.inputs.items()}, dataset.labels[index]


def _batches(inputs, labels, batch_size):
  return data_lib.eval_batches(inputs, labels, batch_size=min(batch_size, len(labels)))


def make_certifier(model, *, mode: str, chunk_size: int | None):
  """`run(variables, inputs, labels, kind, constants) -> Certificate`, compiled once per
  kind structure (local: Jacobians; empirical/sound: the precomputed constants)."""
  local = jax.jit(lambda v, x, y: certify_lib.certify(model, v, x, y, "local", mode=mode,
                                                      chunk_size=chunk_size))

  def certify_fixed(variables, inputs, labels, values, target):
    with jax.default_matmul_precision("highest"):
      output = model.apply(variables, inputs)
    constants = certify_lib.LipschitzConstants(values=values, target=target)
    return certify_lib.certified_radius(output, labels, constants.tau(labels))

  fixed = jax.jit(certify_fixed, static_argnums=(4,))

  def run(variables, inputs, labels, kind, constants=None):
    if kind == "local":
      return local(variables, inputs, labels)
    cert = fixed(variables, inputs, labels, constants.values, constants.target)
    return cert.replace(kind=kind)

  return run


def certify_dataset(run, variables, inputs, labels, kind: str, *, constants=None,
                    batch_size: int, description: str) -> certify_lib.Certificate:
  """Certificate of every example (batched, padded batches trimmed), with a progress bar."""
  parts = []
  total = math.ceil(len(labels) / min(batch_size, len(labels)))
  for batch in tqdm(_batches(inputs, labels, batch_size), total=total, desc=description):
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
                      attack_restarts=5, num_thresholds=101, seed=0):
  """Certifies `splits[split]` with each Lipschitz kind and attacks the radii.

  Returns:
    (results dict for JSON, {kind: Certificate}, labels).
  """
  for kind in kinds:
    if kind not in certify_lib.KINDS:
      raise ValueError(f"kinds: expected a subset of {certify_lib.KINDS}, got {kind!r}")
  dataset = splits[split]
  inputs, labels = _subset(dataset, max_examples)
  key = jax.random.PRNGKey(seed)
  head = certify_lib.lipschitz.head_params(model, variables)
  results: dict[str, Any] = {"split": split, "num_examples": int(len(labels)),
                             "head": head.kind, "kinds": {}}
  certificates = {}
  logits_fn = lambda x: model.apply(variables, x).logits
  run = make_certifier(model, mode=mode, chunk_size=chunk_size)
  attack = make_radius_attack(logits_fn, steps=attack_steps, restarts=attack_restarts)
  for kind in kinds:
    start = time.time()
    constants = None
    if kind == "empirical":
      source = splits[empirical_split]
      total = math.ceil(len(source.labels) / min(batch_size, len(source.labels)))
      constants = certify_lib.empirical_constants(
          model, variables,
          tqdm(_batches(source.inputs, source.labels, batch_size), total=total,
               desc=f"empirical constants ({empirical_split})"),
          head=head, mode=mode, chunk_size=chunk_size)
    elif kind == "sound":
      constants = certify_lib.sound_constants(
          model, variables, head=head, key=jax.random.fold_in(key, 1),
          iterations=power_iterations, failure_probability=failure_probability)
    cert = certify_dataset(run, variables, inputs, labels, kind, constants=constants,
                           batch_size=batch_size, description=f"certify ({kind})")
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
      for i, batch in enumerate(tqdm(_batches(inputs, labels, batch_size),
                                     total=math.ceil(len(labels) / min(batch_size, len(labels))),
                                     desc=f"attack ({kind})")):
        valid = np.asarray(batch["valid"])
        n = int(valid.sum())
        offset = i * min(batch_size, len(labels))
        radius = np.zeros(len(valid), np.float32)
        radius[:n] = np.asarray(cert.radius)[offset:offset + n]
        attacked, broken = attack(batch["inputs"], batch["label"], radius,
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


def write_reports(results, certificates, labels, outdir: str) -> list[str]:
  """Writes results.json and the PNG figures; returns the written paths."""
  os.makedirs(outdir, exist_ok=True)
  paths = [os.path.join(outdir, "results.json")]
  loop.write_json_atomic(paths[0], results)
  curves = {kind: (entry["summary"]["thresholds"], entry["summary"]["certified_accuracy"])
            for kind, entry in results["kinds"].items()}
  paths.append(plots.plot_certified_accuracy(
      curves, os.path.join(outdir, "certified_accuracy.png"),
      title=f"certified accuracy ({results['split']}, {results['head']} head)"))
  for kind, entry in results["kinds"].items():
    summary = entry["summary"]
    uni = {f"{m} only": (summary["thresholds"], acc)
           for m, acc in summary["unimodal_certified_accuracy"].items()}
    uni["all modalities"] = (summary["thresholds"], summary["certified_accuracy"])
    paths.append(plots.plot_certified_accuracy(
        uni, os.path.join(outdir, f"unimodal_{kind}.png"),
        title=f"uni-modal certified accuracy ({kind})"))
    if "eta_ratio" in entry:
      eta = entry["eta_ratio"]
      matrix = np.array([[np.nan if v is None else v for v in row] for row in eta["matrix"]])
      paths.append(plots.plot_eta_ratio_heatmap(
          matrix, os.path.join(outdir, f"eta_ratio_{kind}.png"), numerator=eta["numerator"],
          denominator=eta["denominator"], title=f"vulnerability ratio ({kind})"))
  return paths


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  workdir = _WORKDIR.value
  _, model, variables, splits = loop.restore_run(workdir, which=_WHICH.value)
  results, certificates, labels = run_certification(
      model, variables, splits, kinds=_KINDS.value, split=_SPLIT.value,
      empirical_split=_EMPIRICAL_SPLIT.value, batch_size=_BATCH_SIZE.value,
      max_examples=_MAX_EXAMPLES.value, mode=_MODE.value, chunk_size=_CHUNK.value or None,
      power_iterations=_ITERATIONS.value, failure_probability=_FAILURE.value,
      attack_steps=_ATTACK_STEPS.value, attack_restarts=_ATTACK_RESTARTS.value,
      num_thresholds=_NUM_THRESHOLDS.value, seed=_SEED.value)
  paths = write_reports(results, certificates, labels, os.path.join(workdir, "certify"))
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
