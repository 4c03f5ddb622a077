r"""Every certificate and defence against the decoupling attack, on one table:
CRMT's sound certificates, randomized smoothing, the modality-ablation
certificate and the certified missing-modality accuracy, next to the measured
attacks, over seeds.

  python -m experiments.compare_probabilistic --config=experiments/configs/embedded.py:mfeat \
      --seeds=0,1,2 --workdir=/tmp/mmsafe/probabilistic_mfeat

Models (each trained in `<workdir>/seed<k>/<run>` with `experiments.train`'s
loop and `config.seed = k`; a finished run there is reused as it is):

* `crmt` (free encoders) and `crmt_cert` (1-Lipschitz encoders,
  `config.model.lipschitz_encoders`): the sound deterministic certificate
  (`mmsafe.certify.certify`, kind "sound").
* `gaussian_aug_<sigma>`: Gaussian data augmentation at each sigma, certified
  by randomized smoothing at that sigma (`mmsafe.certify.smoothing`).
* `ablated_<keep>`: the voter of the ablation certificate
  (`mmsafe.certify.ablation`), trained on exactly the ablations it votes on,
  its encoders told which entries were kept (`kept_indicator`,
  `--kept_indicator`). With several `--keep` settings, each is trained with
  seed 0 and certified on the validation split (`--sweep_samples` votes); the
  one with the highest validation certified accuracy averaged over the
  changed-entry budgets of the table (then the more accurate voter) is the one
  every seed trains and the test split certifies.
* `--defences` (default `decoupling_at`): empirical defences, no certificate.

Threat models, per example, in the models' normalised input space:

* joint l2: `sqrt(sum_m ||delta_m||^2) <= r` (the sound and smoothing certificates);
* changed entries (the decoupling attack's l0 threat, after MUROAN,
  Vishwamitra et al. 2021): at most `floor(f n)` of the `n` entries of all
  modalities jointly change (any split over the modalities), for `f` in
  `--certified_fractions`; the ablation certificate allows any new values,
  the decoupling attack moves each changed entry by at most
  `--decoupling_max_change` (no box);
* a missing modality: modality m replaced by its fill (zeros, the training
  mean). Certified by a sound or smoothing certificate when the prediction is
  correct and its modality-m radius exceeds `||x_m - 0||` (a perturbation of
  modality m alone); an ablation keeping `k_m >= 1` entries of m never
  certifies it (every vote may change).

The empirical columns attack the classifier that is certified, adaptively:
the base model for the deterministic rows; for the voters the voting
classifier through its expectation-over-transformation surrogate
(`--eot_samples` fixed draws, `smoothing.expected_logits`), scored by
PREDICT on fresh votes (an abstention counts as an error). "clean (as
attacked)" is that same decision on the clean inputs; "clean (certifier)" is
CERTIFY's (abstaining below its bound). Attacks: joint l2-PGD at `--pgd_eps`
(margin loss), the decoupling attack (`--decoupling_rounds` x
`--decoupling_steps`, margin loss) at `--decoupling_fraction`, and each
modality missing.

Writes `<workdir>/probabilistic_<dataset>.{md,json}` (mean ± sample std over
seeds, and every seed's values), `certified_accuracy_l2.png`,
`certified_accuracy_changed.png` and, with a sweep, `keep_sweep.md`;
`<workdir>/index.md` links them.
"""

from __future__ import annotations

import math
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import certified_report, cli
from experiments.configs import embedded
from mmsafe import attacks, files
from mmsafe import certify as certify_lib
from mmsafe.certify import ablation, curves, smoothing, threats, votes
from mmsafe.eval import plots
from mmsafe.train import loop, restore

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding every run and the report.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Training seeds (one model of each kind per seed).")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.25", "0.5", "1.0"], "Smoothing noise levels.")
_KEEP = flags.DEFINE_multi_string(
    "keep", None, "Entries kept per modality by the ablation, 'audio:20,visual:1'; repeat the "
    "flag to sweep on the validation split (None: config.method_kwargs).")
