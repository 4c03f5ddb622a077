"""PMR: Prototypical Modal Rebalance (Fan, Xu, Wang, Wang & Guo, "PMR:
Prototypical Modal Rebalance for Multimodal Learning", CVPR 2023; reference
code fanyunfeng-bit/Modal-Imbalance-PMR, `main_Prototype_grad.py`).

Per modality m and class k a prototype `c^(m)_k`, the mean feature `phi^(m)`
of class k (the paper's class-centroid prototypes), kept in the method state.
The prototypes define a non-parametric uni-modal classifier with logits
`-d(phi^(m)(x), c^(m)_k)`, `d` the Euclidean distance (not squared, as the
reference code), i.e. the prototypical prediction
`p^(m)_k(x) = softmax_k(-d(phi^(m)(x), c^(m)_k))`, and its cross-entropy is the
prototypical cross-entropy (the paper's PCE loss)
`PCE^(m) = -mean_i log p^(m)_{y_i}(x_i)`. Each step:

1. Imbalance ratio from the prototypical confidences (the paper's ratio of
   summed prototypical probabilities of the true class, as the reference code):
   `score^(m) = sum_i p^(m)_{y_i}(x_i)`,
   `rho^(m) = score^(m) / mean_{j != m} score^(j)` (M = 2: `score_a / score_v`
   and its inverse). `rho^(m) < 1`: m learns slower; `rho^(m) > 1`: m dominates.
2. The loss (the paper's total objective: CE, PCE on the slow modality and the
   prototype-based entropy regulariser on the dominant one),
   `L = CE(h(x), y) + sum_m beta^(m) PCE^(m) - sum_m mu^(m) H^(m)`, with
   `H^(m) = mean_i -sum_k p^(m)_k(x_i) log p^(m)_k(x_i)` (the entropy of the
   prototypical predictions) and the ratio rule:
   `beta^(m) = pmr_alpha` where `rho^(m) < 1`, else 0 (the weaker modality is
   pulled toward its class prototypes, which accelerates its encoder without
   interference from the fused head);
   `mu^(m) = pmr_entropy_weight` where `rho^(m) > 1`, else 0, and only in the
   early epochs `pmr_start_epoch .. pmr_entropy_end_epoch`: maximising the
   entropy of the dominant modality's prototypical predictions keeps it from
   converging prematurely and suppressing the slow one.
3. The prototypes are constants in the loss (the reference computes them
   under `no_grad`); after the loss they are updated from the batch (below).
Active for epochs `pmr_start_epoch .. pmr_end_epoch` (inclusive; end None: to
the end), from the method's own step counter and `steps_per_epoch`.

Equations: the terms are named as the paper names them (class-centroid
prototypes, prototypical cross-entropy, imbalance ratio, prototype-based
entropy regularisation and the total loss of step 2); mmsafe implements them
from the paper's method section and the reference code, and gives no
equation numbers it could not check against the paper's text.

Choices and simplifications (documented on purpose):
* Coefficients: a constant `alpha` on the weaker modality, as the reference
  code (the paper scales the coefficient with the imbalance ratio; mmsafe
  follows the released code the CRMT comparison builds on), and, alike, a
  constant `mu` on the dominant one. The reference training script has no
  entropy term; it is implemented from the paper's description (the
  prototype-based entropy regularisation of the dominant modality in the
  early training stage), with weight `pmr_entropy_weight` (0: off, the
  reference script) and last epoch `pmr_entropy_end_epoch` (mmsafe's choices).
* Prototype estimation: the reference recomputes class means once per epoch
  on 10% of the training set (evaluation mode) and smooths them across epochs
  (`c <- (1 - mu) c_new + mu c_old`). mmsafe keeps it inside the pure step: an
  exponential moving average over steps of the batch's class-mean features
  (training-mode features, no gradient),
  `c_k <- m c_k + (1 - m) mean_{i: y_i = k} phi_i` for the classes in the
  batch, a class's first batch setting `c_k` directly; `m = pmr_momentum`.
  The PCE and entropy terms are off until every class has a prototype.
* M > 2: every modality with `rho < 1` gets `alpha`, every one with `rho > 1`
  gets `mu` (M = 2: the paper's rule).
* Distances use a gradient-safe square root (finite at zero distance).

Hyper-parameters: `PMRSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses

import jax
import jax.numpy as jnp

from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.ogm import confidence_scores, discrepancy_ratios, window_active
from mmsafe.methods.registry import register
from mmsafe.methods.settings import Settings, setting

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PMRSettings(Settings):
  """PMR (Fan et al., CVPR 2023, Sec. 3.2-3.3).

  Attributes:
    pmr_alpha: `alpha`, the weight of the prototypical CE on the slower
      modality (eq. 7), >= 0; 1.0, the reference code's default.
    pmr_momentum: the per-step EMA momentum of the prototypes, in [0, 1); 0.9
      (mmsafe's; the reference smooths per-epoch means with 0.5 in its
      Kinetics-Sounds script).
    pmr_start_epoch, pmr_end_epoch: the epochs rebalanced, inclusive, >= 0; end
      None: every epoch from the start (reference: 0..100 of 150).
    pmr_entropy_weight: `mu`, the weight of the prototype entropy on the
      dominant modality (eq. 8), >= 0; 0.1 (mmsafe's; 0 turns it off).
    pmr_entropy_end_epoch: the last epoch of that entropy term, >= 0; 4
      (mmsafe's); None: no end.
    steps_per_epoch: optimizer steps per epoch, >= 1, set by the training
      loop; needed only when a window is not every epoch.
  """

  pmr_alpha: float = setting(1.0, minimum=0.0)
  pmr_momentum: float = setting(0.9, minimum=0.0, maximum=1.0, exclusive_maximum=True)
  pmr_start_epoch: int = setting(0, minimum=0)
  pmr_end_epoch: int | None = setting(None, minimum=0)
  pmr_entropy_weight: float = setting(0.1, minimum=0.0)
  pmr_entropy_end_epoch: int | None = setting(4, minimum=0)
  steps_per_epoch: int | None = setting(None, minimum=1)

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


def prototype_entropy(logits: Array) -> Array:
  """`H = mean_i -sum_k p_ik log p_ik`, `p = softmax(logits)` (PMR's entropy term)."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def rebalance_coefficients(ratios: Mapping[str, Array], alpha: float) -> dict[str, Array]:
  """`beta`: `alpha` for every modality slower than the others (`rho < 1`), else 0."""
  return {m: jnp.where(r < 1.0, alpha, 0.0) for m, r in ratios.items()}


def entropy_coefficients(ratios: Mapping[str, Array], weight: float) -> dict[str, Array]:
  """`mu`: `weight` for every dominant modality (`rho > 1`), else 0."""
  return {m: jnp.where(r > 1.0, weight, 0.0) for m, r in ratios.items()}


def init_state(model, variables, settings: Settings | None = None) -> dict:
  """Zero prototypes `[K, d_m]` per modality (dimensions from the head kernels)."""
  del settings
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


@register("pmr", head="concat", settings=PMRSettings, init_state=init_state,
          description="PMR: prototypical CE on the slower modality, entropy on the dominant one")
def make_objective(model, settings: PMRSettings):
  alpha, momentum = settings.pmr_alpha, settings.pmr_momentum
  entropy_weight = settings.pmr_entropy_weight
  start, steps_per_epoch = settings.pmr_start_epoch, settings.steps_per_epoch
  window = (start, settings.pmr_end_epoch, steps_per_epoch, "pmr")
  # The entropy window: the PMR window, ending at pmr_entropy_end_epoch.
  entropy_window = (start, settings.pmr_entropy_end_epoch, steps_per_epoch, "pmr")
  window_active(jnp.zeros((), jnp.int32), *window)  # checks the settings now
  window_active(jnp.zeros((), jnp.int32), *entropy_window)

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
    active = jnp.logical_and(ready, window_active(pmr["step"], *window))
    coefficients = {m: jnp.where(active, b, 0.0)
                    for m, b in rebalance_coefficients(ratios, alpha).items()}
    early = jnp.logical_and(active, window_active(pmr["step"], *entropy_window))
    entropy = {m: prototype_entropy(z) for m, z in logits.items()}
    entropy_coefficient = {m: jnp.where(early, w, 0.0)
                           for m, w in entropy_coefficients(ratios, entropy_weight).items()}
    loss = (ce + sum(coefficients[m] * pce[m] for m in pce)
            - sum(entropy_coefficient[m] * entropy[m] for m in entropy))
    updated, seen = update_prototypes(pmr["prototypes"], pmr["seen"], out.features, labels,
                                      momentum)
    new_state = {**new_state, STATE_KEY: {"prototypes": updated, "seen": seen,
                                          "step": pmr["step"] + 1}}
    metrics = {"ce": ce, "accuracy": accuracy(out.logits, labels),
               **{f"pce_{m}": v for m, v in pce.items()},
               **{f"ratio_{m}": r for m, r in ratios.items()},
               **{f"coefficient_{m}": b for m, b in coefficients.items()},
               **{f"entropy_{m}": h for m, h in entropy.items()},
               **{f"entropy_coefficient_{m}": w for m, w in entropy_coefficient.items()}}
    return loss, (new_state, metrics)

  return loss_fn
