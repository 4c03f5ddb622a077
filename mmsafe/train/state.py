"""The training state: one pytree holding everything a resumed run needs."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Attributes:
    step: int32 scalar, number of optimizer steps taken.
    params: the model parameters.
    state: non-parameter state; `state["model"]` holds the model's mutable
      collections (batch-norm statistics), methods may add entries.
    opt_state: the optimizer state.
    rng: the run's base PRNG key; step `s` uses `fold_in(rng, s)`.
  """

  step: jax.Array
  params: Any
  state: dict
  opt_state: optax.OptState
  rng: jax.Array

  @classmethod
  def create(cls, variables: dict, optimizer: optax.GradientTransformation,
             rng: jax.Array, method_state: dict | None = None) -> "TrainState":
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               state={"model": model_state, **(method_state or {})},
               opt_state=optimizer.init(params), rng=rng)

  @property
  def variables(self) -> dict:
    """The model variables (`params` + collections) for `model.apply`."""
    return {"params": self.params, **self.state.get("model", {})}
