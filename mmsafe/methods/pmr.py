"""PMR: Prototypical Modal Rebalance (Fan, Xu, Wang, Wang & Guo, "PMR:
Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023; reference
code fanyunfeng-bit/Modal-Imbalance-PMR, `main_Prototype_grad.py`).

Per modality m and class k a prototype `c^(m)_k`, the mean feature `phi^(m)`
of class k, kept in the method state. The prototypes define a non-parametric
uni-modal classifier with logits `-||phi^(m)(x) - c^(m)_k||_2` (Euclidean
distance, not squared, as the reference code), and its cross-entropy is the
prototypical cross-entropy `PCE^(m)`. Each step:

1. Imbalance ratio from the prototypical confidences (reference code):
   `score^(m) = sum_i softmax(-d(phi^(m)_i, c^(m)))[y_i]`,
   `rho^(m) = score^(m) / mean_{j != m} score^(j)` (M = 2: `score_a / score_v`).
2. `L = CE(h(x), y) + sum_m beta^(m) PCE^(m)`, with `beta^(m) = pmr_alpha` for
   every slower modality (`rho^(m) < 1`) and 0 for the dominant one: the
   weaker modality is pulled toward its class prototypes, which accelerates
   its encoder without interference from the fused head.
3. The prototypes are constants in the loss (their reference computes them
   under `no_grad`); after the loss they are updated from the batch (below).
Active for epochs `pmr_start_epoch .. pmr_end_epoch` (inclusive; end None: to
the end), from the method's own step counter and `steps_per_epoch`.

Choices and simplifications (documented on purpose):
* Coefficient: the reference code's constant `alpha` on the weaker modality
  (the paper writes the coefficient as a function of the ratio; mmsafe
  follows the released code the CRMT comparison builds on).
* The paper's prototype-based entropy regulariser for the dominant modality
  in the early epochs is not part of the reference training script and is not
  implemented.
* Prototype estimation: the reference recomputes class means once per epoch
  on 10% of the training set (evaluation mode) and smooths them across epochs
  (`c <- (1 - mu) c_new + mu c_old`). mmsafe keeps it inside the pure step: an
  exponential moving average over steps of the batch's class-mean features
  (training-mode features, no gradient),
  `c_k <- mu c_k + (1 - mu) mean_{i: y_i = k} phi_i` for the classes in the
  batch, a class's first batch setting `c_k` directly; `mu = pmr_momentum`.
  The PCE term is off until every class has a prototype.
* M > 2: every modality with `rho < 1` gets `alpha` (M = 2: the paper's rule).
* Distances use a gradient-safe square root (finite at zero distance).

Hyper-parameters (`config.method_kwargs`): `pmr_alpha`, `pmr_momentum`,
`pmr_start_epoch`, `pmr_end_epoch`, and `steps_per_epoch` when the window is
not every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from mmsafe.methods.common import accuracy, apply_model, cross_entropy, required
from mmsafe.methods.ogm import confidence_scores, discrepancy_ratios, window_active
from mmsafe.methods.registry import register

Array = jax.Array

STATE_KEY = "pmr"


def euclidean_distances(features: Array, prototypes: Array) -> Array:
  """`||f_i - c_k||_2`, [B, K], with a square root whose gradient is finite at 0."""
  f = features.astype(jnp.float32)
  c = prototypes.astype(jnp.float32)
  squared = (jnp.sum(f * f, -1, keepdims=True) - 2.0 * f @ c.T + jnp.sum(c * c, -1)[None])
  squared = jnp.maximum(squared, 0.0)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def prototype_logits(features: Array, prototypes: Array) -> Array:
  """Logits of the prototype classifier: `-||phi - c_k||`, [B, K]."""
  return -euclidean_distances(features, prototypes)


def update_prototypes(prototypes: Mapping[str, Array], seen: Array,
                      features: Mapping[str, Array], labels: Array, momentum: float
                      ) -> tuple[dict[str, Array], Array]:
  """EMA of the batch's class-mean features: `(prototypes', seen')`.

  A class present in the batch moves to `mu c + (1 - mu) mean` (or to `mean`
  when it had no prototype yet); absent classes keep theirs. `seen` [K]
  (int32) marks classes that have a prototype.
  """
  num_classes = seen.shape[0]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)  # [B, K]
  counts = jnp.sum(onehot, axis=0)
  present = counts > 0
  had = seen > 0
  new = {}
  for m, c in prototypes.items():
    f = jax.lax.stop_gradient(features[m]).astype(jnp.float32)
    means = (onehot.T @ f) / jnp.maximum(counts, 1.0)[:, None]
    smoothed = jnp.where(had[:, None], momentum * c + (1.0 - momentum) * means, means)
    new[m] = jnp.where(present[:, None], smoothed, c)
  return new, jnp.where(present, 1, seen).astype(jnp.int32)


def rebalance_coefficients(ratios: Mapping[str, Array], alpha: float) -> dict[str, Array]:
  """`alpha` for every modality slower than the others (`rho < 1`), else 0."""
  return {m: jnp.where(r < 1.0, alpha, 0.0) for m, r in ratios.items()}


def init_state(model, variables, config: Mapping | None = None) -> dict:
  """Zero prototypes `[K, d_m]` per modality (dimensions from the head kernels)."""
  del config
  head = variables["params"]["head"]
  kernels = {m: head[f"kernel_{m}"] for m in sorted(model.input_shapes)
             if f"kernel_{m}" in head}
  if len(kernels) != len(model.input_shapes):
    raise ValueError(f"pmr: expected a concat head with kernel_<modality> entries, got "
                     f"{sorted(head)}")
  k = next(iter(kernels.values())).shape[-1]
  return {STATE_KEY: {"prototypes": {m: jnp.zeros((k, w.shape[0]), jnp.float32)
                                     for m, w in kernels.items()},
                      "seen": jnp.zeros((k,), jnp.int32),
                      "step": jnp.zeros((), jnp.int32)}}


@register("pmr", head="concat", init_state=init_state,
          description="PMR: prototypical CE on the slower modality (prototypes: EMA of features)")
def make_objective(model, config):
  alpha = float(required(config, "pmr_alpha", "pmr"))
  momentum = float(required(config, "pmr_momentum", "pmr"))
  if not 0.0 <= momentum < 1.0:
    raise ValueError(f"method_kwargs.pmr_momentum: expected in [0, 1), got {momentum}")
  window_active(jnp.zeros((), jnp.int32), config, "pmr", "pmr")  # checks the config now

  def loss_fn(params, state, batch, rng):
    del rng
    labels = batch["label"]
    pmr = state[STATE_KEY]
    out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
    ce = cross_entropy(out.logits, labels)
    prototypes = jax.lax.stop_gradient(pmr["prototypes"])
    logits = {m: prototype_logits(out.features[m], prototypes[m]) for m in sorted(prototypes)}
    pce = {m: cross_entropy(z, labels) for m, z in logits.items()}
    ratios = discrepancy_ratios(jax.lax.stop_gradient(confidence_scores(logits, labels)))
    ready = jnp.all(pmr["seen"] > 0)
    active = jnp.logical_and(ready, window_active(pmr["step"], config, "pmr", "pmr"))
    coefficients = {m: jnp.where(active, b, 0.0)
                    for m, b in rebalance_coefficients(ratios, alpha).items()}
    loss = ce + sum(coefficients[m] * pce[m] for m in pce)
    updated, seen = update_prototypes(pmr["prototypes"], pmr["seen"], out.features, labels,
                                      momentum)
    new_state = {**new_state, STATE_KEY: {"prototypes": updated, "seen": seen,
                                          "step": pmr["step"] + 1}}
    metrics = {"ce": ce, "accuracy": accuracy(out.logits, labels),
               **{f"pce_{m}": v for m, v in pce.items()},
               **{f"ratio_{m}": r for m, r in ratios.items()},
               **{f"coefficient_{m}": b for m, b in coefficients.items()}}
    return loss, (new_state, metrics)

  return loss_fn
