"""Optimizers: SGD/Adam with step decay and weight decay, Stiefel-aware."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from mmsafe.manifold import stiefel_transform
from mmsafe.models.heads import is_modality_weight, is_stiefel_leaf


def learning_rate_schedule(config: Mapping[str, Any], steps_per_epoch: int) -> optax.Schedule:
  """Constant `learning_rate` multiplied by `decay_factor` at each epoch in
  `decay_epochs` (the paper: x0.1 at epoch 60)."""
  boundaries = {int(epoch * steps_per_epoch): config.get("decay_factor", 0.1)
                for epoch in config.get("decay_epochs", ())}
  return optax.piecewise_constant_schedule(config["learning_rate"], boundaries)


def make_optimizer(config: Mapping[str, Any], steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """The optimizer of `config` (`name` "sgd" | "adam", `learning_rate`,
  `momentum`, `weight_decay`, `decay_epochs`, `decay_factor`, `retraction`).

  Weight decay (coupled, as PyTorch's SGD) applies to every leaf but the
  orthogonal head's `W~`, which `stiefel_transform` keeps exactly on the Stiefel
  manifold with the configured retraction.
  """
  config = dict(config)
  schedule = learning_rate_schedule(config, steps_per_epoch)
  name = config.get("name", "sgd")
  if name == "sgd":
    inner = optax.sgd(schedule, momentum=config.get("momentum") or None)
  elif name == "adam":
    inner = optax.adam(schedule)
  else:
    raise ValueError(f"optimizer.name: expected 'sgd' or 'adam', got {name!r}")
  weight_decay = config.get("weight_decay", 0.0)
  if weight_decay:
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, leaf: not is_stiefel_leaf(path, leaf), params)
    inner = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask), inner)
  return stiefel_transform(inner, is_stiefel_leaf, retraction=config.get("retraction", "qr"))


def make_step2_optimizer(config: Mapping[str, Any], steps_per_epoch: int
                         ) -> optax.GradientTransformation:
  """CRMT step 2: SGD with momentum and weight decay on the modality weights `a`
  only; every other leaf gets an exactly-zero update, so it stays bit-identical.
  (The paper's code: lr 0.03 x the base lr, momentum 0.9, weight decay 1e-2.)"""
  config = dict(config)
  inner = optax.sgd(learning_rate_schedule(config, steps_per_epoch),
                    momentum=config.get("momentum") or None)
  if config.get("weight_decay"):
    inner = optax.chain(optax.add_decayed_weights(config["weight_decay"]), inner)
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, leaf: "a" if is_modality_weight(path, leaf) else "frozen", params)
  return optax.multi_transform({"a": inner, "frozen": optax.set_to_zero()}, labels)


def phased(optimizers: Mapping[str, optax.GradientTransformation]
           ) -> dict[str, optax.GradientTransformation]:
  """One transformation per training phase, all sharing one state `{phase: state}`.

  `phased(...)[p].update` advances phase `p`'s optimizer and leaves the other
  phases' states untouched, so a checkpoint has the same structure whichever
  phase it was written in.
  """

  def init(params):
    return {phase: tx.init(params) for phase, tx in optimizers.items()}

  def for_phase(phase):
    def update(updates, state, params=None):
      updates, phase_state = optimizers[phase].update(updates, state[phase], params)
      return updates, {**state, phase: phase_state}
    return optax.GradientTransformation(init, update)

  return {phase: for_phase(phase) for phase in optimizers}
