"""Methods as compositions: an input transform x a loss x a head (+ CRMT's step 2).

Input transforms (what the model is trained on):

* `clean`: the batch as it is.
* `pgd`: l2-PGD adversarial inputs in one *joint* l2 ball over all
  modalities, `sqrt(sum_m ||delta^(m)||^2) <= eps`, attacking the current
  model in inference mode with no gradient through the attack (Madry et al.
  2018; the CRMT paper's MMAT baseline and CRMT-AT, Yang et al. ICLR 2024,
  Table 1). Only adversarial examples are trained on; batch-norm statistics
  update on them. `method_kwargs`: `attack_eps`, `attack_steps`,
  `attack_step_size`, `attack_random_start` (the CRMT reference: eps 0.1,
  5 steps of eps/5, no random start).
* `decoupling`: inputs of the decoupling attack (`mmsafe.attacks.decoupling`,
  the l0 threat of MUROAN, Vishwamitra et al. 2021) against the current model
  in inference mode, no gradient through the attack: at most
  `floor(decoupling_fraction * n)` of the `n` entries of an example (all
  modalities jointly, any split) change, each by at most
  `decoupling_max_change` normalised units; `decoupling_rounds` x
  `decoupling_steps` signed-gradient steps, margin loss. Adversarial training
  against the attack itself, one of the defences MUROAN measured.
* `mixup`: multi-modal mixup (Zhang et al., ICLR 2018): one
  `lam ~ Beta(alpha, alpha)` per batch and one permutation `perm`, shared by
  all modalities, mix the inputs `lam x + (1 - lam) x[perm]`; the loss (and
  its metrics) is mixed the same way, `lam L(y) + (1 - lam) L(y[perm])`
  (identical to soft targets for CE). `method_kwargs`: `mixup_alpha`.

Losses (on the fused logits and, for CRMT, the uni-modal scores):

* `ce`: cross-entropy (CRMT eq. 3 with the concat head; eq. 8's head for OJT).
* `ce_l1`: CRMT step 1, `CE + rho * L1` (eq. 12; `mmsafe.methods.crmt`).
  `method_kwargs`: `rho`, `l1_floor`.

`COMPOSITIONS` declares every composed method; two-step ones add CRMT's step 2
(`crmt.STEP2`, with its callback `crmt.PrepareStep2`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmsafe.attacks.common import joint_norm
from mmsafe.attacks.decoupling import decoupling
from mmsafe.methods import crmt
from mmsafe.methods.common import (accuracy, adversarial_inputs, apply_model, attack_kwargs,
                                   cross_entropy, mix_inputs, required, sample_mixup)
from mmsafe.methods.registry import Objective, Stage, register

Array = jax.Array
# (model, params, state, batch, rng) -> (inputs, (lam, permutation) or None, metrics)
InputTransform = Callable[..., tuple[dict[str, Array], tuple[Array, Array] | None, dict]]
# (output, labels) -> (loss, metrics)
Loss = Callable[[Any, Array], tuple[Array, dict]]


def clean_inputs(config: Mapping, name: str) -> InputTransform:
  """The batch's inputs as they are."""
  del config, name
  return lambda model, params, state, batch, rng: (batch["inputs"], None, {})


def pgd_inputs(config: Mapping, name: str) -> InputTransform:
  """Joint-l2 PGD inputs against the current model, with their perturbation norms."""
  attack = attack_kwargs(config, name)

  def transform(model, params, state, batch, rng):
    adversarial = adversarial_inputs(model, params, state, batch, rng, **attack)
    norms = joint_norm({m: adversarial[m] - x for m, x in batch["inputs"].items()})
    return adversarial, None, {"perturbation_norm": jnp.mean(norms),
                               "max_perturbation_norm": jnp.max(norms)}

  return transform


def decoupling_inputs(config: Mapping, name: str) -> InputTransform:
  """Decoupling-attack inputs against the current model, with the entries changed."""
  fraction = float(required(config, "decoupling_fraction", name))
  rounds = int(required(config, "decoupling_rounds", name))
  steps = int(required(config, "decoupling_steps", name))
  max_change = float(required(config, "decoupling_max_change", name))

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


def mixup_inputs(config: Mapping, name: str) -> InputTransform:
  """Mixed inputs with one `lam ~ Beta(alpha, alpha)` and one permutation."""
  alpha = float(required(config, "mixup_alpha", name))

  def transform(model, params, state, batch, rng):
    del model, params, state
    lam, permutation = sample_mixup(rng, batch["label"].shape[0], alpha)
    return mix_inputs(batch["inputs"], lam, permutation), (lam, permutation), {"lambda": lam}

  return transform


def ce_loss(config: Mapping, name: str) -> Loss:
  """Cross-entropy of the fused logits, with the batch accuracy."""
  del config, name

  def loss(output, labels):
    ce = cross_entropy(output.logits, labels)
    return ce, {"ce": ce, "accuracy": accuracy(output.logits, labels)}

  return loss


def ce_l1_loss(config: Mapping, name: str) -> Loss:
  """CRMT step 1, `CE + rho * L1` (eq. 12)."""
  rho, floor = required(config, "rho", name), required(config, "l1_floor", name)
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


def composed_objective(name: str, inputs: str, loss: str
                       ) -> Callable[[Any, Mapping[str, Any]], Objective]:
  """`make_objective(model, config)` of `loss` on the `inputs` transform."""

  def make_objective(model, config):
    transform = INPUT_TRANSFORMS[inputs](config, name)
    loss_fn_of = LOSSES[loss](config, name)

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


# name: (head, inputs, loss, CRMT step 2 after it, description)
COMPOSITIONS = {
    "jt": ("concat", "clean", "ce", False, "joint training, concat head, CE"),
    "ojt": ("orthogonal", "clean", "ce", False, "orthogonal head, CE (ablation OJT)"),
    "mmat": ("concat", "pgd", "ce", False,
             "multi-modal adversarial training: CE on joint-l2 PGD inputs"),
    "decoupling_at": ("concat", "decoupling", "ce", False,
                      "adversarial training against the decoupling attack (l0 budget)"),
    "mixup": ("concat", "mixup", "ce", False,
              "multi-modal mixup: one Beta(alpha, alpha) lambda shared by all modalities"),
    "crmt": ("orthogonal", "clean", "ce_l1", True,
             "CRMT-JT: CE + rho L1 (step 1), then modality weights (step 2)"),
    "crmt_at": ("orthogonal", "pgd", "ce_l1", True,
                "CRMT-AT: step 1 on l2-PGD inputs, then step 2"),
    "crmt_mix": ("orthogonal", "mixup", "ce_l1", True,
                 "CRMT-Mix: step 1 with multi-modal mixup, then step 2"),
    "crmt_step1": ("orthogonal", "clean", "ce_l1", False, "ablation: CRMT step 1 only"),
    "crmt_step2": ("orthogonal", "clean", "ce", True,
                   "ablation: CE on the orthogonal head, then step 2"),
}

for _name, (_head, _inputs, _loss, _two_step, _description) in COMPOSITIONS.items():
  _first = Stage("step1" if _two_step else "train", composed_objective(_name, _inputs, _loss))
  register(_name, head=_head, description=_description,
           stages=(_first, crmt.STEP2) if _two_step else (_first,),
           init_state=crmt.init_state if _two_step else None,
           callbacks=(crmt.PrepareStep2(),) if _two_step else ())(None)
