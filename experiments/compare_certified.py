r"""Sound certified accuracy per threat: methods tuned on validation, over seeds, with intervals.

  python -m experiments.compare_certified --config=experiments/configs/embedded.py:mfeat \
      --methods=jt,jt_cert,ojt_cert,crmt_cert --encoders=lipschitz --seeds=0,1,2,3,4 \
      --grid=jt_cert:cert_eps=2,3,4:cert_temperature=2,4 \
      --grid=ojt_cert:cert_eps=2,3,4:cert_temperature=2,4 \
      --grid=crmt_cert:cert_eps=2,3,4:cert_temperature=2,4 \
      --control=jt_cert --workdir=/tmp/mmsafe/certified_mfeat

Methods are registry names or labels of `--variant`s, a method with fixed
`method_kwargs` (`--variant=crmt_cert_uni=crmt_cert:cert_uni_weight=1`).
A `--grid` on a label tunes those `method_kwargs` on the *validation* split:
every grid point trains with seed `--tune_seed` and is scored by its sound
certified accuracy at `--radii`, averaged over the joint and the
worst-modality threats; the best point then runs every seed. The report
gives each method's number of grid points: equal grids give every tuned
method the same budget.

Every (encoders, label, setting, seed) trains in
`<workdir>/<encoders>/<label>/<setting>/seed_<s>` (resumable): "free" uses
`config.model.encoders`, "lipschitz" the 1-Lipschitz
`config.model.lipschitz_encoders` (the certificate-trained methods run with
these only). The selected model is certified on the test split with `sound`
constants (`mmsafe.certify.threats`), radii in `--units` (default "input":
the units a user perturbs, raw features or pixel/255, `mmsafe.certify.units`;
"normalised": the model's standardised inputs; `--radii` are in those units):
the joint radius (Thm 3.3 / Thm 3.5),
each modality's uni-modal radius (Prop. 3.4), the worst modality's, and the
certified missing-modality outcome (`r^(m)(x) > ||x_m - fill_m||`, fill the
training mean: "zeros"), beside the measured accuracy with that modality
zeroed. Every joint and uni-modal radius is attacked, in the radii's units:
l2-PGD with margin loss,
`--attack_steps` steps of 2.5 r/steps and `--attack_restarts` random restarts
inside `(1 - 1e-4) r(x)`, in all modalities or in the one modality (a success
would be a bug and is reported as "broken"). Results are kept in each run's
workdir, so an interrupted comparison resumes where it stopped.

Writes `<results_dir>/certified_<dataset>[_<modalities>].{md,json,png}`
(default `results_dir`: the workdir; the modalities when
`config.data.modalities` names them): per method, clean and certified accuracy per
threat as mean ± sample std (ddof = 1) over seeds, seed-paired differences to
`--control` with 95% intervals over seeds and test examples
(`mmsafe.eval.statistics`), the tuning table, and certified accuracy against
the radius (joint: solid, worst modality: dashed).
"""

from __future__ import annotations

import itertools
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from experiments import certified_report
from experiments import cli
from experiments.configs import embedded
from mmsafe import attacks
from mmsafe import certify as certify_lib
from mmsafe import data as data_lib
from mmsafe import files
from mmsafe import methods
from mmsafe.certify import threats
from mmsafe.eval import plots
from mmsafe.eval import report
from mmsafe.eval.certification import Certification
from mmsafe.train import loop, restore

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding every run.")
_RESULTS_DIR = flags.DEFINE_string("results_dir", None, "Where the md/json/png go "
                                   "(default: --workdir).")
_METHODS = flags.DEFINE_list("methods", ["jt", "ojt", "crmt", "crmt_at", "crmt_cert"],
                             "Methods (registry names or --variant labels) to train and "
                             "certify.")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "label=method:key=value[:key=value...]: a "
                                      "method with fixed method_kwargs, usable in --methods.")
_GRIDS = flags.DEFINE_multi_string("grid", [], "label:key=v1,v2[:key=v1,v2...]: method_kwargs "
                                   "tuned on the validation split.")
_TUNE_SEED = flags.DEFINE_integer("tune_seed", 0, "Training seed of the tuning runs.")
_CONTROL = flags.DEFINE_string("control", None, "Label the paired differences are taken to.")
_ENCODERS = flags.DEFINE_list("encoders", ["free", "lipschitz"],
                              "Encoder sets: free (model.encoders) and/or lipschitz "
                              "(model.lipschitz_encoders).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_RADII = flags.DEFINE_list("radii", ["0.25", "0.5", "1", "2"],
                           "Radii of the certified-accuracy columns (in --units).")
_UNITS = flags.DEFINE_enum("units", "input", ["input", "normalised"],
                           "Units of the radii: input (what a user perturbs: raw features, "
                           "pixel/255) or normalised (the model's standardised inputs).")
