"""Methods trained on their sound certificate: `jt_cert`, `ojt_cert`, `crmt_cert`.

mmsafe's design, not in the paper. With encoders that state a sound bound
`L^(m) >= Lip(phi^(m))` (e.g. the 1-Lipschitz encoders of `mmsafe.models`),
every head has a sound certified radius `r_k(x) = (h_y(x) - h_k(x)) / K_k` for
each wrong class `k`, with `K_k = sqrt(sum_m (eta^(m)_k)^2)` and the
per-modality indicators `eta^(m)_k = ||v^(m)_y - v^(m)_k|| L^(m)`
(`certify.pair_lipschitz`):

* concat head (`jt_cert`, the control), `v^(m) = W^(m)`. Proof: the margin
  `(W_y - W_k) . [phi^(1)(x_1); ...; phi^(M)(x_M)] + b_y - b_k` is
  `sum_m (W^(m)_y - W^(m)_k) . phi^(m)(x_m) + b_y - b_k`. A perturbation
  `d = (d_1, ..., d_M)` moves term m by at most
  `||W^(m)_y - W^(m)_k|| ||phi^(m)(x_m + d_m) - phi^(m)(x_m)|| <= eta^(m)_k ||d_m||`
  (Cauchy-Schwarz, then the Lipschitz bound), so the margin moves by at most
  `sum_m eta^(m)_k ||d_m|| <= sqrt(sum_m (eta^(m)_k)^2) ||d||` (Cauchy-Schwarz
  over modalities): the joint Lipschitz constant of the margin is at most
  `K_k`, and no class overtakes `y` while `||d|| < r_k`. Both inequalities
  are equalities for linear encoders with orthonormal rows, where `r_k` is
  the exact minimal flipping perturbation (tested).
* orthogonal head (`ojt_cert`, `crmt_cert`), `v^(m)_k = a^(m)_k W~^(m)_k`: the
  tight Thm 3.5 (CRMT eq. 10 without its triangle inequality;
  `mmsafe.certify.bounds`).

Perturbing modality m alone, `r^(m)_k = (h_y - h_k) / eta^(m)_k` (Prop. 3.4);
an attacker who picks the modality has the worst-modality radius
`min_m r^(m) = min_k (h_y - h_k) / max_m eta^(m)_k`.

Step 1 of all three minimises the cross-entropy of the radius logits
`t (eps - r_k(x))` for `k != y` (0 for `y`): their argmax is `y` exactly when
`r_k(x) > eps` for every wrong `k`, i.e. when `x` is certified at radius
`eps`. This is Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS
2018; GloRo nets, Leino, Wang & Fredrikson, ICML 2021) with the pairwise
constants above, each logit divided by its constant so the loss cannot be
lowered by shrinking the head's scale (`radius_logits`). Optional terms:

* `uni_weight` times the same hinge on the worst-modality radius at
  `uni_eps` (a multi-modal objective: it asks for a certified margin against
  the attacker who spends the whole budget on one modality);
* `missing_weight` times the mean over modalities of the same hinge on the
  missing-modality certificate: losing modality m (replaced by its fill
  `f_m`, zeros) is a perturbation of norm `d_m = ||x_m - f_m||` in m alone,
  certified when `r^(m) > d_m` (logits `t eps (1 - r^(m)_k / d_m)`);
* `rho` times CRMT's L1 (eq. 12) on the uni-modal margins *normalised by
  their Lipschitz constants* `(u_y - u_k) / (||W~_y - W~_k|| L^(m))`, the
  uni-modal certified radius of each representation margin (orthogonal head
  only).

`crmt_cert` adds CRMT's step 2 on the sound constants: only `a` moves, on the
tight Thm 3.5 radius, with step 1's radius hinge at `eps` as its objective
(`step2_objective` None: "radius_hinge"; the paper's mean
radius, "mean_radius", can switch a class off: `crmt.step2_loss`).
`ojt_cert` is `crmt_cert` without step 2 and `jt_cert` the same hinge on the
concat head: the controls that tell CRMT's structure (orthogonal head,
modality weights, step 2) apart from training on a certificate at all.

`L^(m)` comes from `model.feature_lipschitz()` inside the step (constant 1
for AOL/Cayley/SLL encoders; an exact spectral norm for orthogonal or free
dense layers, through which the gradient also flows). With free
convolutional encoders every step would compute their operator norms: use
Lipschitz encoders.

Hyper-parameters: `CertSettings` (jt_cert, ojt_cert) and `CRMTCertSettings`
(crmt_cert, adding `crmt.Step2Settings`, whose None defaults mean "sound"
and "radius_hinge" here).
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools

import jax
import jax.numpy as jnp

from mmsafe.certify.bounds import pair_lipschitz
from mmsafe.certify.constants import integration_factors
from mmsafe.methods import crmt
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import Stage, add_method, register
from mmsafe.methods.settings import Settings, setting
from mmsafe.numerics import label_mask

Array = jax.Array


def _pair_indicators(output, labels: Array, feature_lipschitz: Mapping[str, Array]
                     ) -> tuple[dict[str, Array], Array]:
  """modality -> [B, K] `eta^(m)_k` for the pairs `(labels[b], k)`, and the
  [B, K] mask of `k = y`."""
  eta = pair_lipschitz(output.head, labels, feature_lipschitz)
  return eta, label_mask(labels, output.logits.shape[-1])


def certificate_denominator(output, labels: Array, feature_lipschitz: Mapping[str, Array]
                            ) -> Array:
  """`K_k = sqrt(sum_m (eta^(m)_k)^2)`, the joint Lipschitz constant of the
  margin `h_y - h_k` for the pairs `(labels[b], k)`, [B, K] (0 at `k = y`)."""
  eta, is_label = _pair_indicators(output, labels, feature_lipschitz)
  squares = sum(jnp.square(e) for e in eta.values())
  return jnp.where(is_label, 0.0, jnp.sqrt(jnp.where(is_label, 1.0, squares) + 1e-12))


def worst_modality_denominator(output, labels: Array, feature_lipschitz: Mapping[str, Array]
                               ) -> Array:
  """`max_m eta^(m)_k`, [B, K] (0 at `k = y`): the margin divided by it is the
  worst-modality radius `min_m r^(m)_k` (Prop. 3.4 for each modality)."""
  eta, is_label = _pair_indicators(output, labels, feature_lipschitz)
  worst = functools.reduce(jnp.maximum, eta.values())
  return jnp.where(is_label, 0.0, worst + 1e-12)


def _logits_of_radii(output, labels: Array, denominator: Array, *, eps: float,
                     temperature: float) -> Array:
  """`t (eps - margin_k / denominator_k)` for `k != y`, 0 at `y`, [B, K]."""
  logits = output.logits.astype(jnp.float32)
  is_label = label_mask(labels, logits.shape[-1])
  margin = jnp.take_along_axis(logits, labels[:, None], axis=1) - logits
  radius = margin / jnp.where(is_label, 1.0, denominator)
  return crmt.radius_hinge_logits(radius, labels, eps=eps, temperature=temperature)


def radius_logits(output, labels: Array, feature_lipschitz: Mapping[str, Array], *,
                  eps: float, temperature: float) -> Array:
  """`t (eps - r_k(x))` for `k != y` and 0 for `y`, [B, K], with `r_k` the
  sound joint radius (see the module docstring): `y` is their argmax iff `x`
  is certified at radius `eps`.

  Cross-entropy on them is `log(1 + sum_{k != y} exp(t (eps - r_k)))`, a soft
  hinge on every pairwise radius. It is the Lipschitz-margin loss on
  `h_k + eps K_k` divided by `K_k`, which makes it invariant to a common
  scale of the head (`a` and `b~`, or `W` and `b`): the plain margin loss
  can reach its floor `log K` by shrinking `a` towards 0 while nothing is
  certified yet (it does, from `a = 0.1`), so training would stall at chance.
  """
  denominator = certificate_denominator(output, labels, feature_lipschitz)
  return _logits_of_radii(output, labels, denominator, eps=eps, temperature=temperature)


def worst_modality_logits(output, labels: Array, feature_lipschitz: Mapping[str, Array], *,
                          eps: float, temperature: float) -> Array:
  """`radius_logits` for the worst-modality radius: `y` is their argmax iff
  no single modality can be moved by `eps` to flip the prediction."""
  denominator = worst_modality_denominator(output, labels, feature_lipschitz)
  return _logits_of_radii(output, labels, denominator, eps=eps, temperature=temperature)


def missing_modality_logits(output, labels: Array, feature_lipschitz: Mapping[str, Array],
                            distances: Mapping[str, Array], *, eps: float, temperature: float
                            ) -> dict[str, Array]:
  """modality -> [B, K] `t eps (1 - r^(m)_k(x) / d_m(x))` for `k != y` (0 at
  `y`), with `d_m = ||x_m - f_m||` the distance to the modality's fill: `y` is
  their argmax iff losing modality m (replaced by its fill, a uni-modal
  perturbation of norm `d_m`) provably keeps the prediction
  (`mmsafe.certify.threats.missing_certified`). Scaled by `eps` so that a
  unit relative shortfall weighs like the joint hinge's shortfall of `eps`."""
  eta, _ = _pair_indicators(output, labels, feature_lipschitz)
  return {m: _logits_of_radii(output, labels, eta[m] * distances[m][:, None] + 1e-12, eps=1.0,
                              temperature=temperature * eps)
          for m in sorted(eta)}


