r"""Sound certified accuracy of several methods, free vs Lipschitz encoders, over seeds.

  python -m experiments.compare_certified --config=experiments/configs/embedded.py:mfeat \
      --methods=jt,ojt,crmt,crmt_at,crmt_cert --encoders=free,lipschitz --seeds=0,1,2 \
      --workdir=/tmp/mmsafe/certified_mfeat

Every (encoders, method, seed) trains in `<workdir>/<encoders>/<method>/seed_<s>`
(resumable): "free" uses `config.model.encoders`, "lipschitz" the 1-Lipschitz
`config.model.lipschitz_encoders` (`crmt_cert` runs with these only: its
training step computes the encoders' bounds). The model selected on validation is then
certified on the test split with `sound` constants (certificates: each encoder's
stated bound, the tight Thm 3.5 for orthogonal heads), and every certified
radius is attacked: l2-PGD with margin loss, `--attack_steps` steps of
2.5 r/steps and `--attack_restarts` random restarts inside `(1 - 1e-4) r(x)`
(a success would be a bug and is reported as "broken"). Each run's result is
kept in its workdir, so an interrupted comparison resumes where it stopped.

Writes `<workdir>/certified.{md,json}`: per (encoders, method), clean accuracy
and sound certified accuracy at `--radii` as mean +- std over seeds, the mean
sound radius, the encoders' bounds and broken/attacked counts; and
`<workdir>/certified_accuracy.png`: seed-mean certified accuracy against the
radius, one line per model. Each run's certification report goes to its
`certify_sound/` (and to TensorBoard), and `<workdir>/index.md` links them all.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from experiments import cli
from mmsafe import certify as certify_lib
from mmsafe import files
from mmsafe import methods
from mmsafe.eval import plots
from mmsafe.eval import report
from mmsafe.eval.certification import run_certification
from mmsafe.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding every run.")
_METHODS = flags.DEFINE_list("methods", ["jt", "ojt", "crmt", "crmt_at", "crmt_cert"],
                             "Methods to train and certify.")
_ENCODERS = flags.DEFINE_list("encoders", ["free", "lipschitz"],
                              "Encoder sets: free (model.encoders) and/or lipschitz "
                              "(model.lipschitz_encoders).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds.")
_RADII = flags.DEFINE_list("radii", ["0.25", "0.5", "1", "2"],
                           "Radii of the certified-accuracy columns.")
_MAX_RADIUS = flags.DEFINE_float("max_radius", 3.0, "Right end of the plotted radius axis.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 0, "Certify the first N test examples "
                                     "(0: all).")
_ATTACK_STEPS = flags.DEFINE_integer("attack_steps", 100, "PGD steps of the soundness check.")
_ATTACK_RESTARTS = flags.DEFINE_integer("attack_restarts", 5, "PGD restarts of the check.")
flags.mark_flags_as_required(["config", "workdir"])

ENCODER_SETS = {"free": "encoders", "lipschitz": "lipschitz_encoders"}
CERTIFY_DIR = "certify_sound"  # Each run's certification report (and TensorBoard tag).
# Methods whose training step computes the encoders' stated bounds (cheap for
# Lipschitz encoders, an operator norm per convolution and step otherwise):
# trained with Lipschitz encoders only.
LIPSCHITZ_ONLY = ("crmt_cert",)


def run_config(base, method: str, encoders: str, seed: int):
  """The training config of one (method, encoders, seed) run."""
  config = base.copy_and_resolve_references()
  with config.unlocked():
    config.method = method
    config.seed = seed
    field = ENCODER_SETS[encoders]
    if field not in config.model:
      raise ValueError(f"--encoders={encoders}: the config has no model.{field}")
    config.model.encoders = config.model[field]
  return config


def certify_run(workdir: str, radii: np.ndarray, grid: np.ndarray, *, max_examples: int,
                attack_steps: int, attack_restarts: int) -> dict:
  """Sound certified accuracy of a trained run at `radii` and on `grid`, with
  the attack check of every certified radius.

  The result is kept in `<workdir>/certified_sound.json` with the settings it
  was computed under, and reused while they are unchanged.
  """
  settings = {"radii": radii.tolist(), "grid": grid.tolist(), "max_examples": max_examples,
              "attack_steps": attack_steps, "attack_restarts": attack_restarts}
  cache = os.path.join(workdir, "certified_sound.json")
  if os.path.exists(cache):
    with open(cache) as f:
      cached = json.load(f)
    if cached["settings"] == settings:
      return cached["result"]
  _, model, variables, splits, step = loop.restore_run_and_step(workdir)
  results, certificates, _ = run_certification(
      model, variables, splits, kinds=["sound"], max_examples=max_examples,
      attack_steps=attack_steps, attack_restarts=attack_restarts)
  paths = report.write_certification_report(results, os.path.join(workdir, CERTIFY_DIR))
  report.write_events(workdir, CERTIFY_DIR, step, results, paths)
  cert = certificates["sound"]
  entry = results["kinds"]["sound"]
  accuracy = lambda thresholds: np.asarray(certify_lib.certified_accuracy(
      cert.radius, cert.correct, thresholds)).tolist()
  result = {"clean": float(np.mean(np.asarray(cert.correct))), "certified": accuracy(radii),
            "curve": accuracy(grid), "mean_radius": entry["summary"]["mean_radius"],
            "encoder_lipschitz": entry["lipschitz"]["encoder_lipschitz"],
            "attacked": entry.get("attack", {}).get("attacked", 0),
            "broken": entry.get("attack", {}).get("broken", 0)}
  files.write_json_atomic(cache, {"settings": settings, "result": result})
  return result


def aggregate(runs: list[dict], radii: np.ndarray) -> dict:
  """Mean and std over seeds of one model's certification results."""
  def stats(values):
    return {"mean": float(np.mean(values)), "std": float(np.std(values))}
  return {"clean": stats([r["clean"] for r in runs]),
          "certified": {f"{r:g}": stats([run["certified"][i] for run in runs])
                        for i, r in enumerate(radii)},
          "mean_radius": stats([r["mean_radius"] for r in runs]),
          "curve": np.mean([r["curve"] for r in runs], axis=0).tolist(),
          "attacked": int(sum(r["attacked"] for r in runs)),
          "broken": int(sum(r["broken"] for r in runs)),
          "encoder_lipschitz": {m: float(np.max([r["encoder_lipschitz"][m] for r in runs]))
                                for m in runs[0]["encoder_lipschitz"]},
          "seeds": len(runs)}


