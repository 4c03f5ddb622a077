r"""Randomized smoothing at its best vs mmsafe's deterministic certificates, per example and time.

  python -m experiments.compare_smoothing --config=experiments/configs/embedded.py:mfeat \
      --sigmas=0.25,0.5,1 --seeds=0,1,2 --num_samples=10000 --alpha=0.001 \
      --deterministic=crmt_cert=/tmp/mmsafe/certified_mfeat/lipschitz/crmt_cert/<setting> \
      --workdir=/tmp/mmsafe/smoothing_mfeat

Smoothing (Cohen, Rosenfeld & Kolter, ICML 2019) as they report it: a model
trained with Gaussian data augmentation at each sigma (`gaussian_aug`, trained
in `<workdir>/sigma_<sigma>/seed_<s>`, resumable), CERTIFY with `n_0 = 100`
selection votes, `--num_samples` estimation votes and failure probability
`--alpha`, and at each radius the best sigma (the envelope over sigmas of the
seed-mean certified accuracy, chosen on the test split: an optimistic
choice in smoothing's favour). An abstention counts as not certified.

Radii are in `--units` ("input", the default: the units a user perturbs,
raw features or pixel/255, `mmsafe.certify.units`; "normalised": the model's
standardised inputs); the deterministic runs must state the same units.

Deterministic rows come from `experiments.compare_certified` runs:
`--deterministic=label=<dir>` reads `<dir>/seed_<s>/certified_sound.json`
(the same test examples, in the same order; its per-example joint and
worst-modality radii and its certification time per example).

Writes `<results_dir>/smoothing_<dataset>.{md,json,png}` (default: the
workdir): certified accuracy at `--radii` per sigma, smoothing's best, each
deterministic certificate, the seed-paired difference of each deterministic
certificate to smoothing's best with a 95% interval over seeds, and seconds
of certification per example.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from experiments import certified_report
from experiments import cli
from mmsafe import data as data_lib
from mmsafe import files
from mmsafe.certify import smoothing
from mmsafe.certify import units as units_lib
from mmsafe.eval import plots
from mmsafe.eval import statistics
from mmsafe.train import loop, restore

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding the smoothing runs.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where the md/json/png go "
                                   "(default: --workdir).")
_SIGMAS = flags.DEFINE_list("sigmas", ["0.25", "0.5", "1"], "Noise levels (train and certify).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_DETERMINISTIC = flags.DEFINE_multi_string("deterministic", [], "label=<compare_certified run "
                                           "directory holding seed_<s>/>.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "First N test examples (0: all).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 10000, "Votes bounding p_A.")
_ALPHA = flags.DEFINE_float("alpha", 0.001, "Failure probability of the certificate.")
_CHUNK = flags.DEFINE_integer("chunk_size", 500, "Noisy copies per program call.")
_RADII = flags.DEFINE_list("radii", ["0.25", "0.5", "1", "2"], "l2 radii of the table "
                           "(in --units).")
_UNITS = flags.DEFINE_enum("units", "input", ["input", "normalised"],
                           "Units of the radii: input (what a user perturbs: raw features, "
                           "pixel/255) or normalised (the model's standardised inputs).")
flags.mark_flags_as_required(["config", "workdir"])


def smoothing_run(base, sigma: float, seed: int, radii: np.ndarray) -> dict:
  """Trains `gaussian_aug` at `sigma` (unless finished) and certifies the test
  examples by CERTIFY at `sigma` (radii in `--units`); kept in the run's
  `smoothing.json`."""
  workdir = os.path.join(_WORKDIR.value, f"sigma_{sigma:g}", f"seed_{seed}")
  settings = {"num_samples": _NUM_SAMPLES.value, "alpha": _ALPHA.value,
              "max_examples": _MAX_EXAMPLES.value, "radii": radii.tolist(),
              "units": _UNITS.value}
  cache = os.path.join(workdir, "smoothing.json")
  cached = files.read_result(cache, settings)
  if cached is not None:
    return cached
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.method, config.seed = "gaussian_aug", seed
    config.method_kwargs.noise_sigma = sigma
  loop.train_and_evaluate(config, workdir)
  _, model, variables, splits = restore.restore_run(workdir)
  test = data_lib.in_memory(splits["test"], max(_MAX_EXAMPLES.value, 0))
  inputs = {m: np.asarray(x) for m, x in test.inputs.items()}
  logits_fn = jax.jit(lambda x: model.apply(variables, x).logits)
  input_scale = (units_lib.input_scales(test.stats) if _UNITS.value == units_lib.INPUT
                 else None)
  start = time.perf_counter()
  cert = smoothing.certify(logits_fn, inputs, np.asarray(test.labels), sigma,
                           jax.random.PRNGKey(seed), num_samples=_NUM_SAMPLES.value,
                           alpha=_ALPHA.value, chunk_size=_CHUNK.value,
                           progress=f"CERTIFY sigma={sigma:g} seed {seed}",
                           input_scale=input_scale)
  seconds = (time.perf_counter() - start) / len(test.labels)
  result = {"radius": np.where(np.asarray(cert.correct), np.asarray(cert.radius), 0.0).tolist(),
            "abstained": float(np.mean(np.asarray(cert.prediction) == smoothing.ABSTAIN)),
            "seconds_per_example": seconds,
            "units": units_lib.describe(_UNITS.value, test.stats)}
  return files.write_result(cache, settings, result)


def deterministic_run(directory: str, seed: int, num_examples: int, units: str) -> dict:
  """A compare_certified run's per-example joint radii (0 where not correct)
  on the first `num_examples` test examples, and its time per example; its
  radii must be in `units` (words, `units.describe`; a run that does not say
  is in normalised input space)."""
  with open(os.path.join(directory, f"seed_{seed}", "certified_sound.json")) as f:
    result = json.load(f)["result"]
  stated = result.get("units", units_lib.describe(units_lib.NORMALISED))
  if stated != units:
    raise ValueError(f"--deterministic {directory}: radii in {stated}, expected {units} "
                     f"(compare_certified --units)")
  correct = np.asarray(result["correct"], bool)
  radius = np.asarray(result["threats"]["joint"]["radius"])
  if len(radius) < num_examples:
    raise ValueError(f"--deterministic {directory}: certified {len(radius)} test examples, "
                     f"expected >= {num_examples}")
  return {"radius": np.where(correct, radius, 0.0)[:num_examples].tolist(),
          "seconds_per_example": result["certify_seconds_per_example"]}


def parse_deterministic(specs: list[str]) -> dict[str, str]:
  out = {}
  for spec in specs:
    label, sep, directory = spec.partition("=")
    if not sep or not label or not os.path.isdir(directory):
      raise app.UsageError(f"--deterministic: expected label=<existing directory>, got {spec!r}")
    out[label] = directory
  return out


def main(argv):
  del argv
  deterministic = parse_deterministic(_DETERMINISTIC.value)
  radii = np.asarray([float(r) for r in _RADII.value])
  sigmas = [float(s) for s in _SIGMAS.value]
  seeds = [int(s) for s in _SEEDS.value]
  smoothed = {s: [smoothing_run(_CONFIG.value, s, seed, radii) for seed in seeds]
              for s in sigmas}
  num_examples = len(smoothed[sigmas[0]][0]["radius"])
  units = smoothed[sigmas[0]][0]["units"]
  exact = {label: [deterministic_run(d, seed, num_examples, units) for seed in seeds]
           for label, d in deterministic.items()}
  # outcomes[name]: [S, T, N]
  runs_of = {**{f"smoothing σ={s:g}": runs for s, runs in smoothed.items()}, **exact}
  outcomes = {name: np.stack([certified_report.certified(r["radius"], radii) for r in runs])
              for name, runs in runs_of.items()}
  means = {name: o.mean(axis=(0, 2)) for name, o in outcomes.items()}
  best, envelope = certified_report.best_sigma_envelope(
      {s: outcomes[f"smoothing σ={s:g}"] for s in sigmas})
  seconds = {name: float(np.mean([r["seconds_per_example"] for r in runs]))
             for name, runs in runs_of.items()}
  differences = {}
  if len(seeds) >= 2:
    differences = {label: [statistics.paired_difference(outcomes[label][:, t], envelope[:, t])
                           .to_dict() for t in range(len(radii))] for label in exact}
  write_results(radii, seeds, num_examples, means, envelope.mean(axis=(0, 2)), best, seconds,
                differences, {s: float(np.mean([r["abstained"] for r in runs]))
                              for s, runs in smoothed.items()}, units)


def write_results(radii, seeds, num_examples, means, envelope, best, seconds, differences,
                  abstained, units):
  dataset = _CONFIG.value.dataset
  out_dir = _RESULTS_DIR.value or _WORKDIR.value
  header = ["certificate"] + [f"r={r:g}" for r in radii] + ["seconds / example"]
  lines = [[name] + [f"{v:.3f}" for v in means[name]] + [f"{seconds[name]:.4g}"]
           for name in means]
  lines.append(["smoothing, best σ per radius"] + [f"{v:.3f} (σ={s:g})"
                                                   for v, s in zip(envelope, best)] + ["-"])
  table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  table += ["| " + " | ".join(cells) + " |" for cells in lines]
  text = [f"# {dataset}: sound deterministic certificates vs randomized smoothing",
          "", f"Certified accuracy (joint l2, in {units}) on the first "
          f"{num_examples} test examples, mean of {len(seeds)} seed(s); smoothing: CERTIFY with "
          f"n = {_NUM_SAMPLES.value}, alpha = {_ALPHA.value:g}, abstentions not certified "
          f"(abstained: " + ", ".join(f"σ={s:g} {a:.3f}" for s, a in abstained.items()) + ").",
          ""] + table
  if differences:
    text += ["", "Deterministic minus smoothing's best, seed-paired, mean [95% interval over "
             "seeds and examples]:", "",
             "| certificate | " + " | ".join(f"r={r:g}" for r in radii) + " |",
             "|" + "---|" * (len(radii) + 1)]
    text += ["| " + label + " | " + " | ".join(statistics.Interval(**d).text() for d in ds)
             + " |" for label, ds in differences.items()]
  text = "\n".join(text) + "\n"
  print(f"\n{text}")
  name = f"smoothing_{dataset}"
  files.write_json_atomic(os.path.join(out_dir, f"{name}.json"), {
      "dataset": dataset, "radii": radii.tolist(), "units": units, "seeds": seeds,
      "num_examples": num_examples,
      "num_samples": _NUM_SAMPLES.value, "alpha": _ALPHA.value,
      "certified": {n: v.tolist() for n, v in means.items()},
      "smoothing_best": {"certified": envelope.tolist(), "sigma": best},
      "seconds_per_example": seconds, "differences": differences, "abstained": abstained})
  files.write_text_atomic(os.path.join(out_dir, f"{name}.md"), text)
  curves = {n: (radii, v) for n, v in means.items()}
  curves["smoothing, best σ"] = (radii, envelope)
  files.write_atomic(os.path.join(out_dir, f"{name}.png"), lambda f: plots.plot_certified_accuracy(
      curves, f, title=f"{dataset}: deterministic vs smoothing (n={_NUM_SAMPLES.value})",
      linestyles={n: "--" for n in curves if n.startswith("smoothing")}))
  cli.record_in_index(_WORKDIR.value, f"compare_smoothing on {dataset}", [out_dir],
                      config=_CONFIG.value, key="compare_smoothing")


if __name__ == "__main__":
  cli.run(main)
