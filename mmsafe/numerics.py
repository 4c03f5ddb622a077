"""Small numeric helpers shared by every floor of mmsafe (pure, jit-able)."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Full float32 precision for matmuls whose result is a bound or a constraint
# (the TPU/GPU default rounds the inputs to bfloat16/TF32).
HIGHEST = jax.lax.Precision.HIGHEST


def matmul_precision(precision: str | None) -> contextlib.AbstractContextManager:
  """`jax.default_matmul_precision(precision)`, or no change (the ambient setting) for None."""
  if precision is None:
    return contextlib.nullcontext()
  return jax.default_matmul_precision(precision)


def label_mask(labels: jax.Array, num_classes: int) -> jax.Array:
  """bool [B, K]: True at `(b, labels[b])`."""
  return jax.nn.one_hot(labels, num_classes, dtype=bool)


def mask_labels(values: jax.Array, labels: jax.Array, fill: float) -> jax.Array:
  """`values` [B, K] with the entry of each example's label replaced by `fill`
  (e.g. `-inf` before a max over the wrong classes)."""
  return jnp.where(label_mask(labels, values.shape[-1]), fill, values)


def concrete(value: Any) -> np.ndarray | None:
  """`value` as numpy when it is concrete, None when it is traced under a transformation
  (value checks then run only on concrete inputs)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)
