"""The tables of `experiments.compare_certified`, `compare_smoothing` and
`compare_probabilistic` (no flags).

Seed statistics, paired intervals, markdown, run-directory names, and
smoothing's best sigma per radius.

A run's result (`compare_certified.certify_run`) holds per-example outcomes,
so two methods trained with the same seeds and certified on the same test
examples are compared by seed-paired differences with an interval over seeds
and examples (`mmsafe.eval.statistics.paired_difference`).
"""

from __future__ import annotations

import numpy as np

from mmsafe.certify import ablation, curves, threats
from mmsafe.eval import statistics

OUTCOMES = "_outcomes"  # Per-example arrays of a row: used for intervals, not written.
HEADLINE_THREATS = (threats.JOINT, threats.WORST_MODALITY)


def seed_stats(values) -> dict:
  """Mean and sample standard deviation (ddof = 1; 0 for one seed) over seeds."""
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std, "values": values.tolist()}


def aggregate(runs: list[dict]) -> dict:
  """One method's results over seeds (runs in seed order)."""
  names = list(runs[0]["threats"])
  modalities = sorted(runs[0]["missing_measured"])
  attack = {t: {"attacked": sum(r["attack"].get(t, {}).get("attacked", 0) for r in runs),
                "broken": sum(r["attack"].get(t, {}).get("broken", 0) for r in runs)}
            for t in names if any(t in r["attack"] for r in runs)}
  units = {r["units"] for r in runs}
  if len(units) != 1:
    raise ValueError(f"runs: expected radii in one unit, got {sorted(units)}")
  return {
      "seeds": len(runs), "units": units.pop(),
      "clean": seed_stats([r["clean"] for r in runs]),
      "threats": {t: {"certified": [seed_stats([r["threats"][t]["certified"][i] for r in runs])
                                    for i in range(len(runs[0]["threats"][t]["certified"]))],
                      "curve": np.mean([r["threats"][t]["curve"] for r in runs], axis=0).tolist(),
                      "mean_radius": seed_stats([r["threats"][t]["mean_radius"] for r in runs])}
                  for t in names},
      "missing_certified": {m: seed_stats([r["missing_certified"][m] for r in runs])
                            for m in runs[0]["missing_certified"]},
      "missing_measured": {m: seed_stats([r["missing_measured"][m] for r in runs])
                           for m in modalities},
      "attack": attack,
      "encoder_lipschitz": {m: float(np.max([r["encoder_lipschitz"][m] for r in runs]))
                            for m in runs[0]["encoder_lipschitz"]},
      "certify_seconds_per_example": float(np.mean([r["certify_seconds_per_example"]
                                                    for r in runs])),
      OUTCOMES: {"correct": np.asarray([r["correct"] for r in runs], bool),
                 "radius": {t: np.asarray([r["threats"][t]["radius"] for r in runs])
                            for t in names},
                 "missing": {m: np.asarray([r["missing_outcomes"][m] for r in runs], bool)
                             for m in runs[0]["missing_outcomes"]}},
  }


def outcome_columns(row: dict, radii: np.ndarray) -> dict[str, np.ndarray]:
  """column -> [S, N] 0/1 per-example outcomes: "clean", "<threat>@<r>" for the
  headline threats, "missing <m> (certified)" for each modality and "any"."""
  outcomes = row[OUTCOMES]
  correct = outcomes["correct"]
  out = {"clean": correct.astype(float)}
  for threat in HEADLINE_THREATS:
    at = curves.certified_at(np.asarray(outcomes["radius"][threat]), correct, radii)
    for r, certified_at_r in zip(radii, at):
      out[f"{threat}@{r:g}"] = certified_at_r.astype(float)
  for m, certified in outcomes["missing"].items():
    out[f"missing {m} (certified)"] = certified.astype(float)
  return out


