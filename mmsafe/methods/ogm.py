"""OGM-GE: On-the-fly Gradient Modulation with Generalisation Enhancement
(Peng, Wei, Deng, Wang & Hu, "Balanced Multimodal Learning via On-the-fly
Gradient Modulation", CVPR 2022; reference code GeWu-Lab/OGM-GE_CVPR2022).

The loss is plain cross-entropy of the fused logits (joint training, concat
head); what changes is the gradient each modality's encoder receives, every
step, inside the pure train step:

1. Uni-modal confidences (their code): the contribution of modality m to the
   concat head plus its share of the bias, `o^(m) = s^(m) + b / M`, and
   `score^(m) = sum_i softmax(o^(m)_i)[y_i]` over the batch.
2. Discrepancy ratio `rho^(m) = score^(m) / mean_{j != m} score^(j)` (for the
   paper's M = 2 this is `score_v / score_a` and its inverse).
3. Modulation coefficient (mmsafe's continuous form):
   `k^(m) = 1 - tanh(alpha * (rho^(m) - 1))` if `rho^(m) > 1`, else 1, so only
   a dominant modality is slowed down. NOTE: the CVPR paper's eq. 10 and the
   reference code use `1 - tanh(alpha * rho)`, which jumps from 1 to
   `1 - tanh(alpha)` at `rho = 1`; mmsafe uses the continuous form.
4. Gradient modulation: every encoder-m parameter gradient `g` becomes
   `k^(m) * g`; with GE (`ogm_ge=True`, OGM-GE) Gaussian noise with the
   gradient's own standard deviation is added, `k^(m) g + N(0, std(g)^2)`,
   per parameter tensor, with `std(g)` of the unmodulated gradient (unbiased,
   as torch's `Tensor.std`), to the encoders of *all* modalities (the
   reference code adds it whether or not a modality is dominant). The fusion
   head's gradients are never touched.
5. Modulation (and GE) is active for epochs `ogm_start_epoch ..
   ogm_end_epoch` (inclusive, as in the reference code; `ogm_end_epoch=None`:
   to the end); outside the window the step is plain joint training.

Equations, in the paper's terms: steps 1-2 are its uni-modal scores `s^u`
and discrepancy ratio `rho^u` (Sec. 3.2, as above), step 3 its modulation
coefficient `k^u` (eq. 10, in the continuous form noted), step 4 the
modulated SGD update `theta^u <- theta^u - eta k^u g(theta^u)` and, for GE,
the same update with the Gaussian term `h ~ N(0, Sigma)` added to the
gradient (Sec. 3.3; `Sigma` estimated per tensor from the gradient as the
reference code does).

How the surgery stays pure: the objective computes the gradient of the CE
itself (`jax.vjp` at `stop_gradient(params)`), modulates it, and returns the
surrogate `stop_gradient(loss) + sum <stop_gradient(g'), params - stop_gradient(params)>`,
whose value is the CE and whose gradient is exactly `g'`. `make_train_step`'s
`value_and_grad` therefore applies the modulated gradient, and the whole step
stays one jitted function. (Scaling the feature cotangent with a custom VJP
would be equivalent for `k^(m)`, but not for GE, whose noise is isotropic per
parameter tensor.)

Choices the paper left open / differences to the reference code:
* The reference code modulates only 4-D (convolution kernel) gradients of
  the ResNet encoders; mmsafe modulates every parameter of the encoder
  (biases, batch-norm scales, dense kernels), so the method also acts on MLP
  encoders, which have no 4-D kernels. Encoder m's parameters are the
  subtree `params["encoders_<m>"]` of `mmsafe.models.MultiModalModel`.
* M > 2 modalities: ratio against the mean of the other modalities' scores,
  and every modality with `rho > 1` is modulated with its own coefficient
  (for M = 2 exactly the paper's rule).
* The epoch is `step // steps_per_epoch` from the method's own step counter
  (`state["ogm"]["step"]`); `steps_per_epoch` (set by the training loop) is
  required only when the window is not "every epoch" (`ogm_start_epoch=0`,
  end None).
* The reference adds `1e-8` to the noise std; omitted (only matters for
  all-zero gradients).

Hyper-parameters: `OGMSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses

import jax
import jax.numpy as jnp

from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import register
from mmsafe.methods.settings import Settings, setting
from mmsafe.models.outputs import ModelOutput

Array = jax.Array

STATE_KEY = "ogm"


@dataclasses.dataclass(frozen=True)
class OGMSettings(Settings):
  """OGM-GE (Peng et al., CVPR 2022, Sec. 3.2-3.3).

  Attributes:
    ogm_alpha: `alpha` of the coefficient `1 - tanh(alpha (rho - 1))` (eq. 10),
      >= 0; 0.1, the reference README's default (0.8 recommended for CREMA-D).
    ogm_ge: whether Generalisation Enhancement adds Gaussian noise (OGM-GE).
    ogm_start_epoch, ogm_end_epoch: the epochs modulated, inclusive, >= 0; end
      None: every epoch from the start (the reference modulates 0..50 of 100).
    steps_per_epoch: optimizer steps per epoch, >= 1, set by the training
      loop; needed only when the window is not every epoch.
  """

  ogm_alpha: float = setting(0.1, minimum=0.0)
  ogm_ge: bool = setting(True)
  ogm_start_epoch: int = setting(0, minimum=0)
  ogm_end_epoch: int | None = setting(None, minimum=0)
  steps_per_epoch: int | None = setting(None, minimum=1)


def encoder_key(params: Mapping, modality: str) -> str:
  """The key of modality `modality`'s encoder parameters in `params`."""
  key = f"encoders_{modality}"
  if key not in params:
    raise ValueError(f"params: expected an entry {key!r} holding the {modality!r} encoder's "
                     f"parameters (mmsafe.models.MultiModalModel); got {sorted(params)}")
  return key


