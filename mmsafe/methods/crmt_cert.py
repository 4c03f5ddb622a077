"""CRMT trained on its sound certificate (`crmt_cert`; mmsafe's design, not in the paper).

The paper's CRMT (`crmt.py`) raises every uni-modal score margin (L1, eq. 12)
and then tunes `a` on an *estimated* bound. With encoders that state a sound
bound `L^(m) >= Lip(phi^(m))` (e.g. the 1-Lipschitz encoders of
`mmsafe.models`), the certified radius of the orthogonal head is the tight
Thm 3.5:

    r_k(x) = (h~_y(x) - h~_k(x)) / K_k,
    K_k^2 = sum_m (||a^(m)_y W~^(m)_y - a^(m)_k W~^(m)_k|| L^(m))^2.

`crmt_cert` trains for that ratio directly:

* Step 1: cross-entropy of the radius logits `t (eps - r_k(x))` for
  `k != y` (0 for `y`): their argmax is `y` exactly when `r_k(x) > eps` for
  every wrong `k`, i.e. when `x` is certified at radius `eps`. This is
  Lipschitz-margin training (Tsuzuku, Sato & Sugiyama, NeurIPS 2018; GloRo
  nets, Leino, Wang & Fredrikson, ICML 2021, do the same with their
  constants) with the pairwise constants of Thm 3.5, each logit divided by
  its constant so the loss cannot be lowered by shrinking the head's scale
  (`radius_logits`). Plus `rho` times CRMT's
  L1 (eq. 12) on the uni-modal margins *normalised by their Lipschitz
  constants* `(u_y - u_k) / (||W~_y - W~_k|| L^(m))`, the uni-modal certified
  radius of each representation margin (Prop. 3.4 for one modality), so the
  regulariser rewards the quantity the certificate measures rather than raw
  score scale.
* Step 2: CRMT step 2 on the sound constants: `a` maximises the mean tight
  Thm 3.5 radius at the closest wrong class.

`L^(m)` comes from `model.feature_lipschitz()` inside the step (constant 1
for AOL/Cayley/SLL encoders; an exact spectral norm for orthogonal or free
dense layers, through which the gradient also flows). With free
convolutional encoders every step would compute their operator norms: use
Lipschitz encoders.

Hyper-parameters (`config.method_kwargs`): `cert_eps` (the target radius
`eps`), `cert_temperature` (`t`), `cert_rho` (weight of the normalised L1; 0
turns it off), `l1_floor`, `step2_lipschitz` (None: "sound").
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses

import jax
import jax.numpy as jnp

from mmsafe.certify.bounds import pair_lipschitz
from mmsafe.certify.constants import integration_factors
from mmsafe.methods import crmt
from mmsafe.methods.common import accuracy, apply_model, cross_entropy, required
from mmsafe.methods.registry import Stage, register
from mmsafe.numerics import label_mask

Array = jax.Array


def certificate_denominator(output, labels: Array, feature_lipschitz: Mapping[str, Array]
                            ) -> Array:
  """`K_k = sqrt(sum_m (||a_y W~_y - a_k W~_k|| L^(m))^2)`, the tight Thm 3.5
  denominator for the pairs `(labels[b], k)`, [B, K] (0 at `k = y`)."""
  eta = pair_lipschitz(output.head, labels, feature_lipschitz)
  is_label = label_mask(labels, output.logits.shape[-1])
  squares = sum(jnp.square(e) for e in eta.values())
  return jnp.where(is_label, 0.0, jnp.sqrt(jnp.where(is_label, 1.0, squares) + 1e-12))


def radius_logits(output, labels: Array, feature_lipschitz: Mapping[str, Array], *,
                  eps: float, temperature: float) -> Array:
  """`t (eps - r_k(x))` for `k != y` and 0 for `y`, [B, K], with `r_k` the tight
  Thm 3.5 radius: `y` is their argmax iff `x` is certified at radius `eps`.

  Cross-entropy on them is `log(1 + sum_{k != y} exp(t (eps - r_k)))`, a soft
  hinge on every pairwise radius. It is the Lipschitz-margin loss on
  `h~_k + eps K_k` divided by `K_k`, which makes it invariant to a common
  scale of `a` and `b~`: the plain margin loss can reach its floor `log K`
  by shrinking `a` towards 0 while nothing is certified yet (it does, from
  `a = 0.1`), so training would stall at chance.
  """
  logits = output.logits.astype(jnp.float32)
  is_label = label_mask(labels, logits.shape[-1])
  margin = jnp.take_along_axis(logits, labels[:, None], axis=1) - logits
  denominator = certificate_denominator(output, labels, feature_lipschitz)
  radius = margin / jnp.where(is_label, 1.0, denominator)
  return jnp.where(is_label, 0.0, temperature * (eps - radius))


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


def step1_loss(output, labels: Array, feature_lipschitz: Mapping[str, Array], *, eps: float,
               temperature: float, rho: float, floor: float) -> tuple[Array, dict]:
  """`CE(radius logits) + rho * L1(normalised margins)` and its parts."""
  logits = radius_logits(output, labels, feature_lipschitz, eps=eps, temperature=temperature)
  hinge = cross_entropy(logits, labels)
  metrics = {"radius_ce": hinge, "accuracy": accuracy(output.logits, labels),
             "certified_accuracy": accuracy(logits, labels)}
  if not rho:
    return hinge, metrics
  l1 = crmt.margin_regularizer(normalized_scores(output, labels, feature_lipschitz), labels,
                               floor).mean()
  return hinge + rho * l1, {**metrics, "l1": l1}


def _step1(model, config):
  eps = float(required(config, "cert_eps", "crmt_cert"))
  temperature = float(required(config, "cert_temperature", "crmt_cert"))
  rho = float(required(config, "cert_rho", "crmt_cert"))
  floor = float(required(config, "l1_floor", "crmt_cert"))
  if not eps > 0:
    raise ValueError(f"method_kwargs.cert_eps: expected > 0, got {eps}")
  if not temperature > 0:
    raise ValueError(f"method_kwargs.cert_temperature: expected > 0, got {temperature}")

  def loss_fn(params, state, batch, rng):
    del rng
    out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
    bounds = model.apply({"params": params, **state.get("model", {})},
                         method="feature_lipschitz")
    loss, metrics = step1_loss(out, batch["label"], bounds, eps=eps, temperature=temperature,
                               rho=rho, floor=floor)
    return loss, (new_state, metrics)

  return loss_fn


def _step2(model, config=None):
  return crmt.step2_objective(model, config, default_lipschitz="sound")


register("crmt_cert", head="orthogonal",
         description="CRMT on its sound certificate: radius hinge + normalised L1 "
                     "(step 1), modality weights on the tight sound bound (step 2)",
         stages=(Stage("step1", _step1), dataclasses.replace(crmt.STEP2, make_objective=_step2)),
         init_state=crmt.init_state, callbacks=(crmt.PrepareStep2(default_lipschitz="sound"),))(
             None)
