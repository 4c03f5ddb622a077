"""Certified l2 radii of multi-modal models (CRMT, ICLR 2024, Thm 3.3, Prop 3.4, Thm 3.5).

For a sample `x` with label `y` and every wrong class `k != y`:

* concat (JT) head, Thm 3.3 (eq. 5), with `c^(m)_k = ||W^(m)_y - W^(m)_k||`,
  `zeta^(m)_k` the uni-modal margin (eq. 2) and `tau^(m)_k` its Lipschitz
  constant (eq. 4):

      r_k = (sum_m c^(m)_k zeta^(m)_k(x) + b_y - b_k) / sqrt(sum_m (c^(m)_k tau^(m)_k)^2)

* orthogonal head, Thm 3.5 (eq. 10), with `tau~^(m)_k` the Lipschitz constant
  of the uni-modal score `u^(m)_k` (eq. 9) and absolute values of `a` so the
  bound stays sound for negative weights (the paper assumes `a >= 0`):

      r_k = (h~_y(x) - h~_k(x)) / sqrt(sum_m (|a^(m)_y| tau~^(m)_y + |a^(m)_k| tau~^(m)_k)^2)

* orthogonal head, tight form: when modality `m` has one constant `L^(m)` for
  its whole feature map (`||phi^(m)(x) - phi^(m)(x')|| <= L^(m) ||x - x'||`,
  e.g. the "sound" constants), the m-term of `h~_y - h~_k` is
  `(a_y W~_y - a_k W~_k) phi^(m)`, whose Lipschitz constant is at most
  `||a^(m)_y W~^(m)_y - a^(m)_k W~^(m)_k|| L^(m)` -- for orthonormal rows
  exactly `sqrt(a_y^2 + a_k^2) L^(m)`, never more than the triangle form
  `(|a_y| + |a_k|) L^(m)` of eq. 10. On a linear model whose encoders have
  orthonormal rows it equals the exact minimal flipping perturbation.

In both numerators `sum_m c^(m)_k zeta^(m)_k + beta_k = h_y(x) - h_k(x)`, the
fused logit margin. Proof sketch (both): for a perturbation `d`,
`h_y - h_k` moves by at most `sum_m eta^(m)_k ||d^(m)|| <= ||eta_k|| ||d||`
(Cauchy-Schwarz over modalities), with the vulnerability indicators

      eta^(m)_k = c^(m)_k tau^(m)_k                         (JT, Sec. 3.3)
      eta^(m)_k = |a^(m)_y| tau~^(m)_y + |a^(m)_k| tau~^(m)_k    (orthogonal)
      eta^(m)_k = ||a^(m)_y W~^(m)_y - a^(m)_k W~^(m)_k|| L^(m)   (orthogonal, tight)

so no class overtakes `y` while `||d|| < r_k`. The certified radius is
`r(x) = min_{k != y} r_k(x)` -- over *all* wrong classes, which is the sound
certificate (the paper writes "the closest label j") -- and 0 when `x` is
misclassified. Perturbing modality `m` alone (Prop. 3.4, eq. 7) gives
`r^(m)_k = (h_y - h_k) / eta^(m)_k`.

Whether a radius is a certificate depends on the Lipschitz constants: only
kind "sound" (`mmsafe.certify.sound`) gives one; "local" and "empirical"
give estimates. `Certificate.kind` records which was used.

Units: radii are l2 norms in the model's input space, i.e. *normalised*
(standardised) inputs, unless input units are asked for (`input_scale`, or
`certify(..., input_scale=input_scales(dataset.stats))`: `mmsafe.certify.units`, the units
a user perturbs: raw features, pixel/255), which divides every `eta^(m)` by
the smallest std of modality m's standardisation in those units.
`Certificate.units` records which.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import checks, numerics
from mmsafe.certify.constants import TARGETS, LipschitzConstants, integration_factors
from mmsafe.certify.units import UNITS
from mmsafe.models.outputs import ModelOutput

Array = jax.Array


@flax.struct.dataclass
class Certificate:
  """Certified radii of a batch (all arrays have the batch as leading axis).

  Attributes:
    radius: [B] multi-modal certified radius `min_{k != y} r_k` (Thm 3.3 /
      Thm 3.5), 0 for misclassified samples.
    per_modality: modality -> [B] uni-modal radius (Prop. 3.4) for perturbing
      that modality alone, 0 for misclassified samples.
    per_class: [B, K] `r_k` for every class; `+inf` at `k = y`. Not clipped at
      0: a negative entry marks a class that already beats `y`.
    eta: modality -> [B, K] vulnerability indicators `eta^(m)_k` for the pair
      `(y, k)`; 0 at `k = y` (in the certificate's `units`: per unit of
      normalised input or of input unit).
    correct: [B] bool, `argmax h(x) == y` and `finite` (a non-finite example
      is never correct, so its radii are 0).
    margin: [B, K] fused logit margins `h_y(x) - h_k(x)` (0 at `k = y`).
    kind: the Lipschitz kind used: "local" | "empirical" | "sound" | "custom".
    finite: [B] bool, the logits of the example are finite and none of its
      vulnerability indicators is NaN (False e.g. for NaN inputs under jit,
      where values go unchecked); None for a certificate built without it.
    units: "normalised" (radii are l2 norms of perturbations of the model's
      standardised inputs) or "input" (of inputs in the units a user perturbs,
      e.g. raw features or pixel/255; `mmsafe.certify.units`).
  """

  radius: Array
  per_modality: dict[str, Array]
  per_class: Array
  eta: dict[str, Array]
  correct: Array
  margin: Array
  kind: str = flax.struct.field(pytree_node=False, default="custom")
  finite: Array | None = None
  units: str = flax.struct.field(pytree_node=False, default="normalised")

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(sorted(self.eta))


def _check_head(output: ModelOutput) -> None:
  head = output.head
  num_classes = output.logits.shape[-1]
  if output.logits.ndim != 2:
    raise ValueError(f"output.logits: expected [B, K], got {tuple(output.logits.shape)}")
  if head.bias.shape != (num_classes,):
    raise ValueError(f"output.head.bias: expected [{num_classes}] (K from the logits), got "
                     f"{tuple(head.bias.shape)}")
  if head.kind not in TARGETS:
    raise ValueError(f"output.head.kind: expected one of {sorted(TARGETS)}, got {head.kind!r}")
  if not head.kernels:
    raise ValueError("output.head.kernels: expected one kernel per modality, got none")
  for m, kernel in head.kernels.items():
    if kernel.ndim != 2 or kernel.shape[-1] != num_classes:
      raise ValueError(f"output.head.kernels[{m!r}]: expected [d, K={num_classes}], got "
                       f"{tuple(kernel.shape)}: the head's output dimension must equal K")
    if head.kind == "orthogonal":
      if kernel.shape[0] < num_classes:
        raise ValueError(f"output.head.kernels[{m!r}]: head dimension d = {kernel.shape[0]} < "
                         f"K = {num_classes}; an orthogonal head needs d >= K (W~ [K, d] with "
                         f"orthonormal rows)")
      if m not in head.weights or head.weights[m].shape != (num_classes,):
        shape = tuple(head.weights[m].shape) if m in head.weights else None
        raise ValueError(f"output.head.weights[{m!r}]: expected [{num_classes}], got {shape}")


def certified_radius(output: ModelOutput, labels: Array, tau: Mapping[str, Array], *,
                     feature_lipschitz: Mapping[str, Array] | None = None,
                     kind: str = "custom", input_scale: Mapping[str, float] | None = None
                     ) -> Certificate:
  """Certified radii, uni-modal radii and vulnerability indicators (Thm 3.3/3.5, Prop 3.4).

  Args:
    output: the model's `ModelOutput` (logits and head parameters are read).
    labels: int [B] true labels `y`.
    tau: modality -> [B, K] or [1, K] Lipschitz constants.
      Orthogonal head: entry `[b, k]` is `tau~^(m)_k`, the constant of the
      uni-modal score `u^(m)_k` (the label plays no role).
      Concat head: entry `[b, k]` is `tau^(m)_k` for the pair `(y_b, k)`: the
      constant of the margin `zeta^(m)_k = (W_y - W_k) phi / ||W_y - W_k||`
      with `y = labels[b]`; entry `k = y` is ignored.
      `LipschitzConstants.tau(labels)` produces exactly this.
    feature_lipschitz: optional modality -> scalar `L^(m) >= Lip(phi^(m))`
      (`LipschitzConstants.encoder` of the "sound" kind). When given, every
      indicator is the smaller of the `tau` form and the one-constant form:
      `||a_y W~_y - a_k W~_k|| L^(m)` (orthogonal head, the tight Thm 3.5)
      or `||W_y - W_k|| L^(m)` (concat head).
    kind: recorded in the result ("local" | "empirical" | "sound" | "custom").
    input_scale: optional modality -> `s^(m) > 0`, the smallest std of the
      modality's standardisation in its input units (`units.input_scales`):
      radii and indicators in input units. None: in normalised input space.

  Returns:
    A `Certificate`. Pure and jit-able (value checks run on concrete inputs).

  Raises:
    ValueError for a head whose kernels are not `[d, K]` (or `d < K` for the
    orthogonal head), missing/extra modalities in `tau`, `feature_lipschitz`
    or `input_scale`, wrong shapes, labels out of range, or NaN/Inf/negative
    logits or constants (when concrete).
  """
  _check_head(output)
  logits = output.logits.astype(jnp.float32)
  batch, num_classes = logits.shape
  labels = jnp.asarray(labels)
  checks.check_labels(labels, num_classes, batch_size=batch)
  head = output.head
  modalities = sorted(head.kernels)
  if sorted(tau) != modalities:
    raise ValueError(f"tau: expected modalities {modalities}, got {sorted(tau)}")
  checks.check_finite(logits, "output.logits")
  taus = {m: _checked_constants(f"tau[{m!r}]", tau[m], batch, num_classes) for m in modalities}
  if feature_lipschitz is not None:
    feature_lipschitz = _checked_feature_constants(feature_lipschitz, modalities)
  return _radii(output, labels, taus, feature_lipschitz, _checked_scales(input_scale, modalities),
                kind)


def _checked_scales(input_scale: Mapping[str, Any] | None, modalities: list[str]
                    ) -> dict[str, Array] | None:
  """float32 scalar finite positive `s^(m)` for exactly `modalities` (or None)."""
  if input_scale is None:
    return None
  if sorted(input_scale) != modalities:
    raise ValueError(f"input_scale: expected modalities {modalities}, got {sorted(input_scale)}")
  out = {}
  for m in modalities:
    value = jnp.asarray(input_scale[m], jnp.float32)
    concrete = numerics.concrete(value)
    if value.shape != () or (concrete is not None and not (np.isfinite(concrete)
                                                           and concrete > 0)):
      raise ValueError(f"input_scale[{m!r}]: expected a finite positive scalar, got "
                       f"{input_scale[m]!r}")
    out[m] = value
  return out


def _checked_feature_constants(constants: Mapping[str, Array], modalities: list[str]
                               ) -> dict[str, Array]:
  """float32 scalar non-negative finite `L^(m)` for exactly `modalities`."""
  if sorted(constants) != modalities:
    raise ValueError(f"feature_lipschitz: expected modalities {modalities}, got "
                     f"{sorted(constants)}")
  out = {}
  for m in modalities:
    value = jnp.asarray(constants[m], jnp.float32)
    if value.shape != ():
      raise ValueError(f"feature_lipschitz[{m!r}]: expected a scalar, got shape "
                       f"{tuple(value.shape)}")
    checks.check_finite(value, f"feature_lipschitz[{m!r}]", batched=False)
    concrete = numerics.concrete(value)
    if concrete is not None and concrete < 0:
      raise ValueError(f"feature_lipschitz[{m!r}]: expected a non-negative Lipschitz constant, "
                       f"got {float(concrete)}")
    out[m] = value
  return out


def radius_from_scores(scores: Mapping[str, Array], labels: Array, eta: Mapping[str, Array], *,
                       bias: Array | None = None, kind: str = "custom",
                       input_scale: Mapping[str, float] | None = None) -> Certificate:
  """Thm 3.3 (CRMT eq. 5) for any model whose fused logits are a sum of
  per-modality scores: `h(x) = sum_m s^(m)(x^(m)) + b`.

  With `eta^(m)_k` a Lipschitz constant of `s^(m)_y - s^(m)_k` in `x^(m)`
  (`local_lipschitz(score_fn, inputs, m, labels=labels)` without `kernel`
  estimates it; an upper bound makes the radius a certificate),

      r(x) = min_{k != y} (h_y(x) - h_k(x)) / sqrt(sum_m (eta^(m)_k)^2),

  the same bound as `certified_radius` for a JT head, where
  `eta^(m)_k = c^(m)_k tau^(m)_k`; no head parameters are needed.

  Args:
    scores: modality -> [B, K] per-modality scores `s^(m)`.
    labels: int [B] true labels `y`.
    eta: modality -> [B, K] or [1, K] constants for the pairs `(y_b, k)`
      (entry `k = y` ignored), non-negative.
    bias: optional [K] bias `b` of the fused logits.
    kind: recorded in the result ("local" | "empirical" | "sound" | "custom").
    input_scale: optional modality -> smallest std of its standardisation in
      input units: radii in input units (see `certified_radius`; `eta` is
      given per unit of normalised input either way).

  Returns:
    A `Certificate`. Pure and jit-able (value checks run on concrete inputs).

  Raises:
    ValueError for scores that are not one floating [B, K] shape with B >= 1,
    labels out of range, NaN/Inf scores or negative/NaN constants (when concrete).
  """
  modalities = sorted(scores)
  if not modalities or sorted(eta) != modalities:
    raise ValueError(f"eta: expected the modalities of scores {modalities}, got {sorted(eta)}")
  shapes = {m: tuple(jnp.shape(scores[m])) for m in modalities}
  if len(set(shapes.values())) != 1 or len(shapes[modalities[0]]) != 2:
    raise ValueError(f"scores: expected one [B, K] shape for every modality, got {shapes}")
  for m in modalities:
    dtype = jnp.asarray(scores[m]).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(f"scores[{m!r}]: expected a floating dtype (scores, not labels), got "
                       f"{dtype}")
  checks.check_nonempty(shapes[modalities[0]][0], "scores")
  logits = sum(jnp.asarray(scores[m], jnp.float32) for m in modalities)
  batch, num_classes = logits.shape
  if bias is not None:
    if jnp.shape(bias) != (num_classes,):
      raise ValueError(f"bias: expected [{num_classes}], got {tuple(jnp.shape(bias))}")
    logits = logits + jnp.asarray(bias, jnp.float32)
  labels = jnp.asarray(labels)
  checks.check_labels(labels, num_classes, batch_size=batch)
  checks.check_finite(logits, "scores")
  eta = {m: _checked_constants(f"eta[{m!r}]", eta[m], batch, num_classes) for m in modalities}
  return _radii_from_eta(logits, labels, eta, _checked_scales(input_scale, modalities), kind)


def _checked_constants(name: str, value: Array, batch: int, num_classes: int) -> Array:
  """float32 [B, K] or [1, K] non-negative finite constants, else a ValueError."""
  t = jnp.asarray(value, jnp.float32)
  if t.ndim != 2 or t.shape[0] not in (1, batch) or t.shape[1] != num_classes:
    raise ValueError(f"{name}: expected [B={batch}, K={num_classes}] or [1, K], got "
                     f"{tuple(t.shape)}")
  checks.check_finite(t, name, batched=False)
  concrete = numerics.concrete(t)
  if concrete is not None and np.any(concrete < 0):
    raise ValueError(f"{name}: expected non-negative Lipschitz constants, got minimum "
                     f"{concrete.min()}")
  return t


def pair_lipschitz(head, labels: Array, feature_lipschitz: Mapping[str, Array]
                   ) -> dict[str, Array]:
  """modality -> [B, K]: `||v_y - v_k|| L^(m)` for the pairs `(labels[b], k)`,
  the Lipschitz constant in `x^(m)` of modality m's term of `h_y - h_k` when
  `phi^(m)` has the one constant `L^(m)`; `v = W^(m)` (concat head) or
  `a^(m) W~^(m)` (orthogonal head: the tight Thm 3.5). 0 at `k = y`. Pure,
  jit-able and differentiable in the head parameters."""
  out = {}
  for m in sorted(head.kernels):
    kernel = head.kernels[m].astype(jnp.float32)
    if head.kind == "orthogonal":
      kernel = kernel * head.weights[m].astype(jnp.float32)[None]
    out[m] = integration_factors(kernel)[labels] * feature_lipschitz[m]
  return out


def vulnerability_indicators(head, labels: Array, taus: Mapping[str, Array],
                             feature_lipschitz: Mapping[str, Array] | None = None
                             ) -> dict[str, Array]:
  """`eta^(m)_k` for the pairs `(labels[b], k)`, modality -> [B, K] (entry
  `k = y` meaningless; `_radii_from_eta` zeroes it).

  Concat head (Thm 3.3): `c^(m)_k tau^(m)_k`. Orthogonal head (Thm 3.5, `|a|`
  for sign safety): `|a_y| tau~_y + |a_k| tau~_k`. With `feature_lipschitz`,
  the minimum with the one-constant forms of `pair_lipschitz`
  (`||W_y - W_k|| L^(m)`, or `||a_y W~_y - a_k W~_k|| L^(m)`: the tight
  Thm 3.5). Pure and jit-able.
  """
  batch = labels.shape[0]
  eta = {}
  for m in sorted(head.kernels):
    kernel = head.kernels[m].astype(jnp.float32)
    tau = jnp.broadcast_to(taus[m], (batch, kernel.shape[-1]))
    if head.kind == "concat":
      eta[m] = integration_factors(kernel)[labels] * tau  # c^(m)_k tau^(m)_k
    else:
      a_tau = jnp.abs(head.weights[m].astype(jnp.float32))[None] * tau  # [B, K]
      eta[m] = jnp.take_along_axis(a_tau, labels[:, None], axis=1) + a_tau
  if feature_lipschitz is not None:
    tight = pair_lipschitz(head, labels, feature_lipschitz)
    eta = {m: jnp.minimum(eta[m], tight[m]) for m in eta}
  return eta


@functools.partial(jax.jit, static_argnames=("kind",))
def _radii(output: ModelOutput, labels: Array, taus: dict[str, Array],
           feature_lipschitz: dict[str, Array] | None, input_scale: dict[str, Array] | None,
           kind: str) -> Certificate:
  """The computation of `certified_radius` (arguments already checked): the
  vulnerability indicators of the head, then `_radii_from_eta`."""
  eta = vulnerability_indicators(output.head, labels, taus, feature_lipschitz)
  return _radii_from_eta(output.logits.astype(jnp.float32), labels, eta, input_scale, kind)


@functools.partial(jax.jit, static_argnames=("kind",))
def _radii_from_eta(logits: Array, labels: Array, eta: dict[str, Array],
                    input_scale: dict[str, Array] | None, kind: str) -> Certificate:
  """Radii from fused logits [B, K] and vulnerability indicators modality -> [B|1, K]
  (per unit of normalised input; with `input_scale`, divided by it: input
  units, `mmsafe.certify.units`)."""
  batch, num_classes = logits.shape
  modalities = sorted(eta)
  if input_scale is not None:
    eta = {m: e / input_scale[m] for m, e in eta.items()}
  is_label = numerics.label_mask(labels, num_classes)
  logit_y = jnp.take_along_axis(logits, labels[:, None], axis=1)
  margin = jnp.where(is_label, 0.0, logit_y - logits)  # h_y - h_k
  eta = {m: jnp.where(is_label, 0.0, jnp.broadcast_to(e, (batch, num_classes)))
         for m, e in eta.items()}
  finite = jnp.all(jnp.isfinite(logits), axis=-1)
  for e in eta.values():  # (an infinite indicator is sound: it gives radius 0)
    finite = finite & ~jnp.any(jnp.isnan(e), axis=-1)
  correct = (jnp.argmax(logits, axis=-1) == labels) & finite

  def radius_from(denominator):
    # margin / denominator, with a zero denominator meaning no perturbation can
    # move h_y - h_k: +inf if the margin is positive, 0 (never certified) else.
    ok = denominator > 0
    ratio = margin / jnp.where(ok, denominator, 1.0)
    ratio = jnp.where(ok, ratio, jnp.where(margin > 0, jnp.inf, 0.0))
    return jnp.where(is_label, jnp.inf, ratio)

  def certified(per_class):
    return jnp.where(correct, jnp.maximum(jnp.min(per_class, axis=-1), 0.0), 0.0)

  per_class = radius_from(jnp.sqrt(sum(eta[m] ** 2 for m in modalities)))
  per_modality = {m: certified(radius_from(eta[m])) for m in modalities}
  return Certificate(radius=certified(per_class), per_modality=per_modality,
                     per_class=per_class, eta=eta, correct=correct, margin=margin, kind=kind,
                     finite=finite, units=UNITS[input_scale is not None])


def concatenate(certificates: Iterable[Certificate]) -> Certificate:
  """Joins the certificates of several batches along the batch axis."""
  certificates = list(certificates)
  if not certificates:
    raise ValueError("concatenate: expected at least one certificate")
  for field in ("kind", "units"):
    values = {getattr(c, field) for c in certificates}
    if len(values) > 1:
      raise ValueError(f"concatenate: certificates of different {field}s {sorted(values)}")
  return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *certificates)