def markdown_table(rows: list[dict], radii: np.ndarray) -> str:
  """The comparison as a markdown table (accuracies as mean +- std over seeds)."""
  pm = lambda s: f"{s['mean']:.3f} ± {s['std']:.3f}"
  header = (["encoders", "method", "seeds", "clean"] + [f"sound cert. acc. r={r:g}" for r in radii]
            + ["mean sound radius", "encoder bounds (max)", "broken / attacked"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    bounds = ", ".join(f"{m} {b:.4g}" for m, b in sorted(row["encoder_lipschitz"].items()))
    cells = ([row["encoders"], row["method"], str(row["seeds"]), pm(row["clean"])]
             + [pm(row["certified"][f"{r:g}"]) for r in radii]
             + [pm(row["mean_radius"]), bounds, f"{row['broken']} / {row['attacked']}"])
    lines.append("| " + " | ".join(cells) + " |")
  lines += ["", "Radii r are l2 norms in normalised (standardised) input space."]
  return "\n".join(lines) + "\n"


def check_flags() -> None:
  """Bad method or encoder-set names fail before any training starts."""
  unknown = sorted(set(_ENCODERS.value) - set(ENCODER_SETS))
  if unknown:
    raise app.UsageError(f"--encoders: expected a subset of {sorted(ENCODER_SETS)}, got {unknown}")
  for name in _METHODS.value:
    methods.get(name)


def main(argv):
  del argv  # (positional arguments are refused by cli.run)
  check_flags()
  radii = np.asarray([float(r) for r in _RADII.value], np.float32)
  grid = certify_lib.radius_grid(_MAX_RADIUS.value, 121)
  seeds = [int(s) for s in _SEEDS.value]
  rows = []
  for encoders in _ENCODERS.value:
    for method in _METHODS.value:
      if encoders != "lipschitz" and method in LIPSCHITZ_ONLY:
        continue
      runs = []
      for seed in seeds:
        workdir = os.path.join(_WORKDIR.value, encoders, method, f"seed_{seed}")
        loop.train_and_evaluate(run_config(_CONFIG.value, method, encoders, seed), workdir)
        runs.append(certify_run(workdir, radii, grid, max_examples=_MAX_EXAMPLES.value,
                                attack_steps=_ATTACK_STEPS.value,
                                attack_restarts=_ATTACK_RESTARTS.value))
      rows.append({"encoders": encoders, "method": method, **aggregate(runs, radii)})
  table = markdown_table(rows, radii)
  print(f"\n{_CONFIG.value.dataset}, test split, {len(seeds)} seed(s), sound certificates "
        f"checked by l2-PGD ({_ATTACK_STEPS.value} steps x {_ATTACK_RESTARTS.value} "
        f"restarts):\n\n{table}")
  files.write_json_atomic(os.path.join(_WORKDIR.value, "certified.json"),
                         {"radii": radii.tolist(), "grid": grid.tolist(), "rows": rows})
  files.write_text_atomic(os.path.join(_WORKDIR.value, "certified.md"), table)
  curves = {f"{row['method']} ({row['encoders']})": (grid, row["curve"]) for row in rows}
  files.write_atomic(os.path.join(_WORKDIR.value, "certified_accuracy.png"),
                     lambda f: plots.plot_certified_accuracy(
                         curves, f, title=f"{_CONFIG.value.dataset}: sound certified accuracy "
                         f"(mean of {len(seeds)} seeds)",
                         linestyles={n: "-" if "(lipschitz)" in n else "--" for n in curves}))
  index = cli.record_in_index(
      _WORKDIR.value, f"compare_certified {', '.join(_METHODS.value)} on "
      f"{_CONFIG.value.dataset}", [_WORKDIR.value], config=_CONFIG.value,
      key="compare_certified")
  print(f"index of the reports and figures: {index}")


if __name__ == "__main__":
  cli.run(main)