def uni_modal_logits(output: ModelOutput) -> dict[str, Array]:
  """Concat head: `s^(m) + b / M`, each modality's share of the fused logits
  (the reference code's `out_a`, `out_v`), so that `sum_m o^(m) = logits`."""
  if output.head.kind != "concat":
    raise ValueError(f"uni-modal logits: expected a concat head, got {output.head.kind!r}")
  share = output.head.bias / len(output.scores)
  return {m: s.astype(jnp.float32) + share for m, s in output.scores.items()}


def confidence_scores(logits: Mapping[str, Array], labels: Array) -> dict[str, Array]:
  """`sum_i softmax(logits[m]_i)[y_i]` per modality (a scalar each)."""
  return {m: jnp.sum(jnp.take_along_axis(jax.nn.softmax(z.astype(jnp.float32), axis=-1),
                                         labels[:, None], axis=1))
          for m, z in logits.items()}


def discrepancy_ratios(scores: Mapping[str, Array]) -> dict[str, Array]:
  """`rho^(m) = score^(m) / mean_{j != m} score^(j)` (needs M >= 2)."""
  names = sorted(scores)
  if len(names) < 2:
    raise ValueError(f"discrepancy ratios need >= 2 modalities, got {names}")
  return {m: scores[m] / (sum(scores[j] for j in names if j != m) / (len(names) - 1))
          for m in names}


def modulation_coefficients(ratios: Mapping[str, Array], alpha: float) -> dict[str, Array]:
  """`1 - tanh(alpha (rho - 1))` where `rho > 1`, else 1 (continuous at `rho = 1`)."""
  return {m: jnp.where(r > 1.0, 1.0 - jnp.tanh(alpha * (r - 1.0)), 1.0)
          for m, r in ratios.items()}


def window_active(step: Array, start: int, end: int | None, steps_per_epoch: int | None,
                  method: str) -> Array | bool:
  """Whether epoch `step // steps_per_epoch` lies in `[start, end]` (inclusive;
  end None: no end). Python `True` when the window is every epoch, so
  `steps_per_epoch` is not needed then."""
  if start <= 0 and end is None:
    return True
  if steps_per_epoch is None:
    raise ValueError(f"method_kwargs.steps_per_epoch: method {method!r} needs it for an epoch "
                     f"window other than every epoch ({start}..{end}); got None")
  epoch = step // steps_per_epoch
  active = epoch >= start
  if end is not None:
    active = active & (epoch <= int(end))
  return active


