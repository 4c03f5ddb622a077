"""Optimizers: SGD/Adam with step decay and weight decay, Stiefel-aware, with
frozen parameters per training stage."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from mmsafe import checks
from mmsafe.manifold import stiefel_transform
from mmsafe.models.heads import is_modality_weight, is_stiefel_leaf


# Above it training only diverges (a learning rate of 1e30 overflows float32 at
# the first steps): every rate from 1 to 1e10 ended mfeat JT and OJT training
# with a NaN loss within 42 steps (BUILD_NOTES, "Faults and bad input"); 1e3
# leaves room for losses with tiny gradients.
MAX_LEARNING_RATE = 1e3


def learning_rate_schedule(config: Mapping[str, Any], steps_per_epoch: int) -> optax.Schedule:
  """Constant `learning_rate` multiplied by `decay_factor` at each epoch in
  `decay_epochs` (the paper: x0.1 at epoch 60)."""
  boundaries = {int(epoch * steps_per_epoch): config.get("decay_factor", 0.1)
                for epoch in config.get("decay_epochs", ())}
  return optax.piecewise_constant_schedule(config["learning_rate"], boundaries)


def check_hyperparameters(config: Mapping[str, Any], field: str) -> None:
  """Checks the optimizer `config`'s numbers (section `field`), all finite:
  `learning_rate` in [0, `MAX_LEARNING_RATE`] (0: a stage that trains
  nothing), `decay_factor` > 0, `momentum`, `weight_decay` and each of
  `decay_epochs` >= 0."""
  checks.check_number(config.get("learning_rate"), f"{field}.learning_rate", 0.0,
                      maximum=MAX_LEARNING_RATE)
  decay_epochs = config.get("decay_epochs", ())
  if not isinstance(decay_epochs, (list, tuple)):
    raise ValueError(f"{field}.decay_epochs: expected a sequence of epochs, got "
                     f"{decay_epochs!r}")
  for i, epoch in enumerate(decay_epochs):
    checks.check_number(epoch, f"{field}.decay_epochs[{i}]", 0.0)
  checks.check_number(config.get("decay_factor", 0.1), f"{field}.decay_factor", 0.0,
                      inclusive=False)
  for key in ("momentum", "weight_decay"):
    checks.check_number(config.get(key) or 0.0, f"{field}.{key}", 0.0)


# Parameter selections a stage's optimizer may train (`trainable`); every other
# leaf gets an exactly-zero update and stays bit-identical.
TRAINABLE = {"all": None, "modality_weights": is_modality_weight}


def make_optimizer(config: Mapping[str, Any], steps_per_epoch: int, *,
                   field: str = "optimizer") -> optax.GradientTransformation:
  """The optimizer of `config` (`name` "sgd" | "adam", `learning_rate`,
  `momentum`, `weight_decay`, `decay_epochs`, `decay_factor`, `retraction`,
  `trainable`).

  Weight decay (coupled, as PyTorch's SGD) applies to every trained leaf but
  the orthogonal head's `W~`, which `stiefel_transform` keeps exactly on the
  Stiefel manifold with the configured retraction. `trainable` (a key of
  `TRAINABLE`, default "all") freezes the other leaves, as big_vision freezes
  parameters by schedule (e.g. a stage that tunes only the orthogonal
  head's modality weights `a`). Errors name the config section `field`.
  """
  config = dict(config)
  check_hyperparameters(config, field)
  trainable = config.get("trainable") or "all"
  if trainable not in TRAINABLE:
    raise ValueError(f"{field}.trainable: expected one of {sorted(TRAINABLE)}, got "
                     f"{trainable!r}")
  schedule = learning_rate_schedule(config, steps_per_epoch)
  name = config.get("name", "sgd")
  if name == "sgd":
    inner = optax.sgd(schedule, momentum=config.get("momentum") or None)
  elif name == "adam":
    inner = optax.adam(schedule)
  else:
    raise ValueError(f"{field}.name: expected 'sgd' or 'adam', got {name!r}")
  weight_decay = config.get("weight_decay", 0.0)
  if weight_decay:
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, leaf: not is_stiefel_leaf(path, leaf), params)
    inner = optax.chain(optax.add_decayed_weights(weight_decay, decay_mask), inner)
  transform = stiefel_transform(inner, is_stiefel_leaf, retraction=config.get("retraction", "qr"))
  selected = TRAINABLE[trainable]
  if selected is None:
    return transform
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, leaf: "trained" if selected(path, leaf) else "frozen", params)
  return optax.multi_transform({"trained": transform, "frozen": optax.set_to_zero()}, labels)


def per_stage(optimizers: Mapping[str, optax.GradientTransformation]
              ) -> dict[str, optax.GradientTransformation]:
  """One transformation per training stage, all sharing one state `{stage: state}`.

  `per_stage(...)[s].update` advances stage `s`'s optimizer and leaves the other
  stages' states untouched, so a checkpoint has the same structure whichever
  stage it was written in.
  """

  def init(params):
    return {stage: tx.init(params) for stage, tx in optimizers.items()}

  def for_stage(stage):
    def update(updates, state, params=None):
      updates, stage_state = optimizers[stage].update(updates, state[stage], params)
      return updates, {**state, stage: stage_state}
    return optax.GradientTransformation(init, update)

  return {stage: for_stage(stage) for stage in optimizers}