_MAX_RADIUS = flags.DEFINE_float("max_radius", 3.0, "Right end of the plotted radius axis.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Certify the first N test examples "
                                     "(0: all).")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 100, "PGD steps of the soundness check.")
_ATTACK_RESTARTS = flags.DEFINE_integer("attack_restarts", 5, "PGD restarts of the check.")
_ATTACK_EXAMPLES = flags.DEFINE_integer("attack_examples", 0, "Attack the radii of the first N "
                                        "certified examples (0: all).")
flags.mark_flags_as_required(["config", "workdir"])

ENCODER_SETS = {"free": "encoders", "lipschitz": "lipschitz_encoders"}
CERTIFY_DIR = "certify_sound"  # Each run's certification report (and TensorBoard tag).
# Methods whose training step computes the encoders' stated bounds (cheap for
# Lipschitz encoders, an operator norm per convolution and step otherwise):
# trained with Lipschitz encoders only.
LIPSCHITZ_ONLY = ("crmt_cert", "jt_cert", "ojt_cert")


def parse_settings(text: str, field: str, *, lists: bool) -> dict:
  """`key=value[:key=value...]` -> {key: value} (`lists`: comma-separated
  values -> a list); numbers become floats."""
  out = {}
  for item in [part for part in text.split(":") if part]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
      raise app.UsageError(f"{field}: expected key=value, got {item!r} in {text!r}")
    values = [_number(v) for v in value.split(",")]
    out[key] = values if lists else values[0] if len(values) == 1 else values
  return out


def _number(text: str):
  try:
    return float(text)
  except ValueError:
    return text


def parse_variants(specs: list[str]) -> dict[str, tuple[str, dict]]:
  """`--variant` specs -> label -> (method, fixed method_kwargs)."""
  out = {}
  for spec in specs:
    label, sep, rest = spec.partition("=")
    method, _, settings = rest.partition(":")
    if not sep or not label or not method:
      raise app.UsageError(f"--variant: expected label=method:key=value, got {spec!r}")
    methods.get(method)
    out[label] = (method, parse_settings(settings, "--variant", lists=False))
  return out


def parse_grids(specs: list[str]) -> dict[str, list[dict]]:
  """`--grid` specs -> label -> its grid points (dicts of method_kwargs)."""
  out = {}
  for spec in specs:
    label, sep, settings = spec.partition(":")
    if not sep or not label:
      raise app.UsageError(f"--grid: expected label:key=v1,v2, got {spec!r}")
    axes = parse_settings(settings, "--grid", lists=True)
    out[label] = [dict(zip(axes, point)) for point in itertools.product(*axes.values())]
  return out