def paired_differences(rows: list[dict], control: str | None, radii: np.ndarray) -> list[dict]:
  """Each row's seed-paired difference to the control row of its encoder set,
  per column of `outcome_columns`, with a 95% interval over seeds and test
  examples (none with fewer than two seeds)."""
  if not control:
    return []
  controls = {row["encoders"]: row for row in rows if row["method"] == control}
  out = []
  for row in rows:
    reference = controls.get(row["encoders"])
    if reference is None or row is reference or row["seeds"] < 2:
      continue
    if row["seed_list"] != reference["seed_list"]:
      raise ValueError(f"paired differences: {row['method']} and {control} ran different "
                       f"seeds ({row['seed_list']} vs {reference['seed_list']})")
    a, b = outcome_columns(row, radii), outcome_columns(reference, radii)
    out.append({"encoders": row["encoders"], "method": row["method"], "control": control,
                "columns": {c: statistics.paired_difference(a[c], b[c]).to_dict() for c in a}})
  return out


def setting_key(kwargs: dict) -> str:
  """The directory name of a grid point (`default` for none)."""
  return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in sorted(kwargs.items())) or "default"


def certified(radius: list[float], radii: np.ndarray) -> np.ndarray:
  """[T, N] 0/1: the example is certified at each radius (`radius >= r`, > 0:
  a radius is 0 where the prediction is wrong or abstains)."""
  radius = np.asarray(radius)
  return curves.certified_at(radius, radius > 0, np.asarray(radii)).astype(float)


def best_sigma_envelope(outcomes: dict[float, np.ndarray]) -> tuple[list[float], np.ndarray]:
  """Smoothing at its best (Cohen et al.'s reporting): at each radius the sigma
  with the highest mean certified accuracy (the first on ties), and the
  [S, T, N] outcomes of that sigma at that radius."""
  sigmas = list(outcomes)
  num_radii = outcomes[sigmas[0]].shape[1]
  best = [max(sigmas, key=lambda s: outcomes[s][:, t].mean()) for t in range(num_radii)]
  return best, np.stack([outcomes[best[t]][:, t] for t in range(num_radii)], axis=1)


def _pm(stats: dict) -> str:
  return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _setting(kwargs: dict) -> str:
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in sorted(kwargs.items())) or "config"


def table(header: list[str], lines: list[list[str]]) -> list[str]:
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(cells) + " |" for cells in lines])


def markdown(rows: list[dict], radii: np.ndarray, differences: list[dict], control: str | None,
             title: str) -> str:
  """The comparison as markdown: headline threats, each modality, paired
  differences to the control, the tuning runs."""
  radius_columns = lambda name: [f"{name} r={r:g}" for r in radii]
  modalities = sorted(rows[0]["missing_measured"])
  header = (["encoders", "method", "setting", "grid points", "seeds", "clean"]
            + radius_columns("joint")
            + radius_columns("worst modality") + ["missing any: certified"]
            + [f"missing {m}: certified / measured" for m in modalities]
            + ["broken / attacked"])
  lines = []
  for row in rows:
    attacked = sum(a["attacked"] for a in row["attack"].values())
    broken = sum(a["broken"] for a in row["attack"].values())
    lines.append([row["encoders"], row["method"], _setting(row["kwargs"]),
                  str(max(len(row["tuning"]), 1)), str(row["seeds"]), _pm(row["clean"])]
                 + [_pm(s) for t in HEADLINE_THREATS for s in row["threats"][t]["certified"]]
                 + [_pm(row["missing_certified"]["any"])]
                 + [f"{_pm(row['missing_certified'][m])} / {_pm(row['missing_measured'][m])}"
                    for m in modalities]
                 + [f"{broken} / {attacked}"])
  parts = [f"# {title}", "", "Sound certified accuracy per threat (mean ± sample std over "
           "seeds):", ""] + table(header, lines)
  per_modality = [t for t in rows[0]["threats"] if t.startswith("modality:")]
  header = ["encoders", "method"] + [f"{t[len('modality:'):]} alone r={r:g}"
                                     for t in per_modality for r in radii]
  lines = [[row["encoders"], row["method"]] + [_pm(s) for t in per_modality
                                               for s in row["threats"][t]["certified"]]
           for row in rows]
  parts += ["", "Uni-modal certified accuracy (Prop. 3.4, one modality perturbed):", ""]
  parts += table(header, lines)
  if differences:
    columns = list(differences[0]["columns"])
    lines = [[d["encoders"], d["method"]] + [statistics.Interval(**d["columns"][c]).text()
                                              for c in columns] for d in differences]
    parts += ["", f"Seed-paired difference to {control}, mean [95% interval over seeds and "
              f"test examples]:", ""] + table(["encoders", "method"] + columns, lines)
  tuning = [(row, point) for row in rows for point in row["tuning"]]
  if tuning:
    lines = [[row["encoders"], row["method"], _setting(p["kwargs"]), f"{p['score']:.4f}"]
             for row, p in tuning]
    parts += ["", "Tuning on the validation split (one seed; score: certified accuracy at "
              "the radii, mean of the joint and worst-modality threats):", ""]
    parts += table(["encoders", "method", "setting", "validation score"], lines)
  parts += ["", f"Radii are l2 norms in {rows[0]['units']}. Missing modality: replaced by "
            "zeros (the training mean); certified when its uni-modal radius exceeds the "
            "distance to the fill (in normalised space, where the bound is proved), for "
            "every modality."]
  return "\n".join(parts) + "\n"