def _std(g: Array) -> Array:
  """Unbiased standard deviation of all entries (torch's `Tensor.std`); 0 for one entry."""
  return jnp.std(g, ddof=1) if g.size > 1 else jnp.zeros((), g.dtype)


def modulate_gradients(grads: Mapping, coefficients: Mapping[str, Array], key: Array, *,
                       enhance: Array | bool) -> dict:
  """Encoder-m gradients `g -> k^(m) g (+ N(0, std(g)^2) where enhance)`; the
  other entries of `grads` (the head) are returned unchanged."""
  out = dict(grads)
  for index, m in enumerate(sorted(coefficients)):
    name = encoder_key(grads, m)
    leaves, treedef = jax.tree_util.tree_flatten(grads[name])
    keys = jax.random.split(jax.random.fold_in(key, index), max(len(leaves), 1))
    new = []
    for g, k in zip(leaves, keys):
      noise = _std(g) * jax.random.normal(k, g.shape, g.dtype)
      new.append(coefficients[m].astype(g.dtype) * g + jnp.where(enhance, noise, 0.0))
    out[name] = jax.tree_util.tree_unflatten(treedef, new)
  return out


def gradient_surrogate(loss: Array, params, grads) -> Array:
  """`stop_gradient(loss) + sum <stop_gradient(grads), params - stop_gradient(params)>`:
  equal to `loss`, with gradient `grads` with respect to `params`."""
  sg = jax.lax.stop_gradient
  terms = jax.tree_util.tree_map(lambda p, g: jnp.vdot(sg(g), p - sg(p)), params, grads)
  return sg(loss) + sum(jax.tree_util.tree_leaves(terms))


def init_state(model, variables, settings: Settings | None = None) -> dict:
  """The step counter of the modulation schedule."""
  del model, variables, settings
  return {STATE_KEY: {"step": jnp.zeros((), jnp.int32)}}


@register("ogm", head="concat", settings=OGMSettings, init_state=init_state,
          description="OGM-GE: modulate the dominant modality's encoder gradients (+ GE noise)")
def make_objective(model, settings: OGMSettings):
  alpha, enhance = settings.ogm_alpha, settings.ogm_ge
  window = (settings.ogm_start_epoch, settings.ogm_end_epoch, settings.steps_per_epoch, "ogm")
  window_active(jnp.zeros((), jnp.int32), *window)  # checks the settings now

  def forward(params, state, batch):
    out, new_state = apply_model(model, params, state, batch["inputs"], train=True)
    return cross_entropy(out.logits, batch["label"]), (out, new_state)

  def loss_fn(params, state, batch, rng):
    labels = batch["label"]
    step = state[STATE_KEY]["step"]
    loss, pullback, (out, new_state) = jax.vjp(
        lambda p: forward(p, state, batch), jax.lax.stop_gradient(params), has_aux=True)
    (grads,) = pullback(jnp.ones_like(loss))
    ratios = discrepancy_ratios(confidence_scores(uni_modal_logits(out), labels))
    active = window_active(step, *window)
    coefficients = {m: jnp.where(active, k, 1.0)
                    for m, k in modulation_coefficients(ratios, alpha).items()}
    grads = modulate_gradients(grads, coefficients, rng, enhance=jnp.logical_and(active, enhance))
    new_state = {**new_state, STATE_KEY: {"step": step + 1}}
    metrics = {"ce": loss, "accuracy": accuracy(out.logits, labels),
               **{f"ratio_{m}": r for m, r in ratios.items()},
               **{f"coefficient_{m}": k for m, k in coefficients.items()}}
    return gradient_surrogate(loss, params, grads), (new_state, metrics)

  return loss_fn