def run_config(base, method: str, encoders: str, seed: int, kwargs: dict | None = None):
  """The training config of one (method, encoders, seed, method_kwargs) run."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.method = method
    config.seed = seed
    field = ENCODER_SETS[encoders]
    if field not in config.model:
      raise ValueError(f"--encoders={encoders}: the config has no model.{field}")
    if encoders == "lipschitz":
      embedded.use_lipschitz_encoders(config)
    for key, value in (kwargs or {}).items():
      if key not in config.method_kwargs:
        raise ValueError(f"method_kwargs.{key}: not a field of the config; expected one of "
                         f"{sorted(config.method_kwargs)}")
      config.method_kwargs[key] = value
  return config


def _missing_accuracy(model, variables, inputs, labels: np.ndarray, batch_size: int = 200
                      ) -> dict[str, float]:
  """modality -> measured accuracy with that modality replaced by zeros (one
  compiled program per modality and batch shape)."""
  predict = jax.jit(lambda x: jnp.argmax(model.apply(variables, x).logits, -1))
  out = {}
  for m in sorted(inputs):
    correct = []
    for start in range(0, len(labels), batch_size):
      batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
      prediction = np.asarray(predict(attacks.drop_modality(batch, m, "zeros")))
      correct.append(prediction == labels[start:start + batch_size])
    out[m] = float(np.mean(np.concatenate(correct)))
  return out


def certify_run(workdir: str, radii: np.ndarray, grid: np.ndarray, *, split: str = "test",
                max_examples: int, attack_steps: int, attack_restarts: int,
                attack_examples: int = 0, units: str = "input") -> dict:
  """Sound certified accuracy of a trained run per threat, at `radii` and on
  `grid`, the certified and measured missing-modality accuracy, per-example
  radii for paired intervals, and the attack check of every joint and
  uni-modal radius of the first `attack_examples` examples (0: all; none
  with `attack_steps` 0); radii, and attacks, in `units` ("input" or
  "normalised", `mmsafe.certify.units`).

  The result is kept in `<workdir>/certified_sound[_<split>].json` with the
  settings it was computed under, and reused while they are unchanged.
  """
  settings = {"radii": radii.tolist(), "grid": grid.tolist(), "max_examples": max_examples,
              "attack_steps": attack_steps, "attack_restarts": attack_restarts, "version": 3,
              "units": units,
              **({"attack_examples": attack_examples} if attack_examples else {})}
  suffix = "" if split == "test" else f"_{split}"
  cache = os.path.join(workdir, f"certified_sound{suffix}.json")
  cached = files.read_result(cache, settings)
  if cached is not None:
    return cached
  _, model, variables, splits, step = restore.restore_run_and_step(workdir)
  certification = Certification(model, kinds=["sound"], attack_steps=attack_steps,
                                attack_restarts=attack_restarts, units=units)
  dataset = data_lib.in_memory(splits[split], max(max_examples, 0))
  start = time.time()
  results, certificates, labels = certification(variables, dataset, split=split, attack=False)
  cert = certificates["sound"]
  seconds = time.time() - start
  inputs = {m: np.asarray(x) for m, x in dataset.inputs.items()}
  radius_of = threats.threat_radii(cert)
  attack = {}
  if attack_steps > 0:
    n = attack_examples or len(labels)
    head = {m: x[:n] for m, x in inputs.items()}
    for name, modality in [(threats.JOINT, None)] + [(threats.modality_threat(m), m)
                                                     for m in cert.modalities]:
      attack[name] = certification.attack_check(variables, head, labels[:n],
                                                radius_of[name][:n], "sound", modality=modality,
                                                stats=dataset.stats)
    results["kinds"]["sound"]["attack"] = attack[threats.JOINT]
  if split == "test":
    paths = report.write_certification_report(results, os.path.join(workdir, CERTIFY_DIR))
    report.write_events(workdir, CERTIFY_DIR, step, results, paths)
  result = {
      **threat_results(cert, inputs, radius_of, radii, grid, results["input_scale"]),
      "units": results["units"],
      "missing_measured": _missing_accuracy(model, variables, inputs, np.asarray(labels)),
      "encoder_lipschitz": results["kinds"]["sound"]["lipschitz"]["encoder_lipschitz"],
      "attack": {name: {"attacked": a["attacked"], "broken": a["broken"]}
                 for name, a in attack.items()},
      "certify_seconds_per_example": seconds / max(len(labels), 1)}
  return files.write_result(cache, settings, result)


def threat_results(cert, inputs, radius_of: dict, radii: np.ndarray, grid: np.ndarray,
                   input_scale: dict | None = None) -> dict:
  """Clean and certified accuracy per threat (at `radii`, on `grid`), per-example
  outcomes, and the certified missing-modality accuracy (fill: zeros;
  `input_scale`: that of a certificate in input units)."""
  correct = np.asarray(cert.correct)
  accuracy = lambda radius, thresholds: np.asarray(certify_lib.certified_accuracy(
      radius, correct, thresholds)).tolist()
  missing = threats.missing_certified(cert, inputs, input_scale=input_scale)
  return {
      "clean": float(np.mean(correct)), "correct": correct.astype(int).tolist(),
      "threats": {name: {"certified": accuracy(r, radii), "curve": accuracy(r, grid),
                         "mean_radius": float(certify_lib.mean_radius(r)),
                         "radius": np.where(np.isfinite(r), r, 1e9).tolist()}
                  for name, r in radius_of.items()},
      "missing_certified": {m: float(np.mean(v)) for m, v in missing.items()},
      "missing_outcomes": {m: v.astype(int).tolist() for m, v in missing.items()}}


def validation_score(result: dict) -> float:
  """The tuning criterion: certified accuracy at the radii, averaged over the
  joint and the worst-modality threats."""
  return float(np.mean([result["threats"][t]["certified"]
                        for t in (threats.JOINT, threats.WORST_MODALITY)]))


class Study:
  """Trains, tunes and certifies the runs of one encoder set (see the module docstring)."""

  def __init__(self, base, encoders: str, variants: dict, grids: dict, *, radii, grid):
    self.base, self.encoders, self.variants, self.grids = base, encoders, variants, grids
    self.radii, self.grid = radii, grid

  def method_of(self, label: str) -> tuple[str, dict]:
    return self.variants.get(label, (label, {}))

  def run(self, label: str, kwargs: dict, seed: int, *, split: str = "test") -> dict:
    method, fixed = self.method_of(label)
    workdir = os.path.join(_WORKDIR.value, self.encoders, label,
                           certified_report.setting_key(kwargs), f"seed_{seed}")
    loop.train_and_evaluate(run_config(self.base, method, self.encoders, seed,
                                       {**fixed, **kwargs}), workdir)
    test = split == "test"
    return certify_run(workdir, self.radii, self.grid, split=split,
                       max_examples=_MAX_EXAMPLES.value if test else 0,
                       attack_steps=_ATTACK_STEPS.value if test else 0,
                       attack_restarts=_ATTACK_RESTARTS.value,
                       attack_examples=_ATTACK_EXAMPLES.value, units=_UNITS.value)

  def tune(self, label: str) -> tuple[dict, list[dict]]:
    """The best grid point of `label` on validation, and every point's score."""
    points = self.grids.get(label, [{}])
    if len(points) == 1:
      return points[0], []
    scored = [{"kwargs": p, "score": validation_score(
        self.run(label, p, _TUNE_SEED.value, split="validation"))} for p in points]
    best = max(range(len(scored)), key=lambda i: scored[i]["score"])
    return points[best], scored