_KEPT_INDICATOR = flags.DEFINE_bool("kept_indicator", True, "Give the voter's encoders the "
                                    "kept-entry indicator channel.")
_VOTER_EPOCHS = flags.DEFINE_integer(
    "voter_epochs", None, "Training epochs of the ablation voters (None: config.num_epochs); "
    "sparse inputs learn slowly: on av_digits 6 epochs left the loss near log 10.")
_DEFENCES = flags.DEFINE_list("defences", ["decoupling_at"], "Empirical defences (methods).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "First N test examples (0: all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Votes bounding p_A (and PREDICT's).")
_NUM_SELECTION = flags.DEFINE_integer("num_selection", 100, "Votes choosing the class.")
_SWEEP_SAMPLES = flags.DEFINE_integer("sweep_samples", 200, "Votes per validation example in "
                                      "the sweep of --keep.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of the certificates.")
_BATCH = flags.DEFINE_integer("batch_size", 50, "Examples per certification batch.")
_CHUNK = flags.DEFINE_integer("chunk_size", 100, "Noisy copies per program call.")
_RADII = flags.DEFINE_list("radii", ["0.25", "0.5", "1.0"], "l2 radii of the table.")
_FRACTIONS = flags.DEFINE_list("certified_fractions", ["0.0025", "0.005", "0.01"],
                               "Changed-entry budgets of the table (fractions of all entries).")
_PGD_EPS = flags.DEFINE_float("pgd_eps", 0.5, "Joint l2 budget of the PGD column.")
_STEPS = flags.DEFINE_integer("attack_steps", 10, "PGD steps.")
_DECOUPLING = flags.DEFINE_float("decoupling_fraction", 0.01, "Decoupling budget (fraction).")
_ROUNDS = flags.DEFINE_integer("decoupling_rounds", 8, "Decoupling support-growing rounds.")
_DECOUPLING_STEPS = flags.DEFINE_integer("decoupling_steps", 10, "Decoupling steps per round.")
_MAX_CHANGE = flags.DEFINE_float("decoupling_max_change", 2.0, "Largest change of one entry.")
_EOT = flags.DEFINE_integer("eot_samples", 8, "Draws of the attack surrogate of a voter.")
flags.mark_flags_as_required(["config", "workdir"])

LIPSCHITZ_RUNS = ("crmt_cert",)


def run_config(base, seed: int, run: str, method: str, kept_indicator: bool = False, **kwargs):
  """The config of run `run`: `method` with `seed`, `kwargs` over `method_kwargs`;
  the ablation voters with `--voter_epochs` (learning-rate decay at 3/4 of them)."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.seed = seed
    config.method = method
    config.method_kwargs.update(kwargs)
    if method == "ablated" and _VOTER_EPOCHS.value:
      config.num_epochs = _VOTER_EPOCHS.value
      config.optimizer.decay_epochs = (max(1, _VOTER_EPOCHS.value * 3 // 4),)
    if run in LIPSCHITZ_RUNS:
      embedded.use_lipschitz_encoders(config)
    if kept_indicator:
      for encoder in config.model.encoders.values():
        encoder.kept_indicator = True
  return config


def trained(base, seed: int, run: str, method: str, **kwargs):
  """`(model, variables, splits)` of run `<workdir>/seed<seed>/<run>`: trained, or
  resumed or reused when the workdir holds the same run (a run with another
  config is refused, naming the fields that differ)."""
  workdir = os.path.join(_WORKDIR.value, f"seed{seed}", run)
  loop.train_and_evaluate(run_config(base, seed, run, method, **kwargs), workdir)
  _, model, variables, splits = restore.restore_run(workdir)
  return model, variables, splits


def batches(x, y):
  """`(inputs, labels)` batches of `--batch_size` examples, in order."""
  size = _BATCH.value
  for start in range(0, len(y), size):
    yield {m: v[start:start + size] for m, v in x.items()}, y[start:start + size]


def joined(parts):
  return jax.tree_util.tree_map(lambda *a: np.concatenate([np.asarray(v) for v in a]), *parts)


def logits_of(model, variables):
  return jax.jit(lambda v: model.apply(variables, v).logits)


def vote_certificate(certify_fn, logits_fn, x, y, key, name, **options):
  """A voting certificate over the batches (joined) and seconds per example."""
  start = time.perf_counter()
  parts = [certify_fn(logits_fn, xb, yb, key=jax.random.fold_in(key, i),
                      progress=f"{name} {i + 1}/{-(-len(y) // _BATCH.value)}", **options)
           for i, (xb, yb) in enumerate(batches(x, y))]
  return joined(parts), (time.perf_counter() - start) / len(y)


def vote_options(num_samples: int) -> dict:
  return dict(num_samples=num_samples, num_selection=_NUM_SELECTION.value, alpha=_ALPHA.value,
              chunk_size=_CHUNK.value)


def empirical(logits_fn, x, y, key, *, transform=None) -> dict[str, float]:
  """Accuracy clean, under PGD, decoupling and each missing modality: of the
  base classifier (`transform` None) or of the voter (EOT surrogate, PREDICT)."""
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

  count = int(math.floor(_DECOUPLING.value * sum(ablation.entry_counts(x).values())))
  result = {"clean (as attacked)": [], "pgd": [], "decoupling": [],
            **{f"missing {m}": [] for m in sorted(x)}}
  for i, (xb, yb) in enumerate(batches(x, y)):
    xb = {m: jnp.asarray(v) for m, v in xb.items()}
    yb = jnp.asarray(yb)
    result["clean (as attacked)"].append(classify(xb) == np.asarray(yb))
    adv = attacks.pgd(target, xb, yb, jax.random.fold_in(key, 3 + i), eps=_PGD_EPS.value,
                      steps=_STEPS.value, loss="margin")
    result["pgd"].append(classify(adv) == np.asarray(yb))
    adv = attacks.decoupling(target, xb, yb, jax.random.fold_in(key, 1000 + i), count=count,
                             rounds=_ROUNDS.value, steps_per_round=_DECOUPLING_STEPS.value,
                             max_change=_MAX_CHANGE.value)
    result["decoupling"].append(classify(adv) == np.asarray(yb))
    for m in sorted(x):
      result[f"missing {m}"].append(classify(attacks.drop_modality(xb, m)) == np.asarray(yb))
  return {name: float(np.mean(np.concatenate(v))) for name, v in result.items()}


def accuracy_at(values, correct, thresholds) -> list[float]:
  """Fraction of examples with `correct` and `values >= t`, for each threshold `t`."""
  at = curves.certified_at(np.asarray(values), np.asarray(correct, bool),
                           np.asarray(thresholds, np.float64))
  return [float(v) for v in at.mean(axis=1)]


def missing_certified(cert, x) -> dict[str, float]:
  """modality -> fraction certified to survive losing it (`threats.missing_certified`:
  the modality-m radius beyond `||x_m - 0||`)."""
  certified = threats.missing_certified(cert, x)
  return {m: float(np.mean(certified[m])) for m in sorted(x)}


def changed_budgets(sizes) -> list[int]:
  """The changed-entry columns: `floor(f n)` for each `--certified_fractions` f."""
  n = sum(sizes.values())
  return [int(math.floor(float(f) * n)) for f in _FRACTIONS.value]


def sound_row(name, model, variables, x, y, key, radii, grid) -> dict:
  """CRMT's sound certificate and the attacks on the model."""
  first = {m: v[:1] for m, v in x.items()}
  start = time.perf_counter()
  constants = certify_lib.lipschitz_constants(model, variables, first, "sound")
  cert = certify_lib.concatenate([
      certify_lib.certify(model, variables, xb, yb, "sound", constants=constants)
      for xb, yb in batches(x, y)])
  seconds = (time.perf_counter() - start) / len(y)
  radius, correct = np.asarray(cert.radius), np.asarray(cert.correct)
  return {"model": name, "certificate": "sound (deterministic)", "clean (certifier)":
          float(correct.mean()), "l2": accuracy_at(radius, correct, radii), "changed": None,
          "missing certified": missing_certified(cert, x),
          "l2_curve": accuracy_at(radius, correct, grid), "seconds": seconds,
          **empirical(logits_of(model, variables), x, y, key)}


def smoothing_row(sigma, model, variables, x, y, key, radii, grid) -> dict:
  """Randomized smoothing at `sigma` and the attacks on the smoothed classifier."""
  logits_fn = logits_of(model, variables)
  certify_fn = lambda f, xb, yb, **kw: smoothing.certify(f, xb, yb, sigma, **kw)
  cert, seconds = vote_certificate(certify_fn, logits_fn, x, y, key, f"sigma={sigma:g}",
                                   **vote_options(_NUM_SAMPLES.value))
  transform = smoothing.gaussian_noise(tuple((m, sigma) for m in sorted(x)))
  return {"model": f"gaussian_aug σ={sigma:g}", "certificate": f"smoothing σ={sigma:g}",
          "clean (certifier)": float(cert.correct.mean()),
          "l2": accuracy_at(cert.radius, cert.correct, radii), "changed": None,
          "missing certified": missing_certified(cert, x),
          "l2_curve": accuracy_at(cert.radius, cert.correct, grid), "seconds": seconds,
          **empirical(logits_fn, x, y, key, transform=transform)}


def ablation_certificate(model, variables, keep, x, y, key, num_samples: int):
  """`(certificate, seconds per example)` of the ablation voter."""
  certify_fn = lambda f, xb, yb, **kw: ablation.certify(f, xb, yb, keep, **kw)
  return vote_certificate(certify_fn, logits_of(model, variables), x, y, key,
                          f"ablation {ablation.keep_label(keep)}", **vote_options(num_samples))


def ablation_row(keep, model, variables, x, y, key) -> dict:
  """The ablation certificate and the attacks on the voter."""
  cert, seconds = ablation_certificate(model, variables, keep, x, y, key, _NUM_SAMPLES.value)
  sizes = ablation.entry_counts(x)
  transform = ablation.ablation(tuple(sorted(keep.items())))
  counts = np.arange(0, max(int(cert.total.max()), 1) + 2)
  return {"model": f"ablated {ablation.keep_label(keep)}",
          "certificate": "ablation (" + ", ".join(f"k_{m}={k}" for m, k in keep.items()) + ")",
          "clean (certifier)": float(cert.correct.mean()), "l2": None,
          "changed": accuracy_at(cert.total, cert.correct, changed_budgets(sizes)),
          "missing certified": {m: accuracy_at(cert.per_modality[m], cert.correct, [n])[0]
                                for m, n in sizes.items()},
          "changed_curve": {"counts": counts.tolist(),
                            "any split": accuracy_at(cert.total, cert.correct, counts),
                            **{f"{m} alone": accuracy_at(cert.per_modality[m], cert.correct,
                                                         counts) for m in sorted(keep)}},
          "seconds": seconds,
          **empirical(logits_of(model, variables), x, y, key, transform=transform)}


def defence_row(method, model, variables, x, y, key) -> dict:
  """An empirical defence: the attacks on the model, no certificate."""
  empirical_row = empirical(logits_of(model, variables), x, y, key)
  return {"model": method, "certificate": "none (empirical)",
          "clean (certifier)": None, "l2": None, "changed": None, "missing certified": None,
          "seconds": None, **empirical_row}


def keep_settings(base, sizes) -> list[dict[str, int]]:
  """The `--keep` settings checked against the entry counts (or the config's)."""
  if not _KEEP.value:
    kwargs = base.method_kwargs
    spec = kwargs.get("ablation_keep_counts")
    if spec is not None:
      return [ablation.check_keep(ablation.parse_keep(spec), sizes)]
    return [ablation.keep_counts(sizes, kwargs.ablation_keep_fraction)]
  return [ablation.check_keep(ablation.parse_keep(spec), sizes) for spec in _KEEP.value]


def ablation_run(keep) -> tuple[str, dict]:
  """`(run name, method kwargs)` of the voter keeping `keep`."""
  label = ablation.keep_label(keep)
  return "ablated_" + label.replace(":", "").replace(",", "_"), {"ablation_keep_counts": label}


def sweep_keep(base, settings, key) -> tuple[dict[str, int], list[dict]]:
  """The `--keep` setting with the highest validation certified accuracy averaged
  over the table's changed-entry budgets (ties: the more accurate voter), with
  every setting's scores."""
  scores = []
  for keep in settings:
    run, kwargs = ablation_run(keep)
    model, variables, splits = trained(base, 0, run, "ablated",
                                       kept_indicator=_KEPT_INDICATOR.value, **kwargs)
    val = splits["validation"]
    x = {m: np.asarray(v) for m, v in val.inputs.items()}
    y = np.asarray(val.labels)
    path = os.path.join(_WORKDIR.value, "seed0", run, "validation_certificate.json")
    settings_key = {"keep": keep, "voter_epochs": _VOTER_EPOCHS.value,
                    "samples": _SWEEP_SAMPLES.value, "alpha": _ALPHA.value,
                    "selection": _NUM_SELECTION.value, "examples": len(y)}
    result = files.read_result(path, settings_key)
    if result is None:
      cert, _ = ablation_certificate(model, variables, keep, x, y, key, _SWEEP_SAMPLES.value)
      budgets = changed_budgets(ablation.entry_counts(x))
      result = files.write_result(path, settings_key, {
          "keep": keep, "voter accuracy": float(cert.correct.mean()),
          "certified": dict(zip(map(str, budgets), accuracy_at(cert.total, cert.correct,
                                                               budgets)))})
    scores.append(result)
  best = max(scores, key=lambda s: (np.mean(list(s["certified"].values())),
                                     s["voter accuracy"]))
  return best["keep"], scores


def seed_rows(base, seed: int, keep, radii, grid) -> list[dict]:
  """Every row of one seed on the test split (cached in `<workdir>/seed<k>/rows.json`)."""
  settings_key = {"flags": {f.name: f.value for f in (
      _SIGMAS, _KEEP, _KEPT_INDICATOR, _VOTER_EPOCHS, _DEFENCES, _MAX_EXAMPLES, _NUM_SAMPLES, _NUM_SELECTION,
      _ALPHA, _RADII, _FRACTIONS, _PGD_EPS, _STEPS, _DECOUPLING, _ROUNDS, _DECOUPLING_STEPS,
      _MAX_CHANGE, _EOT)}, "keep": keep}
  path = os.path.join(_WORKDIR.value, f"seed{seed}", "rows.json")
  cached = files.read_result(path, settings_key)
  if cached is not None:
    return cached
  key = jax.random.PRNGKey(seed)
  rows, x, y = [], None, None
  for run in ("crmt", "crmt_cert"):
    model, variables, splits = trained(base, seed, run, run)
    if x is None:
      test = splits["test"]
      n = _MAX_EXAMPLES.value or len(test.labels)
      x = {m: np.asarray(v[:n]) for m, v in test.inputs.items()}
      y = np.asarray(test.labels[:n])
    name = f"{run} ({'1-Lipschitz' if run in LIPSCHITZ_RUNS else 'free'} encoders)"
    rows.append(sound_row(name, model, variables, x, y, key, radii, grid))
  for sigma in (float(s) for s in _SIGMAS.value):
    model, variables, _ = trained(base, seed, f"gaussian_aug_{sigma:g}", "gaussian_aug",
                                  noise_sigma=sigma)
    rows.append(smoothing_row(sigma, model, variables, x, y, key, radii, grid))
  run, kwargs = ablation_run(keep)
  model, variables, _ = trained(base, seed, run, "ablated",
                                kept_indicator=_KEPT_INDICATOR.value, **kwargs)
  rows.append(ablation_row(keep, model, variables, x, y, key))
  for method in _DEFENCES.value:
    model, variables, _ = trained(base, seed, method, method)
    rows.append(defence_row(method, model, variables, x, y, key))
  return files.write_result(path, settings_key, rows)


def write_plots(per_seed, grid, dataset):
  """Seed-mean certified accuracy against the l2 radius and the changed entries."""
  l2_curves, changed_curves = {}, {}
  for i, row in enumerate(per_seed[0]):
    if "l2_curve" in row:
      l2_curves[row["certificate"] if "sound" not in row["certificate"] else row["model"]] = (
          np.asarray(grid), np.mean([rows[i]["l2_curve"] for rows in per_seed], axis=0))
    if "changed_curve" in row:
      length = min(len(rows[i]["changed_curve"]["counts"]) for rows in per_seed)
      for name in row["changed_curve"]:
        if name != "counts":
          changed_curves[f"ablation: {name}"] = (
              np.arange(length, dtype=np.float32),
              np.mean([rows[i]["changed_curve"][name][:length] for rows in per_seed], axis=0))
  files.write_atomic(os.path.join(_WORKDIR.value, "certified_accuracy_l2.png"),
                     lambda f: plots.plot_certified_accuracy(
                         l2_curves, f, title=f"{dataset}: certified accuracy vs joint l2 radius"))
  files.write_atomic(os.path.join(_WORKDIR.value, "certified_accuracy_changed.png"),
                     lambda f: plots.plot_certified_accuracy(
                         changed_curves, f, xlabel="changed entries",
                         title=f"{dataset}: ablation certificate"))


def main(argv):
  del argv
  base = _CONFIG.value
  radii = [float(r) for r in _RADII.value]
  grid = [float(r) for r in certify_lib.radius_grid(3.0, 121)]
  seeds = [int(s) for s in _SEEDS.value]
  _, _, splits = trained(base, seeds[0], "crmt", "crmt")
  sizes = ablation.entry_counts(splits["test"].inputs)
  modalities = sorted(sizes)
  settings = keep_settings(base, sizes)
  sweep = None
  if len(settings) > 1:
    keep, sweep = sweep_keep(base, settings, jax.random.PRNGKey(1))
  else:
    keep = settings[0]
  per_seed = [seed_rows(base, seed, keep, radii, grid) for seed in seeds]
  rows = certified_report.probabilistic_rows(per_seed, modalities)
  budgets = changed_budgets(sizes)
  _, ceiling = ablation.certified_counts(np.ones(1), sizes, keep)
  table = certified_report.probabilistic_markdown(rows, radii, budgets, modalities)
  dataset = base.dataset
  examples = min(_MAX_EXAMPLES.value or len(splits["test"].labels), len(splits["test"].labels))
  note = (f"\n{dataset}, seeds {seeds}, {examples} test examples, alpha={_ALPHA.value:g}, "
          f"n={_NUM_SAMPLES.value} votes; keep {ablation.keep_label(keep)} certifies at most "
          f"{int(ceiling[0])} changed entries (any split) even with unanimous votes. "
          "Cells: mean ± sample std over the seeds.\n")
  print(note + "\n" + table)
  report = {"dataset": dataset, "seeds": seeds, "examples": examples, "radii": radii,
            "changed_entries": budgets, "sizes": sizes, "keep": keep,
            "keep_ceiling": int(ceiling[0]), "keep_sweep": sweep, "rows": rows,
            "per_seed": per_seed}
  stem = os.path.join(_WORKDIR.value, f"probabilistic_{dataset}")
  files.write_json_atomic(stem + ".json", report)
  files.write_text_atomic(stem + ".md", note + "\n" + table)
  if sweep is not None:
    files.write_text_atomic(os.path.join(_WORKDIR.value, "keep_sweep.md"),
                            certified_report.keep_sweep_markdown(sweep, keep))
  write_plots(per_seed, grid, dataset)
  index = cli.record_in_index(
      _WORKDIR.value, f"compare_probabilistic on {dataset}", [_WORKDIR.value],
      config=base, key="compare_probabilistic")
  print(f"index of the reports and figures: {index}")


if __name__ == "__main__":
  cli.run(main)
