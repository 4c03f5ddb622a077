"""Sound Lipschitz constants: upper bounds valid for every input (CRMT, ICLR 2024, Sec. 3).

Kind "sound" (`sound_constants`): products of layer operator norms, as each
encoder states them itself (`encoder_lipschitz`; the layers' bounds live in
`mmsafe.models.layers`, `operator_norm` and friends in
`mmsafe.models.operator_norms`). Radii computed with these constants are
certificates. The representation of the results is `mmsafe.certify.constants`'.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsafe import programs
from mmsafe.certify.constants import LipschitzConstants, head_params, head_target
from mmsafe.models.layers import LIPSCHITZ_COLLECTION
from mmsafe.models.operator_norms import BoundOptions

Array = jax.Array


def _bound_options(key: Array | None, method: str, iterations: int, failure_probability: float,
                  exact_max_entries: int) -> BoundOptions:
  """The `BoundOptions` of the operator norms (`key` None: `PRNGKey(0)`)."""
  return BoundOptions(key=jax.random.PRNGKey(0) if key is None else key, method=method,
                      iterations=iterations, failure_probability=failure_probability,
                      exact_max_entries=exact_max_entries)


def _encoder_variables(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None
                       ) -> dict[str, Any]:
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _layer_bounds(recorded: Mapping[str, Any]) -> dict[str, Array]:
  """Layer name -> bound, from the `LIPSCHITZ_COLLECTION` an encoder's
  `lipschitz_bound` recorded (the encoder's own total left out)."""
  return {name: entry["bound"][0] for name, entry in recorded[LIPSCHITZ_COLLECTION].items()
          if name != "bound"}


def encoder_lipschitz(encoder: nn.Module, params: Mapping[str, Any],
                      batch_stats: Mapping[str, Any] | None, input_shape: tuple[int, ...], *,
                      key: Array | None = None, method: str = "auto", iterations: int = 300,
                      failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21
                      ) -> tuple[Array, dict[str, Array]]:
  """A sound upper bound on the l2 Lipschitz constant of an encoder `phi`.

  The encoder states it itself (`lipschitz_bound`, beside its `__call__`; see
  `mmsafe.models.layers`): the product of its layers' bounds, e.g. exact
  spectral norms of Dense kernels, convolutions with eval-mode batch norm
  folded in on their actual input shapes, `1 + ||F||` for residual blocks,
  `1/sqrt(HW)` for a global mean, `1/sqrt(T)` for a mean over frames, and 1
  for the 1-Lipschitz layers of `mmsafe.models.lipschitz_layers`.

  Convolutions whose matrix has more than `exact_max_entries` entries use
  power iteration: the bound then holds with probability >= 1 -
  failure_probability per such layer (see `power_iteration_factor`). The
  bound is for float32 arithmetic; a bfloat16 encoder computes a slightly
  different function.

  Args:
    encoder: an encoder module of `mmsafe.models.encoders` (or any module
      with `lipschitz_bound(x, options)`).
    params / batch_stats: its variables (the "params" / "batch_stats"
      collections of this encoder).
    input_shape: the per-example input shape.

  Returns:
    (bound, layers): the bound and an ordered dict: the encoder's layer name
    -> that layer's bound (their product is the bound).

  Raises:
    NotImplementedError naming the encoder or its layer that states no bound.
  """
  if not hasattr(encoder, "lipschitz_bound"):
    raise NotImplementedError(f"sound Lipschitz bound: {type(encoder).__name__} states no "
                              f"Lipschitz bound")
  options = _bound_options(key, method, iterations, failure_probability, exact_max_entries)
  example = jnp.zeros((1, *input_shape), jnp.float32)
  with jax.default_matmul_precision("highest"):
    bound, recorded = encoder.apply(_encoder_variables(params, batch_stats), example, options,
                                    method="lipschitz_bound", mutable=[LIPSCHITZ_COLLECTION])
  return bound, _layer_bounds(recorded)


def _sound_values(kernel: Array, encoder_bound: Array, target: str) -> Array:
  """One modality's sound constants from its head kernel `[d, K]` and `L^(m)`:
  `[1, K]` row norms times `L^(m)` (scores) or `[1, K, K]` `L^(m)` off the
  diagonal (margins)."""
  kernel = kernel.astype(jnp.float32)
  if target == "scores":
    return (jnp.linalg.norm(kernel, axis=0) * encoder_bound)[None]
  return (encoder_bound * (1.0 - jnp.eye(kernel.shape[-1])))[None]


def sound_constants(model, variables: Mapping[str, Any], *, head=None, key: Array | None = None,
                    method: str = "auto", iterations: int = 300,
                    failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21
                    ) -> LipschitzConstants:
  """Kind "sound": upper bounds valid for every input.

  `L^(m) >= Lip(phi^(m))` is each encoder's own stated bound
  (`model.feature_lipschitz`, see `encoder_lipschitz`). Orthogonal head:
  `tau~^(m)_k = ||W~^(m)_k|| L^(m)` with the actual row norms of `W~` (never
  an assumed 1). Concat head: the margin `zeta^(m)_k` is `phi^(m)` along a
  unit direction, so its constant is `L^(m)` for every pair (0 on the
  diagonal). These bound `tau~^(m)_k` (CRMT eq. 9) and `tau^(m)_k` (CRMT
  eq. 4) for every input, so the radii of Thm 3.3 / Thm 3.5 computed with
  them are certificates (up to the power-iteration failure probability for
  large conv layers). `encoder` holds `L^(m)` itself, which the tight form of
  Thm 3.5 uses (`mmsafe.certify.certified_radius`).

  Args:
    model, variables: a model from `mmsafe.models.build` and its variables.
    head: the model's `HeadParams` (computed by one forward pass when None).
    key: PRNG key of the power iterations (default `PRNGKey(0)`).
    method, iterations, failure_probability, exact_max_entries: see
      `operator_norm`.

  Returns:
    `LipschitzConstants` of kind "sound" with values `[1, K]` (scores) or
    `[1, K, K]` (margins), and `encoder` modality -> scalar `L^(m)`.

  Raises:
    NotImplementedError naming the model part that states no bound (e.g. the
    cross-modal transformer).

  Pure and jit-able with `model` and the options static (close over them);
  `variables`, `head` and `key` may be traced. A direct call is one program,
  compiled once per (model, options) and shapes (`mmsafe.certify.programs`).
  """
  if not hasattr(model, "feature_lipschitz"):
    raise NotImplementedError(f"sound Lipschitz bound: {type(model).__name__} states no "
                              f"Lipschitz bound for its features (expected a model from "
                              f"mmsafe.models.build)")
  head = head_params(model, variables) if head is None else head
  options = _bound_options(key, method, iterations, failure_probability, exact_max_entries)
  return programs.compiled(_sound_constants, model)(variables, head, options)


def _sound_constants(model, variables: Mapping[str, Any], head, options: BoundOptions
                     ) -> LipschitzConstants:
  """The computation of `sound_constants` (traced; the static fields of
  `options` are part of the program's key)."""
  target = head_target(head.kind)
  encoder_bounds = model.apply(variables, options, method="feature_lipschitz")
  values = {m: _sound_values(head.kernels[m], encoder_bounds[m], target)
            for m in sorted(head.kernels)}
  return LipschitzConstants(values=values, encoder=encoder_bounds, kind="sound", target=target)
