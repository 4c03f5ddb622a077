"""`make_train_step` / `make_eval_step`: pure, jit-able functions of (state, batch)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mmsafe.methods.registry import Objective
from mmsafe.train.state import TrainState


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One optimizer step on `objective(params, state, batch, rng)`.

  The step's randomness is `fold_in(train_state.rng, train_state.step)`, so a
  run is reproducible step by step. Returns `(new_train_state, metrics)` with
  `metrics["loss"]` the objective value (before the update).
  """

  def train_step(train_state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(train_state.rng, train_state.step)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (new_state, metrics)), grads = grad_fn(
        train_state.params, train_state.state, batch, rng)
    updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
    params = optax.apply_updates(train_state.params, updates)
    new_train_state = train_state.replace(step=train_state.step + 1, params=params,
                                          state=new_state, opt_state=opt_state)
    return new_train_state, {"loss": loss, **metrics}

  return train_step


def make_eval_step(model) -> Callable[[dict, dict], dict]:
  """Sums of correct predictions and cross-entropy over the valid examples of
  a batch (`batch["valid"]`, all valid when absent), in evaluation mode."""

  def eval_step(variables: dict, batch: dict) -> dict:
    out = model.apply(variables, batch["inputs"], train=False)
    labels = batch["label"]
    valid = batch.get("valid", jnp.ones(labels.shape, bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
    correct = jnp.argmax(out.logits, -1) == labels
    return {"correct": jnp.sum(correct * valid), "loss_sum": jnp.sum(ce * valid),
            "count": jnp.sum(valid)}

  return eval_step
