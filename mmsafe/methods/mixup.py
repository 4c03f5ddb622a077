"""Multi-modal mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization",
ICLR 2018, applied jointly to all modalities; the CRMT paper's "Mixup" baseline,
Yang et al. ICLR 2024, Table 1, citing Li et al. 2022b).

CRMT-Mix without the L1 term: one `lam ~ Beta(alpha, alpha)`
and one permutation `perm` of the batch, shared by all modalities, mix the
inputs `x~^(m) = lam x^(m) + (1 - lam) x^(m)[perm]`, and the loss is the mixed
cross-entropy of the fused logits on the mixed batch,

    L = lam * CE(h(x~), y) + (1 - lam) * CE(h(x~), y[perm]).

Choices: labels are mixed through the loss (as CRMT-Mix), not as soft
targets (identical for CE); one `lam` per batch (Zhang et al.'s reference
code), not per example; the batch-norm statistics are updated on the mixed
batch. Hyper-parameter (`config.method_kwargs`): `mixup_alpha`.
"""

from __future__ import annotations

import jax

from mmsafe.methods.common import (accuracy, apply_model, cross_entropy, mix_inputs, required,
                                   sample_mixup)
from mmsafe.methods.registry import register

Array = jax.Array


def mixed_cross_entropy(logits: Array, labels: Array, permutation: Array, lam: Array) -> Array:
  """`lam * CE(logits, y) + (1 - lam) * CE(logits, y[perm])`."""
  return (lam * cross_entropy(logits, labels)
          + (1.0 - lam) * cross_entropy(logits, labels[permutation]))


def mixup_loss(model, params, state, batch, lam: Array, permutation: Array):
  """The mixup objective for a given `lam` and permutation:
  `(loss, (new_state, metrics))`. With `lam = 1` it is plain CE on the batch."""
  labels = batch["label"]
  mixed = mix_inputs(batch["inputs"], lam, permutation)
  out, new_state = apply_model(model, params, state, mixed, train=True)
  loss = mixed_cross_entropy(out.logits, labels, permutation, lam)
  hit = (lam * accuracy(out.logits, labels)
         + (1.0 - lam) * accuracy(out.logits, labels[permutation]))
  return loss, (new_state, {"ce": loss, "accuracy": hit, "lambda": lam})


@register("mixup", head="concat",
          description="multi-modal mixup: one Beta(alpha, alpha) lambda shared by all modalities")
def make_objective(model, config):
  alpha = float(required(config, "mixup_alpha", "mixup"))

  def loss_fn(params, state, batch, rng):
    lam, permutation = sample_mixup(rng, batch["label"].shape[0], alpha)
    return mixup_loss(model, params, state, batch, lam, permutation)

  return loss_fn
