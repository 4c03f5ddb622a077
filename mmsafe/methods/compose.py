"""Methods as compositions: an input transform x a loss x a head (+ CRMT's step 2).

Input transforms (what the model is trained on):

* `clean`: the batch as it is.
* `pgd`: l2-PGD adversarial inputs in one *joint* l2 ball over all
  modalities, `sqrt(sum_m ||delta^(m)||^2) <= eps`, attacking the current
  model in inference mode with no gradient through the attack (Madry et al.
  2018; the CRMT paper's MMAT baseline and CRMT-AT, Yang et al. ICLR 2024,
  Table 1). Only adversarial examples are trained on; batch-norm statistics
  update on them. Settings: `AttackSettings`.
* `decoupling`: inputs of the decoupling attack (`mmsafe.attacks.decoupling`,
  the l0 threat of MUROAN, Vishwamitra et al. 2021) against the current model
  in inference mode, no gradient through the attack: at most
  `floor(decoupling_fraction * n)` of the `n` entries of an example (all
  modalities jointly, any split) change, each by at most
  `decoupling_max_change` normalised units; `decoupling_rounds` x
  `decoupling_steps` signed-gradient steps, margin loss. Adversarial training
  against the attack itself, one of the defences MUROAN measured. Settings:
  `DecouplingSettings`.
* `mixup`: multi-modal mixup (Zhang et al., ICLR 2018): one
  `lam ~ Beta(alpha, alpha)` per batch and one permutation `perm`, shared by
  all modalities, mix the inputs `lam x + (1 - lam) x[perm]`; the loss (and
  its metrics) is mixed the same way, `lam L(y) + (1 - lam) L(y[perm])`
  (identical to soft targets for CE). Settings: `MixupSettings`.

Losses (on the fused logits and, for CRMT, the uni-modal scores):

* `ce`: cross-entropy (CRMT eq. 3 with the concat head; eq. 8's head for OJT).
* `ce_l1`: CRMT step 1, `CE + rho * L1` (eq. 12; `mmsafe.methods.crmt`).
  Settings: `crmt.L1Settings`.

`COMPOSITIONS` declares every composed method with its settings class (the
transform's and the loss's settings, and `crmt.Step2Settings` for the
two-step ones, which add CRMT's step 2: `crmt.STEP2`, with its callback
`crmt.PrepareStep2`).
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mmsafe.attacks.common import joint_norm
from mmsafe.attacks.decoupling import decoupling
from mmsafe.methods import crmt
from mmsafe.methods.common import (accuracy, adversarial_inputs, apply_model, cross_entropy,
                                   mix_inputs, sample_mixup)
from mmsafe.methods.registry import Objective, Stage, add_method
from mmsafe.methods.settings import Settings, setting

Array = jax.Array
# (model, params, state, batch, rng) -> (inputs, (lam, permutation) or None, metrics)
InputTransform = Callable[..., tuple[dict[str, Array], tuple[Array, Array] | None, dict]]
# (output, labels) -> (loss, metrics)
Loss = Callable[[Any, Array], tuple[Array, dict]]


@dataclasses.dataclass(frozen=True)
class AttackSettings(Settings):
  """Adversarial training on l2-PGD inputs in one joint ball (Madry et al. 2018;
  the CRMT paper's MMAT and CRMT-AT, Yang et al. ICLR 2024, Table 1). The
  defaults are the CRMT reference code's: eps 0.1, 5 steps of eps/5, no
  random start.

  Attributes:
    attack_eps: the joint l2 radius, >= 0.
    attack_steps: PGD steps, >= 1.
    attack_step_size: the l2 length of each step, >= 0.
    attack_random_start: whether PGD starts at a random point of the ball.
  """

  attack_eps: float = setting(0.1, minimum=0.0)
  attack_steps: int = setting(5, minimum=1)
  attack_step_size: float = setting(0.02, minimum=0.0)
  attack_random_start: bool = setting(False)


@dataclasses.dataclass(frozen=True)
class DecouplingSettings(Settings):
  """Adversarial training against the decoupling attack (MUROAN, Vishwamitra et
  al. 2021) at the budget it is evaluated at; rounds and steps are mmsafe's
  choice for the cost (the evaluation attacks with 8 x 10).

  Attributes:
    decoupling_fraction: the fraction of an example's entries that may change,
      in [0, 1]; 0.01.
    decoupling_max_change: how far each changed entry may move (normalised
      units), > 0; 2.
    decoupling_rounds, decoupling_steps: rounds x signed-gradient steps, >= 1;
      2 x 3.
  """

  decoupling_fraction: float = setting(0.01, minimum=0.0, maximum=1.0)
  decoupling_max_change: float = setting(2.0, minimum=0.0, exclusive_minimum=True)
  decoupling_rounds: int = setting(2, minimum=1)
  decoupling_steps: int = setting(3, minimum=1)


@dataclasses.dataclass(frozen=True)
class MixupSettings(Settings):
  """Multi-modal mixup (Zhang et al., ICLR 2018; CRMT-Mix).

  Attributes:
    mixup_alpha: `lam ~ Beta(alpha, alpha)`, > 0; 1 (uniform lam).
  """

  mixup_alpha: float = setting(1.0, minimum=0.0, exclusive_minimum=True)


@dataclasses.dataclass(frozen=True)
class CRMTATSettings(crmt.CRMTSettings, AttackSettings):
  """CRMT-AT: CRMT (`crmt.CRMTSettings`) with step 1 on PGD inputs (`AttackSettings`)."""


@dataclasses.dataclass(frozen=True)
class CRMTMixSettings(crmt.CRMTSettings, MixupSettings):
  """CRMT-Mix: CRMT (`crmt.CRMTSettings`) with step 1 on mixed inputs (`MixupSettings`)."""


def clean_inputs(settings: Settings) -> InputTransform:
  """The batch's inputs as they are."""
  del settings
  return lambda model, params, state, batch, rng: (batch["inputs"], None, {})


def pgd_inputs(settings: AttackSettings) -> InputTransform:
  """Joint-l2 PGD inputs against the current model, with their perturbation norms."""
  attack = {"eps": settings.attack_eps, "steps": settings.attack_steps,
            "step_size": settings.attack_step_size,
            "random_start": settings.attack_random_start}

  def transform(model, params, state, batch, rng):
    adversarial = adversarial_inputs(model, params, state, batch, rng, **attack)
    norms = joint_norm({m: adversarial[m] - x for m, x in batch["inputs"].items()})
    return adversarial, None, {"perturbation_norm": jnp.mean(norms),
                               "max_perturbation_norm": jnp.max(norms)}

  return transform


def decoupling_inputs(settings: DecouplingSettings) -> InputTransform:
  """Decoupling-attack inputs against the current model, with the entries changed."""
  fraction, rounds = settings.decoupling_fraction, settings.decoupling_rounds
  steps, max_change = settings.decoupling_steps, settings.decoupling_max_change

  def transform(model, params, state, batch, rng):
    variables = jax.lax.stop_gradient({"params": params, **state.get("model", {})})
    logits_fn = jax.tree_util.Partial(
        lambda v, x: model.apply(v, x, train=False).logits, variables)
    adversarial, info = decoupling(logits_fn, batch["inputs"], batch["label"], rng,
                                   fraction=fraction, rounds=rounds, steps_per_round=steps,
                                   max_change=max_change, return_info=True)
    return (jax.lax.stop_gradient(adversarial), None,
            {"changed_entries": jnp.mean(info["changed"].astype(jnp.float32))})

  return transform


def mixup_inputs(settings: MixupSettings) -> InputTransform:
  """Mixed inputs with one `lam ~ Beta(alpha, alpha)` and one permutation."""
  alpha = settings.mixup_alpha

  def transform(model, params, state, batch, rng):
    del model, params, state
    lam, permutation = sample_mixup(rng, batch["label"].shape[0], alpha)
    return mix_inputs(batch["inputs"], lam, permutation), (lam, permutation), {"lambda": lam}

  return transform


def ce_loss(settings: Settings) -> Loss:
  """Cross-entropy of the fused logits, with the batch accuracy."""
  del settings

  def loss(output, labels):
    ce = cross_entropy(output.logits, labels)
    return ce, {"ce": ce, "accuracy": accuracy(output.logits, labels)}

  return loss


def ce_l1_loss(settings: crmt.L1Settings) -> Loss:
  """CRMT step 1, `CE + rho * L1` (eq. 12)."""
  rho, floor = settings.rho, settings.l1_floor
  return lambda output, labels: crmt.step1_loss(output, labels, rho, floor)


def mixed_loss(loss: Loss, output, labels: Array, lam: Array, permutation: Array
               ) -> tuple[Array, dict]:
  """`lam L(y) + (1 - lam) L(y[perm])`, its metrics mixed alike."""
  loss_a, metrics_a = loss(output, labels)
  loss_b, metrics_b = loss(output, labels[permutation])
  metrics = jax.tree_util.tree_map(lambda a, b: lam * a + (1.0 - lam) * b, metrics_a, metrics_b)
  return lam * loss_a + (1.0 - lam) * loss_b, metrics


INPUT_TRANSFORMS = {"clean": clean_inputs, "pgd": pgd_inputs, "decoupling": decoupling_inputs,
                    "mixup": mixup_inputs}
LOSSES = {"ce": ce_loss, "ce_l1": ce_l1_loss}


def composed_objective(inputs: str, loss: str) -> Callable[[Any, Settings], Objective]:
  """`make_objective(model, settings)` of `loss` on the `inputs` transform."""

  def make_objective(model, settings):
    transform = INPUT_TRANSFORMS[inputs](settings)
    loss_fn_of = LOSSES[loss](settings)

    def loss_fn(params, state, batch, rng):
      x, mix, input_metrics = transform(model, params, state, batch, rng)
      out, new_state = apply_model(model, params, state, x, train=True)
      if mix is None:
        value, metrics = loss_fn_of(out, batch["label"])
      else:
        value, metrics = mixed_loss(loss_fn_of, out, batch["label"], *mix)
      return value, (new_state, {**metrics, **input_metrics})

    return loss_fn

  return make_objective


# name: (head, inputs, loss, CRMT step 2 after it, settings, description)
COMPOSITIONS = {
    "jt": ("concat", "clean", "ce", False, Settings, "joint training, concat head, CE"),
    "ojt": ("orthogonal", "clean", "ce", False, Settings, "orthogonal head, CE (ablation OJT)"),
    "mmat": ("concat", "pgd", "ce", False, AttackSettings,
             "multi-modal adversarial training: CE on joint-l2 PGD inputs"),
    "decoupling_at": ("concat", "decoupling", "ce", False, DecouplingSettings,
                      "adversarial training against the decoupling attack (l0 budget)"),
    "mixup": ("concat", "mixup", "ce", False, MixupSettings,
              "multi-modal mixup: one Beta(alpha, alpha) lambda shared by all modalities"),
    "crmt": ("orthogonal", "clean", "ce_l1", True, crmt.CRMTSettings,
             "CRMT-JT: CE + rho L1 (step 1), then modality weights (step 2)"),
    "crmt_at": ("orthogonal", "pgd", "ce_l1", True, CRMTATSettings,
                "CRMT-AT: step 1 on l2-PGD inputs, then step 2"),
    "crmt_mix": ("orthogonal", "mixup", "ce_l1", True, CRMTMixSettings,
                 "CRMT-Mix: step 1 with multi-modal mixup, then step 2"),
    "crmt_step1": ("orthogonal", "clean", "ce_l1", False, crmt.L1Settings,
                   "ablation: CRMT step 1 only"),
    "crmt_step2": ("orthogonal", "clean", "ce", True, crmt.Step2Settings,
                   "ablation: CE on the orthogonal head, then step 2"),
}

for _name, (_head, _inputs, _loss, _two_step, _settings, _description) in COMPOSITIONS.items():
  _first = Stage("step1" if _two_step else "train", composed_objective(_inputs, _loss))
  add_method(_name, head=_head, settings=_settings, description=_description,
             stages=(_first, crmt.STEP2) if _two_step else (_first,),
             init_state=crmt.init_state if _two_step else None,
             callbacks=(crmt.PrepareStep2(),) if _two_step else ())
