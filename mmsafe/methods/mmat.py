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

import jax.numpy as jnp

from mmsafe.attacks.common import joint_norm
from mmsafe.methods.common import (accuracy, adversarial_inputs, apply_model, attack_kwargs,
                                   cross_entropy)
from mmsafe.methods.registry import register


@register("mmat", head="concat",
          description="multi-modal adversarial training: CE on joint-l2 PGD inputs")
def make_objective(model, config):
  attack = attack_kwargs(config, "mmat")

  def loss_fn(params, state, batch, rng):
    adversarial = adversarial_inputs(model, params, state, batch, rng, **attack)
    out, new_state = apply_model(model, params, state, adversarial, train=True)
    loss = cross_entropy(out.logits, batch["label"])
    norms = joint_norm({m: adversarial[m] - x for m, x in batch["inputs"].items()})
    return loss, (new_state, {"ce": loss, "accuracy": accuracy(out.logits, batch["label"]),
                              "perturbation_norm": jnp.mean(norms),
                              "max_perturbation_norm": jnp.max(norms)})

  return loss_fn
