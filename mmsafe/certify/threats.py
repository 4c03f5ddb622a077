"""Certified radii per threat model, from one sound `Certificate` (CRMT Thm 3.3/3.5, Prop. 3.4).

A certificate answers more than the joint l2 question. From the same
margins and vulnerability indicators `eta^(m)_k`:

* "joint": the attacker moves all modalities, `||(d_1, ..., d_M)|| < r(x)`
  (Thm 3.3 / Thm 3.5): `Certificate.radius`.
* "modality:<m>": the attacker moves modality m alone, `||d_m|| < r^(m)(x)`
  (Prop. 3.4): `Certificate.per_modality[m]`.
* "worst_modality": the attacker picks the modality, `min_m r^(m)(x)`.
* missing modality m, certified: replacing `x_m` by a fill `f_m` is a
  uni-modal perturbation of norm `||x_m - f_m||`, so the prediction provably
  survives losing modality m when `r^(m)(x) > ||x_m - f_m||`
  (`missing_certified`). This is weaker than evaluating the model on the
  filled input (which gives the measured missing-modality accuracy for that
  one fill): it covers every input within that distance of `x_m`, e.g.
  every fill value no farther than `f_m`.

Radii are in the certificate's units (`Certificate.units`: normalised input
space, or "input": the units a user perturbs, `mmsafe.certify.units`). Inputs
and fills are in normalised space ("zeros" is the training mean of
standardised inputs). A fill is one perturbation, so `missing_certified` tests
it where the bound is proved, in normalised space: an input-unit uni-modal
radius is `s^(m)` times the normalised one exactly (Prop. 3.4; smoothing
alike), so it compares `r_in^(m)` with `s^(m) ||x_m - f_m||` (normalised
norm), the same outcome whatever the units.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from mmsafe.certify.bounds import Certificate
from mmsafe.certify.smoothing import SmoothedCertificate
from mmsafe.certify.units import INPUT

JOINT, WORST_MODALITY = "joint", "worst_modality"


def _check_l2_certificate(cert, accepted: tuple[type, ...] = (Certificate,)) -> None:
  """TypeError unless `cert` is one of the `accepted` l2 certificates (the threats
  here are l2 balls)."""
  if not isinstance(cert, accepted):
    raise TypeError(f"cert: expected one of {[t.__name__ for t in accepted]}, got "
                    f"{type(cert).__name__}; an ablation certificate counts changed entries "
                    f"(ablation.certifies), not an l2 radius")


def modality_threat(modality: str) -> str:
  """The threat name of perturbing `modality` alone."""
  return f"modality:{modality}"


def threat_radii(cert: Certificate) -> dict[str, np.ndarray]:
  """threat -> [B] certified radius (0 for misclassified examples): "joint",
  "modality:<m>" for each modality, and "worst_modality"."""
  _check_l2_certificate(cert)
  per_modality = {m: np.asarray(cert.per_modality[m]) for m in cert.modalities}
  out = {JOINT: np.asarray(cert.radius)}
  out.update({modality_threat(m): r for m, r in per_modality.items()})
  out[WORST_MODALITY] = np.min(np.stack(list(per_modality.values())), axis=0)
  return out


def fill_distances(inputs: Mapping[str, np.ndarray], fills: Mapping[str, np.ndarray] | None = None
                   ) -> dict[str, np.ndarray]:
  """modality -> [B] `||x_m - f_m||` (l2 over the example's entries); `fills`
  broadcastable to one example, None or a missing entry: zeros."""
  out = {}
  for m, x in inputs.items():
    x = np.asarray(x, np.float64)
    fill = 0.0 if fills is None or m not in fills else np.asarray(fills[m], np.float64)
    out[m] = np.sqrt(np.sum(np.square(x - fill).reshape(x.shape[0], -1), axis=1))
  return out


def missing_certified(cert: Certificate | SmoothedCertificate, inputs: Mapping[str, np.ndarray],
                      fills: Mapping[str, np.ndarray] | None = None, *,
                      input_scale: Mapping[str, float] | None = None
                      ) -> dict[str, np.ndarray]:
  """modality -> [B] bool: the prediction is correct and provably unchanged
  when modality m is replaced by its fill, `r^(m)(x) > ||x_m - f_m||` in
  normalised space; and "any" -> [B] bool: so for every modality (any one of
  them may be lost). `cert`: CRMT's `Certificate` or randomized smoothing's
  `SmoothedCertificate` (both state a per-modality l2 radius); `inputs`,
  `fills` normalised. A certificate in input units needs the `input_scale` it
  was computed with (`units.input_scales(dataset.stats)`): each radius is
  compared with `s^(m)` times the normalised distance (module docstring)."""
  _check_l2_certificate(cert, (Certificate, SmoothedCertificate))
  modalities = sorted(cert.per_modality)
  if sorted(inputs) != modalities:
    raise ValueError(f"inputs: expected modalities {modalities}, got {sorted(inputs)}")
  if cert.units == INPUT and input_scale is None:
    raise ValueError("input_scale: expected the scales of a certificate in input units "
                     "(units.input_scales(dataset.stats)), got None")
  scale = input_scale if cert.units == INPUT else {m: 1.0 for m in modalities}
  if sorted(scale) != modalities:
    raise ValueError(f"input_scale: expected modalities {modalities}, got {sorted(scale)}")
  distances = fill_distances(inputs, fills)
  correct = np.asarray(cert.correct, bool)
  out = {m: correct & (np.asarray(cert.per_modality[m]) > scale[m] * distances[m])
         for m in modalities}
  out["any"] = np.logical_and.reduce([out[m] for m in modalities])
  return out
