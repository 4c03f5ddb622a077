"""Registry of training methods: name -> `Method`.

A method knows which head it needs and builds an objective

    loss_fn(params, state, batch, rng) -> (loss, (new_state, metrics))

for a given model. `state` is a dict whose entry "model" holds the
model's non-parameter collections (batch-norm statistics); methods may keep
their own entries beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax

Objective = Callable[..., tuple[jax.Array, tuple[dict, dict]]]

_REGISTRY: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A named training method.

  Attributes:
    name: registry name (`--config.method=<name>`).
    head: the head kind the method trains ("concat" or "orthogonal").
    make_objective: `(model, config) -> loss_fn`; `config` is the method's
      hyper-parameters (a mapping, usually `config.method_kwargs`).
    description: one line for `--help` and reports.
    init_state: optional `(model, variables, config) -> dict` of method state entries
      (beside `state["model"]`), present from the first step so a checkpoint
      has one structure throughout.
    step2: for two-step methods (CRMT), `(model, config) -> loss_fn` of the
      second step, which the loop runs after the first step's epochs with the
      step-2 optimizer.
    prepare_step2: `(model, variables, train_dataset, config, *, batch_size)
      -> dict` of method state entries computed once when step 2 begins.
    on_epoch_end: `(model, config, variables, state, splits, *, epoch,
      batch_size) -> dict` of method state entries to replace after each
      first-step epoch (and once with `epoch=0` before training), for what a
      pure train step cannot see, e.g. Gradient Blending's held-out losses.
  """

  name: str
  head: str
  make_objective: Callable[[Any, Mapping[str, Any]], Objective]
  description: str = ""
  init_state: Callable[[Any, Any, Mapping[str, Any]], dict] | None = None
  step2: Callable[[Any, Mapping[str, Any]], Objective] | None = None
  prepare_step2: Callable[..., dict] | None = None
  on_epoch_end: Callable[..., dict] | None = None

  @property
  def two_step(self) -> bool:
    return self.step2 is not None

  def __call__(self, model, config: Mapping[str, Any] | None = None) -> Objective:
    return self.make_objective(model, dict(config or {}))


def register(name: str, *, head: str, description: str = "", **fields):
  """Decorator registering `make_objective(model, config)` under `name`;
  `fields` are the optional `Method` attributes (init_state, step2, ...)."""

  def wrap(make_objective):
    if name in _REGISTRY:
      raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = Method(name, head, make_objective, description, **fields)
    return make_objective

  return wrap


def get(name: str) -> Method:
  """The method registered as `name`; a clear error for unknown names."""
  if name not in _REGISTRY:
    raise ValueError(f"method: expected one of {sorted(_REGISTRY)}, got {name!r}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered method names, sorted (e.g. "crmt", "jt", "mmat", ...)."""
  return tuple(sorted(_REGISTRY))