def fill_distances(inputs: Mapping[str, Array]) -> dict[str, Array]:
  """modality -> [B] `||x_m||`: the distance to the "zeros" fill (the training
  mean of standardised inputs) that missing-modality evaluation uses."""
  return {m: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1))
          for m, x in inputs.items()}


def normalized_scores(output, labels: Array, feature_lipschitz: Mapping[str, Array]
                      ) -> dict[str, Array]:
  """modality -> [B, K] scores `u'_k = (u_k - u_y) / (||W~_y - W~_k|| L^(m))`
  (`u'_y = 0`): `u'_y - u'_k` is the uni-modal margin divided by its
  Lipschitz constant, so `crmt.margin_regularizer` on them is L1 (eq. 12) on
  the uni-modal certified radii of the representation margins."""
  out = {}
  for m, kernel in output.head.kernels.items():
    constant = integration_factors(kernel.astype(jnp.float32))[labels] * feature_lipschitz[m]
    scores = output.scores[m].astype(jnp.float32)
    differences = scores - jnp.take_along_axis(scores, labels[:, None], axis=1)
    out[m] = differences / jnp.maximum(constant, 1e-12)
  return out


@dataclasses.dataclass(frozen=True)
class CertifiedLoss:
  """The step-1 loss's hyper-parameters (see the module docstring)."""

  eps: float
  temperature: float
  rho: float = 0.0
  floor: float = 0.0
  uni_weight: float = 0.0
  uni_eps: float = 0.0
  missing_weight: float = 0.0


