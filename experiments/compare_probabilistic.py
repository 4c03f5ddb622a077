r"""CRMT's deterministic certificates vs randomized smoothing vs the ablation
certificate, on the same test examples, with empirical attacks and timings.

  python -m experiments.compare_probabilistic --config=experiments/configs/embedded.py:mfeat \
      --sigmas=0.25,0.5,1.0 --max_examples=200 --workdir=/tmp/mmsafe/probabilistic_mfeat

Models (each trained in `<workdir>/<run>` with `experiments.train`'s loop; a
finished run there is reused as it is):

* `crmt` (free encoders) and `crmt_cert` (1-Lipschitz encoders,
  `config.model.lipschitz_encoders`): the sound deterministic certificate
  (`mmsafe.certify.certify`, kind "sound").
* `gaussian_aug_<sigma>`: Gaussian data augmentation at each sigma, certified
  by randomized smoothing at that sigma (`mmsafe.certify.smoothing`).
* `ablated_<fraction>`: trained on ablations, certified by the ablation
  certificate keeping that fraction of every modality (`mmsafe.certify.ablation`).

Every certificate runs on the first `--max_examples` test examples. The
empirical columns attack the classifier that is certified: the base model
for CRMT; for smoothing and ablation the voting classifier, attacked through
its expectation-over-transformation surrogate (`--eot_samples` fixed draws,
`smoothing.expected_logits`) and scored by PREDICT on fresh votes (an
abstention counts as an error). Attacks: joint l2-PGD at `--pgd_eps` (margin
loss), the decoupling attack changing `--decoupling_fraction` of all entries,
and each modality missing (zeros).

Writes `<workdir>/probabilistic.{md,json}` and two PNGs: certified accuracy
against the l2 radius (CRMT and smoothing) and against the number of changed
entries (ablation: any split over the modalities, and each modality alone);
`<workdir>/index.md` links them and each run's files.
"""

from __future__ import annotations

