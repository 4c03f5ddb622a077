"""Certified-accuracy curves, mean radii and vulnerability-indicator ratios.

The certified accuracy at radius `t` is the fraction of samples that are
classified correctly *and* have certified radius `r(x) >= t` (at `t = 0` it is
the clean accuracy). Uni-modal curves use the Prop. 3.4 radii. The ratio of
vulnerability indicators `eta^(m1) / eta^(m2)` per class pair `(y, k)` is the
paper's Figure 3 heat map. All functions are pure and jit-able; `summarize`
returns plain Python values for JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.certify.bounds import Certificate

Array = jax.Array


def _weights(valid: Array | None, batch: int) -> Array:
  if valid is None:
    return jnp.ones((batch,), jnp.float32)
  valid = jnp.asarray(valid)
  if valid.shape != (batch,):
    raise ValueError(f"valid: expected bool[{batch}], got {valid.dtype}{list(valid.shape)}")
  return valid.astype(jnp.float32)


def certified_at(radius: Array, correct: Array, thresholds: Array) -> Array:
  """`[T, *radius.shape]` bool: each example is certified at each threshold `t`,
  `correct & radius >= t`: the one rule every certified accuracy counts. Any
  leading shape (e.g. [S, N] over seeds and examples); numpy arrays stay numpy
  (and float64), jax arrays (also traced) stay jax."""
  thresholds = thresholds.reshape((-1,) + (1,) * radius.ndim)
  return correct[None] & (radius[None] >= thresholds)


@jax.jit
def certified_accuracy(radius: Array, correct: Array, thresholds: Array, *,
                       valid: Array | None = None) -> Array:
  """`[T]`: fraction of (valid) samples with `correct & radius >= t` for each `t`."""
  radius = jnp.asarray(radius)
  if radius.ndim != 1 or jnp.shape(correct) != radius.shape:
    raise ValueError(f"radius/correct: expected two [B] arrays, got {tuple(radius.shape)} and "
                     f"{tuple(jnp.shape(correct))}")
  weights = _weights(valid, radius.shape[0])
  thresholds = jnp.asarray(thresholds, jnp.float32)
  certified = certified_at(radius, jnp.asarray(correct), thresholds)  # [T, B]
  return jnp.sum(certified * weights[None], axis=1) / jnp.maximum(jnp.sum(weights), 1.0)


@jax.jit
def mean_radius(radius: Array, *, valid: Array | None = None) -> Array:
  """Mean certified radius over (valid) samples without an infinite radius (one,
  from a zero vulnerability indicator, is left out and counted separately by
  `summarize`); misclassified samples and NaN radii count as 0; 0 when none is
  left."""
  radius = jnp.asarray(radius)
  weights = _weights(valid, radius.shape[0]) * ~jnp.isinf(radius)
  value = jnp.where(jnp.isfinite(radius), radius, 0.0)
  return jnp.sum(value * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def unimodal_certified_accuracy(certificate: Certificate, thresholds: Array, *,
                                valid: Array | None = None) -> dict[str, Array]:
  """modality -> `[T]` certified accuracy against perturbing that modality alone (Prop. 3.4)."""
  return {m: certified_accuracy(r, certificate.correct, thresholds, valid=valid)
          for m, r in sorted(certificate.per_modality.items())}


def radius_grid(max_radius: float, num: int = 101) -> np.ndarray:
  """`num` evenly spaced radii in `[0, max_radius]` (float32)."""
  if not max_radius > 0 or num < 2:
    raise ValueError(f"radius_grid: expected max_radius > 0 and num >= 2, got {max_radius}, {num}")
  return np.linspace(0.0, float(max_radius), int(num), dtype=np.float32)


def eta_ratio(certificate: Certificate, labels: Array, numerator: str, denominator: str, *,
              num_classes: int | None = None, valid: Array | None = None) -> Array:
  """`[K, K]` mean over samples of label `y` of `eta^(num)_k / eta^(den)_k` (paper Fig. 3).

  Entry `(y, k)` averages the ratio over the (valid) samples with label `y`;
  NaN on the diagonal, for labels without samples, and where an indicator of
  the denominator is 0 for every such sample.
  """
  for m in (numerator, denominator):
    if m not in certificate.eta:
      raise ValueError(f"eta_ratio: unknown modality {m!r}; expected one of "
                       f"{sorted(certificate.eta)}")
  num_classes = certificate.eta[numerator].shape[1] if num_classes is None else num_classes
  return _eta_ratio(certificate.eta[numerator], certificate.eta[denominator],
                    jnp.asarray(labels), valid, num_classes)


@functools.partial(jax.jit, static_argnums=4)
def _eta_ratio(num: Array, den: Array, labels: Array, valid: Array | None, num_classes: int
               ) -> Array:
  """The computation of `eta_ratio` (compiled once per shape)."""
  batch, k = num.shape
  weights = _weights(valid, batch)[:, None] * (den > 0)
  ratio = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)
  sums = jax.ops.segment_sum(ratio * weights, labels, num_segments=num_classes)
  counts = jax.ops.segment_sum(weights, labels, num_segments=num_classes)
  out = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), jnp.nan)
  return jnp.where(jnp.eye(num_classes, k, dtype=bool), jnp.nan, out)


def summarize(certificate: Certificate, thresholds: Sequence[float] | Array, *,
              valid: Array | None = None) -> dict[str, Any]:
  """A JSON-ready summary (plain floats and lists, no NaN/Inf).

  Keys: kind, num_examples, clean_accuracy, mean_radius (over all samples,
  misclassified ones as 0; an infinite radius -- a sample no class can ever
  overtake, e.g. zero Lipschitz constants -- is left out of the mean and
  counted in num_infinite_radius), num_non_finite (samples with NaN/Inf logits
  or NaN indicators, `certificate.finite`, or else a NaN radius: counted as
  failures, neither correct nor certified), median_radius_correct, thresholds,
  certified_accuracy (the curve over `thresholds`), unimodal_mean_radius and
  unimodal_certified_accuracy (Prop. 3.4, per modality).
  """
  thresholds = np.asarray(thresholds, np.float32)
  radius = np.asarray(certificate.radius)
  finite = (~np.isnan(radius) if certificate.finite is None
            else np.asarray(certificate.finite, bool))
  correct = np.asarray(certificate.correct, bool) & finite
  arrays = jax.device_get(_summary_arrays(certificate.radius, correct,
                                          dict(certificate.per_modality), thresholds, valid))
  weights = arrays["weights"] > 0

  certified = radius[weights & correct]
  certified = certified[np.isfinite(certified)]
  return {
      "kind": certificate.kind,
      "num_examples": int(weights.sum()),
      "clean_accuracy": float(np.mean(correct[weights])) if weights.any() else 0.0,
      "mean_radius": float(arrays["mean_radius"]),
      "num_infinite_radius": int(np.sum(np.isinf(radius[weights]))),
      "num_non_finite": int(np.sum(~finite[weights])),
      "median_radius_correct": float(np.median(certified)) if certified.size else 0.0,
      "thresholds": thresholds.tolist(),
      "certified_accuracy": arrays["certified_accuracy"].tolist(),
      "unimodal_mean_radius": {m: float(v) for m, v in arrays["unimodal_mean_radius"].items()},
      "unimodal_certified_accuracy": {
          m: v.tolist() for m, v in arrays["unimodal_certified_accuracy"].items()},
  }


@jax.jit
def _summary_arrays(radius: Array, correct: Array, per_modality: dict[str, Array],
                    thresholds: Array, valid: Array | None) -> dict[str, Any]:
  """The arrays of `summarize`, in one program (compiled once per shape)."""
  return {
      "weights": _weights(valid, radius.shape[0]),
      "mean_radius": mean_radius(radius, valid=valid),
      "certified_accuracy": certified_accuracy(radius, correct, thresholds, valid=valid),
      "unimodal_mean_radius": {m: mean_radius(r, valid=valid) for m, r in per_modality.items()},
      "unimodal_certified_accuracy": {
          m: certified_accuracy(r, correct, thresholds, valid=valid)
          for m, r in per_modality.items()},
  }