def json_rows(rows: list[dict]) -> list[dict]:
  """The rows without their per-example outcomes."""
  return [{k: v for k, v in row.items() if k != OUTCOMES} for row in rows]


# compare_probabilistic: one row per certificate or defence, cells over seeds.
SCALARS = ("clean (certifier)", "clean (as attacked)", "pgd", "decoupling")


def probabilistic_rows(per_seed: list[list[dict]], modalities) -> list[dict]:
  """Each row's cells as seed statistics (`seed_stats`)."""
  out = []
  for rows in zip(*per_seed):
    first = rows[0]
    cell = lambda get: (None if get(first) is None
                        else seed_stats([get(r) for r in rows]))
    row = {"model": first["model"], "certificate": first["certificate"],
           **{name: cell(lambda r, name=name: r[name]) for name in SCALARS},
           **{f"missing {m}": cell(lambda r, m=m: r[f"missing {m}"]) for m in modalities},
           "missing certified": {m: cell(lambda r, m=m: (r["missing certified"] or {}).get(m))
                                 for m in modalities},
           "seconds": cell(lambda r: r["seconds"])}
    for name in ("l2", "changed"):
      row[name] = (None if first[name] is None else
                   [seed_stats([r[name][i] for r in rows])
                    for i in range(len(first[name]))])
    out.append(row)
  return out


def probabilistic_markdown(rows, radii, budgets, modalities) -> str:
  """The comparison table (—: the certificate does not cover that threat)."""
  header = (["model", "certificate", "clean (certifier)", "clean (as attacked)"]
            + [f"cert. l2 r={r:g}" for r in radii]
            + [f"cert. {b} changed" for b in budgets]
            + [f"cert. missing {m}" for m in modalities] + ["PGD", "decoupling"]
            + [f"missing {m}" for m in modalities] + ["s / example"])
  fmt = lambda s, digits=3: "—" if s is None else (
      f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if len(s["values"]) > 1 else ""))
  lines = []
  for row in rows:
    cells = ([row["model"], row["certificate"], fmt(row["clean (certifier)"]),
              fmt(row["clean (as attacked)"])]
             + [fmt(v) for v in (row["l2"] or [None] * len(radii))]
             + [fmt(v) for v in (row["changed"] or [None] * len(budgets))]
             + [fmt(row["missing certified"][m]) for m in modalities]
             + [fmt(row["pgd"]), fmt(row["decoupling"])]
             + [fmt(row[f"missing {m}"]) for m in modalities] + [fmt(row["seconds"], 4)])
    lines.append(cells)
  return "\n".join(table(header, lines)) + "\n"


def keep_sweep_markdown(scores, chosen) -> str:
  """The validation sweep of the ablation's entries kept, the chosen one marked."""
  budgets = list(scores[0]["certified"])
  header = ["keep", "voter accuracy (validation)"] + [f"cert. {b} changed" for b in budgets]
  lines = [[ablation.keep_label(s["keep"]) + (" (chosen)" if s["keep"] == chosen else ""),
            f"{s['voter accuracy']:.3f}"] + [f"{s['certified'][b]:.3f}" for b in budgets]
           for s in scores]
  return "\n".join(table(header, lines)) + "\n"