def check_flags(variants: dict, grids: dict) -> None:
  """Bad method, variant or encoder-set names fail before any training starts."""
  unknown = sorted(set(_ENCODERS.value) - set(ENCODER_SETS))
  if unknown:
    raise app.UsageError(f"--encoders: expected a subset of {sorted(ENCODER_SETS)}, got {unknown}")
  for label in _METHODS.value:
    if label not in variants:
      methods.get(label)
  for label in list(grids) + ([_CONTROL.value] if _CONTROL.value else []):
    if label not in _METHODS.value:
      raise app.UsageError(f"--grid/--control: {label!r} is not in --methods {_METHODS.value}")


def main(argv):
  del argv  # (positional arguments are refused by cli.run)
  variants, grids = parse_variants(_VARIANTS.value), parse_grids(_GRIDS.value)
  check_flags(variants, grids)
  radii = np.asarray([float(r) for r in _RADII.value], np.float32)
  grid = certify_lib.radius_grid(_MAX_RADIUS.value, 121)
  seeds = [int(s) for s in _SEEDS.value]
  rows = []
  for encoders in _ENCODERS.value:
    study = Study(_CONFIG.value, encoders, variants, grids, radii=radii, grid=grid)
    for label in _METHODS.value:
      method, fixed = study.method_of(label)
      if encoders != "lipschitz" and method in LIPSCHITZ_ONLY:
        continue
      kwargs, tuning = study.tune(label)
      runs = [study.run(label, kwargs, seed) for seed in seeds]
      rows.append({"encoders": encoders, "method": label, "base_method": method,
                   "kwargs": {**fixed, **kwargs}, "tuning": tuning, "seed_list": seeds,
                   **certified_report.aggregate(runs)})
  write_results(rows, radii, grid, seeds)


def write_results(rows: list[dict], radii: np.ndarray, grid: np.ndarray, seeds: list[int]):
  """The md/json/png of the comparison, and the index entry."""
  dataset = _CONFIG.value.dataset
  if _CONFIG.value.data.modalities:  # Not the dataset's default pair.
    dataset = f"{dataset}_{'+'.join(_CONFIG.value.data.modalities)}"
  out_dir = _RESULTS_DIR.value or _WORKDIR.value
  differences = certified_report.paired_differences(rows, _CONTROL.value, radii)
  header = (f"{dataset}, test split, {len(seeds)} seed(s), sound certificates checked by "
            f"l2-PGD ({_ATTACK_STEPS.value} steps x {_ATTACK_RESTARTS.value} restarts, "
            f"joint and one modality at a time)")
  table = certified_report.markdown(rows, radii, differences, _CONTROL.value, header)
  print(f"\n{table}")
  name = f"certified_{dataset}"
  files.write_json_atomic(os.path.join(out_dir, f"{name}.json"),
                          {"dataset": dataset, "radii": radii.tolist(), "grid": grid.tolist(),
                           "seeds": seeds, "control": _CONTROL.value,
                           "rows": certified_report.json_rows(rows),
                           "differences": differences})
  files.write_text_atomic(os.path.join(out_dir, f"{name}.md"), table)
  curves, styles, colors = {}, {}, {}
  for i, row in enumerate(rows):
    for threat, style in ((threats.JOINT, "-"), (threats.WORST_MODALITY, "--")):
      key = f"{row['method']} ({row['encoders']}, {threat.replace('_', ' ')})"
      curves[key] = (grid, row["threats"][threat]["curve"])
      styles[key], colors[key] = style, f"C{i % 10}"
  files.write_atomic(os.path.join(out_dir, f"{name}.png"),
                     lambda f: plots.plot_certified_accuracy(
                         curves, f, title=f"{dataset}: sound certified accuracy, mean of "
                         f"{len(seeds)} seeds\n(solid: joint l2, dashed: worst modality)",
                         linestyles=styles, colors=colors))
  index = cli.record_in_index(
      _WORKDIR.value, f"compare_certified {', '.join(_METHODS.value)} on {dataset}",
      [out_dir], config=_CONFIG.value, key="compare_certified")
  print(f"index of the reports and figures: {index}")


if __name__ == "__main__":
  cli.run(main)