def step1_loss(output, labels: Array, feature_lipschitz: Mapping[str, Array],
               loss: CertifiedLoss, distances: Mapping[str, Array] | None = None
               ) -> tuple[Array, dict]:
  """`CE(radius logits) + uni_weight * CE(worst-modality logits) +
  missing_weight * mean_m CE(missing-modality logits of m) + rho *
  L1(normalised margins)` and its parts (`distances`: `fill_distances` of the
  batch, needed with `missing_weight`)."""
  logits = radius_logits(output, labels, feature_lipschitz, eps=loss.eps,
                         temperature=loss.temperature)
  hinge = cross_entropy(logits, labels)
  value = hinge
  metrics = {"radius_ce": hinge, "accuracy": accuracy(output.logits, labels),
             "certified_accuracy": accuracy(logits, labels)}
  if loss.uni_weight:
    uni_logits = worst_modality_logits(output, labels, feature_lipschitz, eps=loss.uni_eps,
                                       temperature=loss.temperature)
    uni = cross_entropy(uni_logits, labels)
    value = value + loss.uni_weight * uni
    metrics.update(worst_modality_ce=uni, worst_modality_certified=accuracy(uni_logits, labels))
  if loss.missing_weight:
    missing = missing_modality_logits(output, labels, feature_lipschitz, distances,
                                      eps=loss.eps, temperature=loss.temperature)
    missing_ce = sum(cross_entropy(v, labels) for v in missing.values()) / len(missing)
    value = value + loss.missing_weight * missing_ce
    metrics.update(missing_ce=missing_ce, **{f"missing_{m}_certified": accuracy(v, labels)
                                             for m, v in missing.items()})
  if loss.rho:
    l1 = crmt.margin_regularizer(normalized_scores(output, labels, feature_lipschitz), labels,
                                 loss.floor).mean()
    value = value + loss.rho * l1
    metrics["l1"] = l1
  return value, metrics