import os
import time

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import cli
from mmsafe import attacks, files
from mmsafe import certify as certify_lib
from mmsafe.certify import ablation, smoothing, votes
from mmsafe.eval import plots
from mmsafe.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding every run and the report.")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.25", "0.5", "1.0"], "Smoothing noise levels.")
_KEEP = flags.DEFINE_float("keep_fraction", None, "Fraction of every modality kept by the "
                           "ablation (None: config.method_kwargs.ablation_keep_fraction).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 200, "First N test examples.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Votes bounding p_A (and PREDICT's).")
_NUM_SELECTION = flags.DEFINE_integer("num_selection", 100, "Votes choosing the class.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of the certificates.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Examples per certification batch.")
_CHUNK = flags.DEFINE_integer("chunk_size", 100, "Noisy copies per program call.")
_RADII = flags.DEFINE_list("radii", ["0.25", "0.5", "1.0"], "l2 radii of the table.")
_PGD_EPS = flags.DEFINE_float("pgd_eps", 0.5, "Joint l2 budget of the PGD column.")
_STEPS = flags.DEFINE_integer("attack_steps", 10, "PGD steps.")
_DECOUPLING = flags.DEFINE_float("decoupling_fraction", 0.01, "Decoupling budget (fraction).")
_EOT = flags.DEFINE_integer("eot_samples", 8, "Draws of the attack surrogate of a voter.")
flags.mark_flags_as_required(["config", "workdir"])

LIPSCHITZ_RUNS = ("crmt_cert",)


def trained(base, run: str, method: str, **kwargs):
  """`(model, variables)`: the run `<workdir>/<run>` of `method` (trained unless
  finished), `kwargs` overriding `method_kwargs`."""
  workdir = os.path.join(_WORKDIR.value, run)
  if not os.path.exists(os.path.join(workdir, "results.json")):
    config = base.copy_and_resolve_references()
    with config.unlocked():
      config.method = method
      config.method_kwargs.update(kwargs)
      if run in LIPSCHITZ_RUNS:
        config.model.encoders = config.model.lipschitz_encoders
    loop.train_and_evaluate(config, workdir)
  _, model, variables, _ = loop.restore_run(workdir)
  return model, variables


def batches(x, y):
  """`(inputs, labels)` batches of `--batch_size` examples, in order."""
  size = _BATCH.value
  for start in range(0, len(y), size):
    yield {m: v[start:start + size] for m, v in x.items()}, y[start:start + size]


def sound_row(model, variables, x, y):
  """CRMT's sound certificate: `(logits_fn, radii [N], correct [N], seconds per example)`."""
  logits_fn = jax.jit(lambda v: model.apply(variables, v).logits)
  first = {m: v[:1] for m, v in x.items()}
  start = time.perf_counter()
  constants = certify_lib.lipschitz_constants(model, variables, first, "sound")
  parts = [certify_lib.certify(model, variables, xb, yb, "sound", constants=constants)
           for xb, yb in batches(x, y)]
  seconds = (time.perf_counter() - start) / len(y)
  cert = certify_lib.concatenate(parts)
  return logits_fn, np.asarray(cert.radius), np.asarray(cert.correct), seconds


def vote_row(logits_fn, certify_fn, x, y, key, name):
  """A voting certificate over the batches (joined) and seconds per example."""
  start = time.perf_counter()
  parts = [certify_fn(logits_fn, xb, yb, key=jax.random.fold_in(key, i),
                      progress=f"{name} {i + 1}/{-(-len(y) // _BATCH.value)}")
           for i, (xb, yb) in enumerate(batches(x, y))]
  seconds = (time.perf_counter() - start) / len(y)
  return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *parts), seconds


def empirical(logits_fn, x, y, key, *, transform=None):
  """Accuracy under PGD, decoupling and each missing modality: of the base
  classifier (`transform` None) or of the voter (EOT surrogate, PREDICT)."""
  if transform is None:
    target, classify = logits_fn, lambda v: np.argmax(np.asarray(logits_fn(v)), 1)
  else:
    target = jax.jit(smoothing.expected_logits(logits_fn, transform, jax.random.fold_in(key, 1),
                                               _EOT.value))
    num_classes = int(logits_fn({m: v[:1] for m, v in x.items()}).shape[-1])

    def classify(v):
      counts = votes.vote_counts(logits_fn, transform, v, jax.random.fold_in(key, 2),
                                 num_samples=_NUM_SAMPLES.value, chunk_size=_CHUNK.value,
                                 num_classes=num_classes)
      return votes.decide(counts, _ALPHA.value)

  result = {"pgd": [], "decoupling": [], **{f"missing {m}": [] for m in sorted(x)}}
  for i, (xb, yb) in enumerate(batches(x, y)):
    xb = {m: jnp.asarray(v) for m, v in xb.items()}
    yb = jnp.asarray(yb)
    adv = attacks.pgd(target, xb, yb, jax.random.fold_in(key, 3 + i), eps=_PGD_EPS.value,
                      steps=_STEPS.value, loss="margin")
    result["pgd"].append(classify(adv) == np.asarray(yb))
    adv = attacks.decoupling(target, xb, yb, jax.random.fold_in(key, 1000 + i),
                             fraction=_DECOUPLING.value, rounds=4, steps_per_round=5)
    result["decoupling"].append(classify(adv) == np.asarray(yb))
    for m in sorted(x):
      result[f"missing {m}"].append(classify(attacks.drop_modality(xb, m)) == np.asarray(yb))
  return {name: float(np.mean(np.concatenate(v))) for name, v in result.items()}


def accuracy_at(values, correct, thresholds):
  """Fraction of examples with `correct` and `values >= t`, for each threshold `t`."""
  return [float(np.mean(correct & (values >= t))) for t in thresholds]


def markdown(rows, radii, changed, sizes) -> str:
  """The comparison table (None cells: the certificate does not cover that threat)."""
  modalities = sorted(sizes)
  header = (["model", "certificate", "clean (certifier)"]
            + [f"cert. l2 r={r:g}" for r in radii] + [f"cert. {changed} changed entries",
                                                      "PGD", "decoupling"]
            + [f"missing {m}" for m in modalities] + ["s / example"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  fmt = lambda v: "—" if v is None else f"{v:.3f}"
  for row in rows:
    cells = ([row["model"], row["certificate"], fmt(row["clean"])]
             + [fmt(v) for v in row["l2"]] + [fmt(row["l0"]), fmt(row["pgd"]),
                                              fmt(row["decoupling"])]
             + [fmt(row[f"missing {m}"]) for m in modalities]
             + [f"{row['seconds']:.4f}"])
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  base = _CONFIG.value
  keep_fraction = _KEEP.value or base.method_kwargs.ablation_keep_fraction
  radii = [float(r) for r in _RADII.value]
  grid = certify_lib.radius_grid(3.0, 121)
  key = jax.random.PRNGKey(base.seed)
  rows, l2_curves, l0_curves = [], {}, {}
  x = y = None
  for run in ("crmt", "crmt_cert"):
    model, variables = trained(base, run, run)
    if x is None:
      _, _, _, splits = loop.restore_run(os.path.join(_WORKDIR.value, run))
      n = min(_MAX_EXAMPLES.value, len(splits["test"].labels))
      x = {m: np.asarray(v[:n]) for m, v in splits["test"].inputs.items()}
      y = np.asarray(splits["test"].labels[:n])
      sizes = ablation.entry_counts(x)
      budget = int(np.floor(_DECOUPLING.value * sum(sizes.values())))
    logits_fn, radius, correct, seconds = sound_row(model, variables, x, y)
    name = f"{run} ({'1-Lipschitz' if run in LIPSCHITZ_RUNS else 'free'} encoders)"
    rows.append({"model": name, "certificate": "sound (deterministic)",
                 "clean": float(correct.mean()), "l2": accuracy_at(radius, correct, radii),
                 "l0": None, "seconds": seconds, **empirical(logits_fn, x, y, key)})
    l2_curves[f"{run}: sound"] = (grid, accuracy_at(radius, correct, grid))
  options = dict(num_samples=_NUM_SAMPLES.value, num_selection=_NUM_SELECTION.value,
                 alpha=_ALPHA.value, chunk_size=_CHUNK.value)
  for sigma in (float(s) for s in _SIGMAS.value):
    model, variables = trained(base, f"gaussian_aug_{sigma:g}", "gaussian_aug",
                                  noise_sigma=sigma)
    logits_fn = jax.jit(lambda v, variables=variables, model=model:
                        model.apply(variables, v).logits)
    certify_fn = lambda f, xb, yb, *, key, progress, sigma=sigma: smoothing.certify(
        f, xb, yb, sigma, key, progress=progress, **options)
    cert, seconds = vote_row(logits_fn, certify_fn, x, y, key, f"sigma={sigma:g}")
    transform = smoothing.gaussian_noise(tuple((m, sigma) for m in sorted(x)))
    rows.append({"model": f"gaussian_aug σ={sigma:g}", "certificate": f"smoothing σ={sigma:g}",
                 "clean": float(cert.correct.mean()),
                 "l2": accuracy_at(cert.radius, cert.correct, radii), "l0": None,
                 "seconds": seconds, **empirical(logits_fn, x, y, key, transform=transform)})
    l2_curves[f"smoothing σ={sigma:g}"] = (grid, accuracy_at(cert.radius, cert.correct, grid))
  model, variables = trained(base, f"ablated_{keep_fraction:g}", "ablated",
                                ablation_keep_fraction=keep_fraction)
  logits_fn = jax.jit(lambda v: model.apply(variables, v).logits)
  keep = ablation.keep_counts(sizes, keep_fraction)
  certify_fn = lambda f, xb, yb, *, key, progress: ablation.certify(
      f, xb, yb, keep, key, progress=progress, **options)
  cert, seconds = vote_row(logits_fn, certify_fn, x, y, key, "ablation")
  transform = ablation.ablation(tuple(sorted(keep.items())))
  rows.append({"model": f"ablated keep {keep_fraction:g}",
               "certificate": "ablation (" + ", ".join(f"k_{m}={k}" for m, k in keep.items())
               + ")", "clean": float(cert.correct.mean()), "l2": [None] * len(radii),
               "l0": float(np.mean(cert.correct & (cert.total >= budget))), "seconds": seconds,
               **empirical(logits_fn, x, y, key, transform=transform)})
  counts = np.arange(0, max(int(cert.total.max()), 1) + 2)
  l0_curves["ablation: any split"] = (counts, accuracy_at(cert.total, cert.correct, counts))
  for m in sorted(keep):
    l0_curves[f"ablation: {m} alone"] = (counts, accuracy_at(cert.per_modality[m],
                                                             cert.correct, counts))
  table = markdown(rows, radii, budget, sizes)
  dataset = base.dataset
  print(f"\n{dataset}, first {len(y)} test examples, alpha={_ALPHA.value:g}, "
        f"n={_NUM_SAMPLES.value} votes:\n\n{table}")
  report = {"dataset": dataset, "examples": len(y), "radii": radii, "changed_entries": budget,
            "sizes": sizes, "keep": keep, "rows": rows,
            "certified_counts": {"total": cert.total.tolist(),
                                 **{m: v.tolist() for m, v in cert.per_modality.items()}}}
  files.write_json_atomic(os.path.join(_WORKDIR.value, "probabilistic.json"), report)
  files.write_text_atomic(os.path.join(_WORKDIR.value, "probabilistic.md"), table)
  files.write_atomic(os.path.join(_WORKDIR.value, "certified_accuracy_l2.png"),
                     lambda f: plots.plot_certified_accuracy(
                         {k: (np.asarray(a), np.asarray(b)) for k, (a, b) in l2_curves.items()},
                         f, title=f"{dataset}: certified accuracy vs joint l2 radius"))
  files.write_atomic(os.path.join(_WORKDIR.value, "certified_accuracy_changed.png"),
                     lambda f: plots.plot_certified_accuracy(
                         {k: (np.asarray(a, np.float32), np.asarray(b))
                          for k, (a, b) in l0_curves.items()}, f,
                         xlabel="changed entries", title=f"{dataset}: ablation certificate"))
  index = cli.record_in_index(
      _WORKDIR.value, f"compare_probabilistic on {dataset}", [_WORKDIR.value],
      config=base, key="compare_probabilistic")
  print(f"index of the reports and figures: {index}")


if __name__ == "__main__":
  cli.run(main)
