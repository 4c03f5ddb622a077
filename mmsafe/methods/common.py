"""Pieces shared by the objectives: running the model in training mode, losses."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from mmsafe.attacks import pgd
from mmsafe.models.outputs import ModelOutput

Array = jax.Array


def apply_model(model, params, state: Mapping, inputs: Mapping[str, Array], *,
                train: bool) -> tuple[ModelOutput, dict]:
  """Runs `model` on `inputs`; returns the output and the updated `state`.

  In training mode the model's mutable collections (batch-norm statistics,
  `state["model"]`) are updated; in evaluation mode they are read only.
  """
  collections = dict(state.get("model", {}))
  variables = {"params": params, **collections}
  if train and collections:
    out, updated = model.apply(variables, inputs, train=True, mutable=list(collections))
    return out, {**state, "model": dict(updated)}
  return model.apply(variables, inputs, train=train), dict(state)


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean softmax cross-entropy in float32: the CE term of CRMT step 1 (Sec. 3.4).

  Args:
    logits: [B, K] fused logits `h(x)`.
    labels: int [B] true labels.

  Returns:
    Scalar `mean_i CE(h(x_i), y_i)`. Pure and jit-able.
  """
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels).mean()


def accuracy(logits: Array, labels: Array) -> Array:
  """Fraction of `argmax(logits [B, K]) == labels [B]`, a float scalar. Pure and jit-able."""
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def adversarial_inputs(model, params, state: Mapping, batch: Mapping, rng: Array, *,
                       eps: float, steps: int, step_size: float, random_start: bool
                       ) -> dict[str, Array]:
  """l2-PGD inputs for adversarial training: a joint l2 ball of radius `eps`
  over all modalities, attacking the current model in inference mode
  (batch-norm statistics read, not updated). No gradient flows back through
  the attack into the parameters (Madry et al. 2018)."""
  variables = jax.lax.stop_gradient({"params": params, **state.get("model", {})})
  logits_fn = lambda x: model.apply(variables, x, train=False).logits
  adversarial = pgd(logits_fn, batch["inputs"], batch["label"], rng, eps=eps, steps=steps,
                    step_size=step_size, random_start=random_start)
  return jax.lax.stop_gradient(adversarial)


def mix_inputs(inputs: Mapping[str, Array], lam: Array, permutation: Array) -> dict[str, Array]:
  """Multi-modal mixup: `lam * x + (1 - lam) * x[perm]` for every modality, with
  one `lam` and one permutation shared by all modalities (Zhang et al. 2018)."""
  return {m: lam * x + (1.0 - lam) * x[permutation] for m, x in inputs.items()}


def sample_mixup(rng: Array, batch_size: int, alpha: float) -> tuple[Array, Array]:
  """`(lam ~ Beta(alpha, alpha), a random permutation of the batch)`."""
  lam_key, perm_key = jax.random.split(rng)
  return (jax.random.beta(lam_key, alpha, alpha),
          jax.random.permutation(perm_key, batch_size))