@dataclasses.dataclass(frozen=True)
class CertSettings(Settings):
  """Step 1 on the sound certificate: a hinge on every pairwise tight Thm 3.5
  radius (Yang et al., ICLR 2024, eq. 10) plus optional terms. The defaults
  are mmsafe's choices by validation certified accuracy on mfeat (4 is used
  for `cert_eps` on av_digits; rho 0.5 cost 20+ points).

  Attributes:
    cert_eps: the target radius `eps` of the hinge, > 0; 3.
    cert_temperature: the hinge's temperature `t`, > 0; 4.
    cert_rho: the weight of L1 on the Lipschitz-normalised uni-modal margins
      (eq. 12 on `normalized_scores`; orthogonal head only), >= 0; 0 (off).
    l1_floor: added inside that L1's logarithm, >= 0; 1e-5 (the paper's code).
    cert_uni_weight: the weight of the same hinge on the worst-modality radius
      (Prop. 3.4), >= 0; 0 (off).
    cert_uni_eps: that hinge's target radius, > 0; needed when the weight is
      not 0.
    cert_missing_weight: the weight of the hinge on each modality's
      missing-modality certificate, >= 0; None or 0: off.
  """

  cert_eps: float = setting(3.0, minimum=0.0, exclusive_minimum=True)
  cert_temperature: float = setting(4.0, minimum=0.0, exclusive_minimum=True)
  cert_rho: float = setting(0.0, minimum=0.0)
  l1_floor: float = setting(1e-5, minimum=0.0)
  cert_uni_weight: float = setting(0.0, minimum=0.0)
  cert_uni_eps: float | None = setting(None, minimum=0.0, exclusive_minimum=True)
  cert_missing_weight: float | None = setting(None, minimum=0.0)

  def check(self) -> None:
    if self.cert_uni_weight and self.cert_uni_eps is None:
      raise ValueError(f"method_kwargs.cert_uni_eps: expected a finite number > 0 with "
                       f"cert_uni_weight {self.cert_uni_weight}, got None")


@dataclasses.dataclass(frozen=True)
class CRMTCertSettings(CertSettings, crmt.Step2Settings):
  """crmt_cert: step 1 on the certificate (`CertSettings`), then CRMT step 2
  (`crmt.Step2Settings`; None: "sound" constants and "radius_hinge")."""


def certified_loss(settings: CertSettings) -> CertifiedLoss:
  """The step-1 loss's constants from the method's settings."""
  uni_weight = settings.cert_uni_weight
  return CertifiedLoss(eps=settings.cert_eps, temperature=settings.cert_temperature,
                       rho=settings.cert_rho, floor=settings.l1_floor, uni_weight=uni_weight,
                       uni_eps=settings.cert_uni_eps if uni_weight else 0.0,
                       missing_weight=settings.cert_missing_weight or 0.0)


def step1_objective(name: str):
  """`make_objective(model, settings)` of the certified step 1 for method `name`."""

  def make_objective(model, settings):
    loss = certified_loss(settings)

    def loss_fn(params, state, batch, rng):
      del rng
      out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
      if loss.rho and out.head.kind != "orthogonal":
        raise ValueError(f"method_kwargs.cert_rho: the normalised L1 needs the orthogonal "
                         f"head; {name} has {out.head.kind!r}, got rho {loss.rho}")
      bounds = model.apply({"params": params, **state.get("model", {})},
                           method="feature_lipschitz")
      value, metrics = step1_loss(out, batch["label"], bounds, loss,
                                  fill_distances(batch["inputs"]))
      return value, (new_state, metrics)

    return loss_fn

  return make_objective


def _step2(model, settings: CRMTCertSettings):
  return crmt.step2_objective(model, settings, default_lipschitz="sound",
                              default_objective="radius_hinge")


register("jt_cert", head="concat", settings=CertSettings,
         description="control: the radius hinge on the concat head's sound certificate")(
             step1_objective("jt_cert"))
register("ojt_cert", head="orthogonal", settings=CertSettings,
         description="control: the radius hinge on the orthogonal head (crmt_cert without "
                     "step 2)")(step1_objective("ojt_cert"))
add_method("crmt_cert", head="orthogonal", settings=CRMTCertSettings,
           description="CRMT on its sound certificate: radius hinge + normalised L1 "
                       "(step 1), modality weights on the tight sound bound (step 2)",
           stages=(Stage("step1", step1_objective("crmt_cert")),
                   dataclasses.replace(crmt.STEP2, make_objective=_step2)),
           init_state=crmt.init_state,
           callbacks=(crmt.PrepareStep2(default_lipschitz="sound"),))
