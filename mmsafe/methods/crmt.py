"""Certifiable Robust Multi-modal Training (CRMT; Yang et al., ICLR 2024, Sec. 3.4).

Orthogonal head `h~_k = sum_m a^(m)_k u^(m)_k + b~_k` (eq. 8), trained in two steps:

* Step 1: `CE(h~(x), y) + rho * L1` over encoders, `W~` (kept on the Stiefel
  manifold by the optimizer) and `a`, where L1 (eq. 12) is the LogSumExp
  relaxation of the smallest uni-modal score margin (eq. 11):
      L1 = mean_i logsumexp_{m, k != y_i} (u^(m)_k(x_i) - u^(m)_{y_i}(x_i)).
* Step 2: encoders, `W~`, `b~` and batch-norm statistics frozen; only `a` is
  updated, on the Thm 3.5 (eq. 10) radii `r_k(x)`, with `tau~` the Lipschitz
  constants of the uni-modal scores `u` (not of the fused logits, so `a` is
  not counted twice) computed once when step 2 begins:
  `method_kwargs.step2_lipschitz = "empirical"` (the paper's code: the
  largest gradient norm over the training set, an estimate) or "sound" (the
  encoders' stated bounds, with the tight Thm 3.5: step 2 then works on the
  certificate itself). None: "empirical" for the paper's variants here.
  `method_kwargs.step2_objective` chooses what `a` optimises (None: the
  method's default, "mean_radius" for the paper's variants):
  "mean_radius", the paper's `L2 = -mean_i r_j(x_i)` at the closest wrong
  class `j = argmax_{k != y} h~_k(x_i)`, not clipped at 0; or "radius_hinge"
  (mmsafe's), the cross-entropy of the radius logits `t (eps - r_k(x))` on
  every wrong class `k`. The paper's L2 can switch a class off, the hinge
  bounds what the other examples gain from that (see `step2_loss`).

Variants (declared in `mmsafe.methods.compose`): `crmt` (CRMT-JT: step 1
then step 2), `crmt_at` (step 1 on l2-PGD adversarial inputs, then step 2),
`crmt_mix` (step 1 with multi-modal mixup, then step 2), and the ablations of
the paper's Fig. 5: `crmt_step1` (step 1 only), `crmt_step2` (plain CE on the
orthogonal head, then step 2), `ojt` (CE only). This module holds the
pieces: L1, step 1's loss, step 2's objective and stage (`STEP2`), and the
callback that computes step 2's constants when it starts (`PrepareStep2`).

Hyper-parameters: `L1Settings` (step 1's `rho`, `l1_floor`) and
`Step2Settings` (every two-step variant: `step2_lipschitz`, `step2_objective`,
and `cert_eps`, `cert_temperature` for "radius_hinge"), overridden by
`config.method_kwargs`.
`crmt_cert`, CRMT trained on its sound certificate, lives in `crmt_cert.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses

import jax
import jax.numpy as jnp

from mmsafe import certify
from mmsafe.methods.common import accuracy, apply_model, cross_entropy
from mmsafe.methods.registry import Callback, CallbackContext, Stage
from mmsafe.methods.settings import Settings, setting
from mmsafe.models.heads import is_modality_weight
from mmsafe.numerics import label_mask, mask_labels

Array = jax.Array

# The key of the method state that holds step 2's Lipschitz constants.
STATE_KEY = "crmt"
STEP2_LIPSCHITZ = ("empirical", "sound")
STEP2_OBJECTIVES = ("mean_radius", "radius_hinge")


@dataclasses.dataclass(frozen=True)
class L1Settings(Settings):
  """CRMT step 1, `CE + rho * L1` (Yang et al., ICLR 2024, eq. 12).

  Attributes:
    rho: the weight of L1 (eq. 12), >= 0; 2.0 in the paper's reference configs.
    l1_floor: added inside L1's logarithm, >= 0 (`margin_regularizer`); the
      paper's code adds 1e-5.
  """

  rho: float = setting(2.0, minimum=0.0)
  l1_floor: float = setting(1e-5, minimum=0.0)


@dataclasses.dataclass(frozen=True)
class Step2Settings(Settings):
  """CRMT step 2: only the modality weights `a` move, on the Thm 3.5 (eq. 10)
  radii (Sec. 3.4).

  Attributes:
    step2_lipschitz: "empirical" (the paper's code: the largest gradient norm
      over the training set, eq. 9) or "sound" (the encoders' stated bounds);
      None: the method's default (empirical for the paper's variants, sound
      for crmt_cert).
    step2_objective: "mean_radius" (the paper's L2, the mean radius at the
      closest wrong class) or "radius_hinge" (mmsafe's: CE of the radius
      logits `t (eps - r_k)`, `step2_loss`); None: the method's default.
    cert_eps: the hinge's target radius `eps` (> 0); 3 on mfeat, 4 on
      av_digits, by validation certified accuracy (mmsafe's choice).
    cert_temperature: the hinge's temperature `t` (> 0); 4 (mmsafe's choice).
  """

  step2_lipschitz: str | None = setting(None, choices=STEP2_LIPSCHITZ)
  step2_objective: str | None = setting(None, choices=STEP2_OBJECTIVES)
  cert_eps: float = setting(3.0, minimum=0.0, exclusive_minimum=True)
  cert_temperature: float = setting(4.0, minimum=0.0, exclusive_minimum=True)


@dataclasses.dataclass(frozen=True)
class CRMTSettings(L1Settings, Step2Settings):
  """CRMT (CRMT-JT): step 1 (`L1Settings`) then step 2 (`Step2Settings`)."""


def margin_regularizer(scores: Mapping[str, Array], labels: Array, floor: float = 0.0
                       ) -> Array:
  """Per-sample L1 of CRMT eq. 12 in a stable LogSumExp form, [B].

  `log(sum_m sum_{k != y} exp(u^(m)_k - u^(m)_y) + floor)`: a smooth maximum
  over modalities and wrong classes of the negative uni-modal margins (eq. 11).

  Without a floor, L1 is unbounded below: it keeps rewarding larger margins by
  inflating the features, and on encoders without normalisation layers step 1
  diverges. The paper's code adds 1e-5 inside the logarithm, which bounds L1
  below by `log(1e-5)` once every margin is large; `floor` reproduces that,
  computed as `logaddexp(logsumexp(...), log(floor))` so it stays finite for
  any scores.

  Args:
    scores: modality -> [B, K] uni-modal scores `u^(m) = W~^(m) phi^(m)`.
    labels: int [B] true labels `y`.
    floor: added inside the logarithm, >= 0 (a Python float).

  Returns:
    [B] per-sample L1; CRMT's L1 is its mean. Pure; jit-able with `floor`
    static (it selects a branch in Python).
  """
  differences = []
  for m in sorted(scores):
    u = scores[m].astype(jnp.float32)
    u_y = jnp.take_along_axis(u, labels[:, None], axis=1)
    differences.append(mask_labels(u - u_y, labels, -jnp.inf))
  l1 = jax.nn.logsumexp(jnp.concatenate(differences, axis=-1), axis=-1)
  return jnp.logaddexp(l1, jnp.log(floor)) if floor > 0 else l1


def step1_loss(output, labels: Array, rho: float, floor: float) -> tuple[Array, dict]:
  """`CE + rho * L1` (CRMT step 1) and its parts."""
  ce = cross_entropy(output.logits, labels)
  l1 = margin_regularizer(output.scores, labels, floor).mean()
  return ce + rho * l1, {"ce": ce, "l1": l1, "accuracy": accuracy(output.logits, labels)}


def _at_closest_class(per_class: Array, logits: Array, labels: Array) -> Array:
  """[B] entry of `per_class` [B, K] at `j = argmax_{k != y} logits_k`."""
  closest = jnp.argmax(mask_labels(logits, labels, -jnp.inf), axis=-1)
  return jnp.take_along_axis(per_class, closest[:, None], axis=1)[:, 0]


def closest_class_bound(output, labels: Array, tau: Mapping[str, Array],
                        feature_lipschitz: Mapping[str, Array] | None = None) -> Array:
  """`r_j(x)` of Thm 3.5 (eq. 10) at `j = argmax_{k != y} h~_k(x)`, [B] (not clipped at 0).

  The quantity the paper's CRMT step 2 maximises (`L2 = -mean_i r_j(x_i)`, Sec. 3.4).

  Args:
    output: the orthogonal-head model's `ModelOutput` (logits [B, K]).
    labels: int [B] true labels `y`.
    tau: modality -> [B, K] or [1, K] constants `tau~^(m)_k` of the uni-modal
      scores (CRMT eq. 9), as for `mmsafe.certify.certified_radius`.
    feature_lipschitz: optional modality -> `L^(m)` for the tight Thm 3.5
      (see `mmsafe.certify.certified_radius`).

  Returns:
    [B] radii at the closest wrong class. Pure and jit-able (value checks
    run only on concrete inputs).
  """
  per_class = certify.certified_radius(output, labels, tau,
                                       feature_lipschitz=feature_lipschitz).per_class
  return _at_closest_class(per_class, output.logits, labels)


def radius_hinge_logits(per_class: Array, labels: Array, *, eps: float, temperature: float
                        ) -> Array:
  """`t (eps - r_k(x))` for `k != y` and 0 for `y`, [B, K], from the Thm 3.5 radii.

  Their cross-entropy, `log(1 + sum_{k != y} exp(t (eps - r_k)))`, is a soft
  hinge on every pairwise radius (`crmt_cert`'s loss, `crmt_cert.radius_logits`).

  Args:
    per_class: [B, K] radii `r_k(x)` (`Certificate.per_class`: not clipped,
      `+inf` at `k = y`).
    labels: int [B] true labels `y`.
    eps: the target radius (> 0).
    temperature: `t` (> 0).

  Returns:
    [B, K] logits. Pure and jit-able; the `+inf` at `y` gets no gradient.
  """
  is_label = label_mask(labels, per_class.shape[-1])
  return jnp.where(is_label, 0.0, temperature * (eps - per_class))


def step2_loss(output, labels: Array, tau: Mapping[str, Array],
               feature_lipschitz: Mapping[str, Array] | None = None, *,
               objective: str = "mean_radius", eps: float | None = None,
               temperature: float | None = None) -> tuple[Array, dict]:
  """CRMT step 2's loss of `a` on a batch, and its metrics.

  * "mean_radius" (the paper's L2, Sec. 3.4): `-mean_i r_j(x_i)`, the Thm 3.5
    radius at the closest wrong class, not clipped at 0. It can switch a
    class off: with `a^(m)_c = 0` for every `m`, class `c`'s logit is the
    constant `b~_c`, so in every other example's pair `(y, c)` the margin
    `h~_y - b~_c` no longer carries `c`'s score and `|a_c| tau~_c` leaves the
    denominator: their radii grow, while class `c`'s own examples become
    misclassified with negative radii. The mean of unclipped radii has
    unbounded gain on the others, so whenever that gain exceeds what class
    `c`'s radii lose, L2 keeps rising while `c` is lost
    (av_digits seed 0, CRMT-Mix: class 9's weights went to ~0 and clean
    accuracy fell 0.983 -> 0.903; tests/test_crmt_step2.py builds a case).
  * "radius_hinge" (mmsafe's): the cross-entropy of `radius_hinge_logits`
    with `eps` and `t` (`temperature`), on every wrong class. The loss is
    >= 0, so an example can gain at most its current loss, which vanishes
    once all its radii exceed `eps`; a misclassified example (`r_k < 0` for
    the class `k` that beats `y`) costs more than `t (eps - r_k) > t eps`,
    growing linearly with `-r_k`. Switching off a class with `n_c` examples
    therefore pays only while the loss summed over all examples exceeds
    `n_c t eps`: the others, once certified at `eps`, have little left to
    pay with.

  Args:
    output: the orthogonal-head model's `ModelOutput`.
    labels: int [B] true labels `y`.
    tau: modality -> [B, K] or [1, K] `tau~^(m)_k` (see `closest_class_bound`).
    feature_lipschitz: optional modality -> `L^(m)` for the tight Thm 3.5.
    objective: one of `STEP2_OBJECTIVES`.
    eps: the hinge's target radius (> 0; "radius_hinge" only).
    temperature: the hinge's `t` (> 0; "radius_hinge" only).

  Returns:
    `(loss, metrics)`: "bound" (the mean radius at the closest wrong class),
    "accuracy", and for "radius_hinge" "radius_ce" (the loss). Pure and jit-able.
  """
  if objective not in STEP2_OBJECTIVES:
    raise ValueError(f"objective: expected one of {list(STEP2_OBJECTIVES)}, got {objective!r}")
  per_class = certify.certified_radius(output, labels, tau,
                                       feature_lipschitz=feature_lipschitz).per_class
  bound = jnp.mean(_at_closest_class(per_class, output.logits, labels))
  metrics = {"bound": bound, "accuracy": accuracy(output.logits, labels)}
  if objective == "mean_radius":
    return -bound, metrics
  hinge = cross_entropy(radius_hinge_logits(per_class, labels, eps=eps, temperature=temperature),
                        labels)
  return hinge, {**metrics, "radius_ce": hinge}


def step2_lipschitz(settings: Step2Settings, default: str = "empirical") -> str:
  """The Lipschitz kind step 2 optimises (`step2_lipschitz`; None: `default`)."""
  return settings.step2_lipschitz or default


def step2_objective_name(settings: Step2Settings, default: str = "mean_radius") -> str:
  """The loss step 2 minimises (`step2_objective`; None: `default`; see `step2_loss`)."""
  return settings.step2_objective or default


def step2_objective(model, settings: Step2Settings = Step2Settings(), *,
                    default_lipschitz: str = "empirical", default_objective: str = "mean_radius"):
  """CRMT step 2: `step2_loss` of `a` (`method_kwargs.step2_objective`; None:
  `default_objective`, "mean_radius" being the paper's L2).

  The model runs in inference mode (batch-norm statistics frozen) and every
  parameter but `a` is behind `stop_gradient`; the step-2 optimizer
  (`mmsafe.train.optimizer.make_step2_optimizer`) updates only `a`. `tau~`
  (and, for `step2_lipschitz = "sound"`, the encoders' bounds `L^(m)` of the
  tight Thm 3.5) are read from `state["crmt"]` (see `prepare_step2`).
  "radius_hinge" reads `eps` and `t` from `cert_eps` and `cert_temperature`.
  """
  sound = step2_lipschitz(settings, default_lipschitz) == "sound"
  objective = step2_objective_name(settings, default_objective)
  eps = temperature = None
  if objective == "radius_hinge":
    eps, temperature = settings.cert_eps, settings.cert_temperature

  def loss_fn(params, state, batch, rng):
    del rng
    frozen = jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf if is_modality_weight(path, leaf) else jax.lax.stop_gradient(leaf),
        params)
    out, _ = apply_model(model, frozen, state, batch["inputs"], train=False)
    constants = state[STATE_KEY]
    loss, metrics = step2_loss(out, batch["label"], constants["tau"],
                               constants["feature_lipschitz"] if sound else None,
                               objective=objective, eps=eps, temperature=temperature)
    return loss, (dict(state), metrics)

  return loss_fn


def init_state(model, variables, settings: Settings | None = None) -> dict:
  """Method state: step 2's `tau~` and `L^(m)` (zeros until `prepare_step2`)."""
  del model, settings
  weights = variables["params"]["head"]["a"]
  return {STATE_KEY: {
      "tau": {m: jnp.zeros((1, a.shape[-1]), jnp.float32) for m, a in weights.items()},
      "feature_lipschitz": {m: jnp.zeros((), jnp.float32) for m in weights}}}


def prepare_step2(model, variables, settings: Step2Settings = Step2Settings(), *,
                  reduce_over_split: Callable | None = None,
                  default_lipschitz: str = "empirical") -> dict:
  """The method state for step 2, modality -> constants of the uni-modal scores:
  "empirical" (`step2_lipschitz`): `tau~` = the maximum per-sample gradient
  norm over the training split, as in the paper's code (eq. 9; each process
  reads its rows and the maxima are reduced over processes, through
  `reduce_over_split` of `CallbackContext`); "sound": the encoders' stated
  bounds (`mmsafe.certify.sound_constants`; no data is read), with `L^(m)`
  for the tight Thm 3.5."""
  if step2_lipschitz(settings, default_lipschitz) == "sound":
    constants = certify.sound_constants(model, variables)  # One compiled program.
    features, values = constants.encoder, constants.values
  else:
    if reduce_over_split is None:
      raise ValueError("reduce_over_split: empirical step-2 constants read the training "
                       "split; expected a callable, got None")
    values = reduce_over_split(
        "train", lambda batches: dict(
            certify.empirical_constants(model, variables, batches).values), "max")
    features = {m: 0.0 for m in values}
  return {STATE_KEY: {
      "tau": {m: jnp.asarray(v, jnp.float32) for m, v in values.items()},
      "feature_lipschitz": {m: jnp.asarray(v, jnp.float32) for m, v in features.items()}}}


class PrepareStep2(Callback):
  """Computes step 2's constants (`prepare_step2`) when a step-2 stage starts:
  "step2", or "step2_<suffix>" (a further iteration of the two steps listed in
  `config.stages`, whose encoders moved since the last one)."""

  def __init__(self, default_lipschitz: str = "empirical"):
    self.default_lipschitz = default_lipschitz

  def on_stage_start(self, stage: str, context: CallbackContext) -> dict:
    if stage != STEP2.name and not stage.startswith(f"{STEP2.name}_"):
      return {}
    return prepare_step2(context.model, context.variables, context.config,
                         reduce_over_split=context.reduce_over_split,
                         default_lipschitz=self.default_lipschitz)


# CRMT step 2 as a training stage: only `a` moves, with the optimizer of the
# config section "step2", and model selection restarts so the reported model
# went through it.
STEP2 = Stage("step2", step2_objective, optimizer="step2", trainable="modality_weights",
              restart_selection=True)
