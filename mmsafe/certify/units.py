"""The units of certified radii: the input units a user perturbs (the one rule).

Every model of mmsafe reads its inputs standardised, `x^(m) = (r^(m) - mu^(m))
/ sigma^(m)` with `r^(m)` the stored raw input of modality m: mfeat and
av_digits views per feature or per channel, the clip datasets per channel
(normalised inside the compiled step, `mmsafe.data.clips.normalize_inputs`).
Each dataset's `stats` (a `Standardization` per modality) holds that map and
the modality's input unit, the unit a user perturbs in:

* mfeat, av_digits (visual and log-mel audio): the raw features ("raw");
* clip frames and flow (stored uint8): pixel/255, `u = r / 255`;
* clip audio: raw fbank units.

In input units `u = r / raw_per_unit` the map is `x = (u - mu_u) / sigma_u`
with `sigma_u = sigma / raw_per_unit` (`unit_standardization`). A perturbation
`d` of `u^(m)` moves `x^(m)` by `d / sigma_u^(m)` (elementwise), so

    ||d / sigma_u^(m)||_2 <= ||d||_2 / s^(m),     s^(m) = min_i sigma_u^(m)_i,

with equality for `d` along a feature of the smallest std: `1 / s^(m)` is the
Lipschitz constant, exactly, of modality m's standardisation (the operator
norm of `diag(1 / sigma_u)`). `input_scales` computes `s^(m)`; every
certificate in input units uses it:

* CRMT (`mmsafe.certify.bounds`): a term of `h_y - h_k` with constant
  `eta^(m)_k` in `x^(m)` has constant `eta^(m)_k / s^(m)` in `u^(m)`, so the
  radii computed with those constants are radii in input units: per modality
  (Prop. 3.4) `r_in^(m) = s^(m) r^(m)` exactly; jointly (Thm 3.3 / 3.5)
  `r_in = min_k margin_k / sqrt(sum_m (eta^(m)_k / s^(m))^2) >= (min_m s^(m)) r`;
  the worst modality `min_m r_in^(m)`.
* Randomized smoothing (`mmsafe.certify.smoothing`), noise `sigma_m` in
  normalised space: the certified ellipsoid `sum_m ||d_n^(m)||^2 / sigma_m^2 <
  R^2` contains every input-unit `d` with `sum_m ||d^(m)||^2 / (s^(m)
  sigma_m)^2 < R^2`, i.e. normalised noise `sigma_m` acts as `s^(m) sigma_m`:
  `r_in^(m) = s^(m) sigma_m R`, joint `min_m s^(m) sigma_m R` (for one
  isotropic sigma, `r_in = r_norm min_i sigma_u,i`, a sound lower bound).
* A missing modality (`mmsafe.certify.threats.missing_certified`): replacing
  `x_m` by a fill is one perturbation, certified when its normalised norm is
  below the normalised uni-modal radius `r_in^(m) / s^(m)`; its input-unit
  norm `||sigma_u (x_m - f_m)|| >= s^(m) ||x_m - f_m||` need not be.
* The modality-ablation certificate counts changed entries: no unit.

A perturbation of l2 norm below an input-unit radius, made in input units
and then standardised, cannot change the class (sound constants) or is
estimated not to (local / empirical: `eta / s` bounds the input-space
gradient norm from above, so input-unit estimates are a little smaller than
input-space Jacobians would give). Attack budgets of `mmsafe.attacks` stay
in normalised space (`Certificate.units` and every report say which).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

NORMALISED, INPUT = "normalised", "input"
UNITS = (NORMALISED, INPUT)


def unit_standardization(stats: Mapping[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """modality -> `(mu_u, sigma_u)`, the standardisation of modality m in its
  input units: `x = (u - mu_u) / sigma_u` with `u = raw / raw_per_unit`
  (`stats`: modality -> a `Standardization`, e.g. a dataset's `stats`).

  Raises:
    ValueError naming the modality when a std is not finite and positive or
    `raw_per_unit` is not.
  """
  out = {}
  for m in sorted(stats):
    std = np.asarray(getattr(stats[m], "std", None), np.float64)
    if std.size == 0 or std.dtype == object or not np.all(np.isfinite(std)) or np.any(std <= 0):
      raise ValueError(f"stats[{m!r}].std: expected finite positive stds, got "
                       f"{getattr(stats[m], 'std', None)!r}")
    per_unit = getattr(stats[m], "raw_per_unit", 1.0)
    if not (isinstance(per_unit, (int, float, np.floating)) and np.isfinite(per_unit)
            and per_unit > 0):
      raise ValueError(f"stats[{m!r}].raw_per_unit: expected a finite positive number, "
                       f"got {per_unit!r}")
    mean = np.asarray(getattr(stats[m], "mean", 0.0), np.float64)
    out[m] = (mean / per_unit, std / per_unit)
  return out


def input_scales(stats: Mapping[str, Any]) -> dict[str, float]:
  """`s^(m) = min_i sigma_u^(m)_i`, the smallest std of each modality's
  standardisation in its input units (module docstring): dividing a
  normalised-space Lipschitz constant by it gives the input-space one, and
  multiplying a normalised uni-modal radius by it gives the input-unit one."""
  return {m: float(std.min()) for m, (_, std) in unit_standardization(stats).items()}


def unit_names(stats: Mapping[str, Any]) -> dict[str, str]:
  """modality -> the name of its input unit ("raw", "pixel/255", ...)."""
  return {m: str(getattr(stats[m], "unit", "raw")) for m in sorted(stats)}


def describe(units: str, stats: Mapping[str, Any] | None = None) -> str:
  """The units of radii in words, for reports: "normalised input space" or
  "input units (audio: raw fbank, visual: pixel/255)"."""
  if check_units(units) == NORMALISED:
    return "normalised input space"
  names = unit_names(stats or {})
  return "input units (" + ", ".join(f"{m}: {u}" for m, u in names.items()) + ")"


def check_units(units: str) -> str:
  """`units` if it is one of `UNITS`, else a ValueError naming the field."""
  if units not in UNITS:
    raise ValueError(f"units: expected one of {UNITS}, got {units!r}")
  return units
