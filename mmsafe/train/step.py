"""`make_train_step` / `make_eval_step`: pure, jit-able functions of (state, batch).

The same step runs on one device under `jax.jit`, data-parallel under `jax.jit`
with a sharded batch (XLA inserts the cross-device reductions), or under
`jax.pmap` with `axis_name` set: gradients, the loss and metrics are then
averaged over the named axis and evaluation sums are summed over it
(`mmsafe.train.parallel` builds the compiled forms).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mmsafe.methods.registry import Objective
from mmsafe.train.state import TrainState


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def pmean_floats(tree, axis_name: str):
  """`lax.pmean` over `axis_name` of the floating leaves of `tree` (others untouched)."""
  return jax.tree_util.tree_map(
      lambda x: jax.lax.pmean(x, axis_name) if _is_float(x) else x, tree)


def sync_replicas(tree, axis_name: str):
  """Makes the floating leaves of `tree` equal on every device of `axis_name`:
  the mean over devices, computed as `x_0 + pmean(x - x_0)` with `x_0` the value on
  device 0, so leaves that already agree (batch-norm statistics computed with
  `axis_name`, method state computed from replicated values) come out
  bit-identical instead of re-rounded."""

  def sync(x):
    if not _is_float(x):
      return x
    first = jax.lax.psum(jnp.where(jax.lax.axis_index(axis_name) == 0, x, jnp.zeros_like(x)),
                         axis_name)
    return first + jax.lax.pmean(x - first, axis_name)

  return jax.tree_util.tree_map(sync, tree)


def make_train_step(objective: Objective, optimizer: optax.GradientTransformation,
                    axis_name: str | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """One optimizer step on `objective(params, state, batch, rng)`.

  The step's randomness is `fold_in(train_state.rng, train_state.step)`, so a
  run is reproducible step by step. Returns `(new_train_state, metrics)` with
  `metrics["loss"]` the objective value (before the update).

  Args:
    objective: `loss_fn(params, state, batch, rng) -> (loss, (new_state, metrics))`,
      a mean over the batch it is given.
    optimizer: the optax transformation.
    axis_name: None for one device or `jax.jit` data parallelism (the batch is
      one global array). Under `jax.pmap(..., axis_name=...)`: each device's
      gradients, loss and metrics (means over its equal share of the global
      batch) are averaged over the axis, so the update equals the global-batch
      update, and the floating leaves of the new non-parameter state are made
      equal on all devices (`sync_replicas`). Every device uses the same `rng`.

  Returns:
    `train_step(train_state, batch) -> (new_train_state, metrics)`, where
    `batch` holds "inputs" (modality -> [B, ...]) and "label" (int [B]) plus
    whatever `objective` reads, and `metrics` are scalars. `train_step` is pure
    and jit-able (or pmap-able with `axis_name`) when `objective` is; this
    factory itself is plain Python. The objectives are those of
    `mmsafe.methods`, one per training stage (CRMT Sec. 3.4 and the baselines
    of its Sec. 4.1).
  """

  def train_step(train_state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(train_state.rng, train_state.step)
    grad_fn = jax.value_and_grad(objective, has_aux=True)
    (loss, (new_state, metrics)), grads = grad_fn(
        train_state.params, train_state.state, batch, rng)
    if axis_name is not None:
      grads, loss, metrics = pmean_floats((grads, loss, metrics), axis_name)
      new_state = sync_replicas(new_state, axis_name)
    updates, opt_state = optimizer.update(grads, train_state.opt_state, train_state.params)
    params = optax.apply_updates(train_state.params, updates)
    new_train_state = train_state.replace(step=train_state.step + 1, params=params,
                                          state=new_state, opt_state=opt_state)
    return new_train_state, {"loss": loss, **metrics}

  return train_step


def make_eval_step(model, axis_name: str | None = None) -> Callable[[dict, dict], dict]:
  """Sums of correct predictions and cross-entropy over the valid examples of
  a batch (`batch["valid"]`, all valid when absent), in evaluation mode; under
  `jax.pmap` with `axis_name`, summed over the devices of the axis.

  The clean accuracy (the "w/o" attack column of CRMT Table 1, Sec. 4.2) is
  `correct / count`; the mean cross-entropy is `loss_sum / count`.

  Args:
    model: a Flax model returning a `ModelOutput` (e.g. `mmsafe.models.build`).
    axis_name: None, or the `jax.pmap` axis to sum over.

  Returns:
    `eval_step(variables, batch) -> {"correct", "loss_sum", "count"}` (scalar
    sums), with `batch` holding "inputs" (modality -> [B, ...]), "label"
    (int [B]) and optionally "valid" (bool [B]); logits are [B, K].
    `eval_step` is pure and jit-able (or pmap-able with `axis_name`); this
    factory itself is plain Python.
  """

  def eval_step(variables: dict, batch: dict) -> dict:
    out = model.apply(variables, batch["inputs"], train=False)
    labels = batch["label"]
    valid = batch.get("valid", jnp.ones(labels.shape, bool))
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
    correct = jnp.argmax(out.logits, -1) == labels
    sums = {"correct": jnp.sum(correct * valid), "loss_sum": jnp.sum(ce * valid),
            "count": jnp.sum(valid)}
    return jax.lax.psum(sums, axis_name) if axis_name is not None else sums

  return eval_step
