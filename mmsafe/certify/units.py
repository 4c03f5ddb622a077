"""The units of certified radii: normalised input space, or raw input units.

Every model of mmsafe reads its inputs standardised, `x^(m) = (r^(m) - mu^(m))
/ sigma^(m)` with `r^(m)` the raw input of modality m (mfeat and av_digits
views per feature, images and spectrograms per channel, the clip datasets
per channel or with one scalar: each dataset's `stats`, a `Standardization`
per modality). The Lipschitz constants, hence the radii, of
`mmsafe.certify` are in that normalised space unless raw units are asked for.

Raw units (`raw_input_scales`, the one rule, used by `certify(...,
raw_stats=...)` for every dataset). A raw perturbation `d` of modality m
moves its normalised input by `d / sigma^(m)` (elementwise), so

    ||d / sigma^(m)||_2 <= ||d||_2 / s^(m),     s^(m) = min_i sigma^(m)_i,

with equality for `d` along a feature of the smallest std: `1 / s^(m)` is the
Lipschitz constant, exactly, of the standardisation of modality m. Composing,
a term of `h_y - h_k` with constant `eta^(m)_k` in `x^(m)` has constant
`eta^(m)_k / s^(m)` in `r^(m)`, and the radii of `mmsafe.certify.bounds`
computed with those constants are radii in raw units:

* per modality (Prop. 3.4): `r_raw^(m) = s^(m) r^(m)` exactly;
* jointly (Thm 3.3 / 3.5): `r_raw = min_k margin_k / sqrt(sum_m (eta^(m)_k /
  s^(m))^2) >= (min_m s^(m)) r`, the guarantee "r times the smallest std",
  tighter when the modalities' scales differ.

A raw perturbation of l2 norm below `r_raw` cannot change the class (sound
constants) or is estimated not to (local / empirical: `eta / s` then bounds
the raw-space gradient norm from above, so raw-unit estimates are a little
smaller than raw-space Jacobians would give).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

UNITS = ("normalised", "raw")


def raw_input_scales(stats: Mapping[str, Any]) -> dict[str, float]:
  """`s^(m) = min_i sigma^(m)_i`, the smallest std of each modality's
  standardisation (`stats`: modality -> an object with `std`, e.g. a dataset's
  `stats`); dividing a normalised-space Lipschitz constant by it gives the
  raw-space one (module docstring).

  Raises:
    ValueError naming the modality when a std is not finite and positive.
  """
  scales = {}
  for m in sorted(stats):
    std = np.asarray(getattr(stats[m], "std", None), np.float64)
    if std.size == 0 or std.dtype == object or not np.all(np.isfinite(std)) or np.any(std <= 0):
      raise ValueError(f"raw_stats[{m!r}].std: expected finite positive stds, got "
                       f"{getattr(stats[m], 'std', None)!r}")
    scales[m] = float(std.min())
  return scales
