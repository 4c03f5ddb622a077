"""MMAT: multi-modal adversarial training (Madry et al. 2018 applied to the
joint input of all modalities; the CRMT paper's "MMAT" baseline, Yang et al.
ICLR 2024, Table 1, citing Li et al. 2022b).

Each step replaces the clean batch by l2-PGD adversarial inputs inside one
*joint* l2 ball over all modalities, `sqrt(sum_m ||delta^(m)||^2) <= eps`
(`mmsafe.methods.common.adversarial_inputs`: the attack runs on the current
model in inference mode, no gradient flows back through it), and minimises the
cross-entropy of the fused logits on them:

    min_theta  E [ CE(h(x + delta*), y) ],  delta* = PGD_eps(x, y; theta).

Choices: only adversarial examples are trained on (Madry et al.; no clean
term); the batch-norm statistics are updated on the adversarial batch; the
attack's hyper-parameters are those of CRMT-AT (`config.method_kwargs`:
`attack_eps`, `attack_steps`, `attack_step_size`, `attack_random_start`; the
CRMT reference: eps 0.1, 5 steps of eps/5, no random start).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mmsafe.methods.common import (accuracy, adversarial_inputs, apply_model, cross_entropy,
                                   required)
from mmsafe.methods.registry import register

Array = jax.Array

ATTACK_KEYS = ("eps", "steps", "step_size", "random_start")


def attack_config(config, method: str = "mmat") -> dict:
  """`{eps, steps, step_size, random_start}` from `attack_*` method kwargs."""
  return {key: required(config, f"attack_{key}", method) for key in ATTACK_KEYS}


def joint_norms(perturbed, clean) -> Array:
  """Per-example joint l2 norm over all modalities of `perturbed - clean`, [B]."""
  squares = [jnp.sum(jnp.square((perturbed[m] - clean[m]).astype(jnp.float32)).reshape(
      clean[m].shape[0], -1), axis=1) for m in sorted(clean)]
  return jnp.sqrt(sum(squares))


@register("mmat", head="concat",
          description="multi-modal adversarial training: CE on joint-l2 PGD inputs")
def make_objective(model, config):
  attack = attack_config(config)

  def loss_fn(params, state, batch, rng):
    adversarial = adversarial_inputs(model, params, state, batch, rng, **attack)
    out, new_state = apply_model(model, params, state, adversarial, train=True)
    loss = cross_entropy(out.logits, batch["label"])
    norms = joint_norms(adversarial, batch["inputs"])
    return loss, (new_state, {"ce": loss, "accuracy": accuracy(out.logits, batch["label"]),
                              "perturbation_norm": jnp.mean(norms),
                              "max_perturbation_norm": jnp.max(norms)})

  return loss_fn
