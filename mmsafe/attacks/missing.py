"""Missing-modality perturbation: one modality replaced by a fill.

CRMT (Yang et al., ICLR 2024, Table 2, "Missing modality") evaluates a model
with modality m absent. In normalised space zeros are the training mean, so
the default fill "zeros" is the dataset mean; "mean" takes an explicit mean
(e.g. a per-entry mean of the normalised training data), "noise" draws
Gaussian noise around it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import checks
from mmsafe.attacks import common

Array = jax.Array
FILLS = ("zeros", "mean", "noise")


def _fill_centre(mean: Any, example_shape: tuple[int, ...], modality: str, fill: str) -> Array:
  """`mean` broadcast to one example of `modality` (zeros when None), checked."""
  if fill == "mean" and mean is None:
    raise ValueError("mean: expected an array broadcastable to one example "
                     f"{list(example_shape)} for fill='mean', got None")
  if mean is None:
    return jnp.zeros(example_shape, jnp.float32)
  mean = jnp.asarray(mean, jnp.float32)
  try:
    shape = np.broadcast_shapes(tuple(mean.shape), example_shape)
  except ValueError:
    shape = None
  if shape != example_shape:
    raise ValueError(f"mean: expected a shape broadcastable to one example "
                     f"{list(example_shape)} of {modality!r}, got {list(mean.shape)}")
  return jnp.broadcast_to(mean, example_shape)


def drop_modality(inputs: common.Inputs, modality: str, fill: str = "zeros", *,
                  mean: Any = None, key: Array | None = None, noise_std: float = 1.0
                  ) -> dict[str, Array]:
  """Replaces `inputs[modality]` ([B, ...]) by a fill; other modalities are untouched.

  The "missing modality" perturbation of CRMT Sec. 4.1 (Table 2).

  Pure and jit-able: `inputs`, `mean`, `key` and `noise_std` may be traced;
  `modality` and `fill` are static. Shape checks (a non-empty batch) are
  static; finite inputs are checked when concrete; the `noise_std >= 0` check
  runs only for a Python number.

  Args:
    inputs: modality -> float [B, ...] in normalised space.
    modality: the modality to drop.
    fill: "zeros" (the training mean in normalised space), "mean" (the array
      `mean`, broadcast against one example) or "noise" (`mean` (default 0)
      plus `noise_std` times standard normal noise; needs `key`).
    mean: the fill value for "mean" / centre for "noise", broadcastable to one
      example's shape (in normalised space).
    key: PRNG key, required for "noise".
    noise_std: standard deviation of the "noise" fill (normalised units), >= 0.

  Returns:
    A new dict with the same modalities, shapes and dtypes.

  Raises:
    ValueError for an unknown modality or fill, a missing `mean`/`key`, a
    `mean` whose shape does not broadcast to one example, malformed or empty
    inputs, or (when concrete) NaN/Inf inputs.
  """
  (modality,) = common.resolve_modalities(inputs, modality)
  common.input_batch(inputs)
  checks.check_finite_inputs(inputs)
  if fill not in FILLS:
    raise ValueError(f"fill: expected one of {list(FILLS)}, got {fill!r}")
  x = inputs[modality]
  value = jnp.broadcast_to(_fill_centre(mean, tuple(x.shape[1:]), modality, fill), x.shape)
  if fill == "zeros":
    value = jnp.zeros(x.shape, x.dtype)
  elif fill == "noise":
    if key is None:
      raise ValueError("key: expected a PRNG key for fill='noise', got None")
    if isinstance(noise_std, (int, float)) and not noise_std >= 0:
      raise ValueError(f"noise_std: expected >= 0, got {noise_std!r}")
    value = value + noise_std * common.normal(key, x.shape)
  out = dict(inputs)
  out[modality] = value.astype(x.dtype)
  return out
