"""Input checks shared by every floor of mmsafe: fail fast, naming the field,
the expected and the actual value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from mmsafe.numerics import concrete


def select_modalities(requested: str | Sequence[str] | None, valid: Sequence[str], *,
                      default: Sequence[str] | None = None, field: str = "modalities",
                      what: str = "modality") -> tuple[str, ...]:
  """The modalities `requested` (one name, several, or None for `default`, itself
  defaulting to all of `valid`), checked against `valid`.

  Raises:
    ValueError naming `field` for an unknown name, an empty selection or a duplicate.
  """
  valid = list(valid)
  if requested is None:
    return tuple(valid if default is None else default)
  if isinstance(requested, str):
    requested = (requested,)
  requested = tuple(requested)
  if not requested:
    raise ValueError(f"{field}: expected a non-empty subset of {valid}, got ()")
  for name in requested:
    if name not in valid:
      raise ValueError(f"{field}: unknown {what} {name!r}; expected one of {valid}")
  if len(set(requested)) != len(requested):
    raise ValueError(f"{field}: expected no duplicates, got {list(requested)}")
  return requested


def check_inputs(inputs: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int]], *,
                 batch_size: int | None = None, field: str = "inputs") -> None:
  """Checks modality names, per-example shapes, floating dtypes and one non-empty
  batch size (`batch_size` when given); static, on shapes and dtypes only, so it
  works under jit.

  Raises:
    ValueError naming `field` (and the modality), the expected and the actual value.
  """
  if not isinstance(inputs, Mapping):
    raise ValueError(f"{field}: expected a dict modality -> array, got {type(inputs).__name__}")
  missing = sorted(set(input_shapes) - set(inputs))
  extra = sorted(set(inputs) - set(input_shapes))
  if missing or extra:
    raise ValueError(f"{field}: expected modalities {sorted(input_shapes)}, got {sorted(inputs)}"
                     + (f" (missing modality {missing})" if missing else "")
                     + (f" (unexpected modality {extra})" if extra else ""))
  for m, shape in input_shapes.items():
    x, shape = inputs[m], tuple(shape)
    actual = tuple(x.shape) if hasattr(x, "shape") else None
    if not (actual is not None and len(actual) == len(shape) + 1 and actual[1:] == shape
            and batch_size in (None, actual[0])):
      batch = "B" if batch_size is None else batch_size
      raise ValueError(f"{field}[{m!r}]: expected shape {_dims(batch, *shape)}, got "
                       f"{_dims(*actual) if actual is not None else type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{field}[{m!r}]: expected a floating dtype, got {x.dtype}")
  sizes = {m: inputs[m].shape[0] for m in input_shapes}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"{field}: modalities disagree on the batch size: {sizes}")
  if sizes:
    check_nonempty(next(iter(sizes.values())), field)


def check_nonempty(batch_size: int, field: str = "inputs") -> None:
  """Checks that a (static) batch size is at least 1.

  Raises:
    ValueError naming `field` for an empty batch.
  """
  if batch_size < 1:
    raise ValueError(f"{field}: expected a non-empty batch (batch size >= 1), "
                     f"got batch size {batch_size}")


def check_finite(value: Any, field: str, *, batched: bool = True) -> None:
  """Checks that every entry of `value` is finite, when it is concrete (not traced
  under jit; traced values pass unchecked).

  Raises:
    ValueError naming `field`, the number of NaN/Inf entries and (`batched`: the
    leading axis is the batch) the first example holding one.
  """
  values = concrete(value)
  if values is None:
    return
  bad = ~np.isfinite(values)
  if not bad.any():
    return
  where = ""
  if batched and values.ndim:
    first = int(np.argmax(bad.reshape(values.shape[0], -1).any(axis=1)))
    where = f" (first in example {first})"
  raise ValueError(f"{field}: expected finite values, got {int(bad.sum())} NaN/Inf entries "
                   f"of {values.size}{where}")


def check_finite_inputs(inputs: Mapping[str, Any], field: str = "inputs") -> None:
  """`check_finite` on every modality of `inputs`, naming it (`inputs['pix']`)."""
  for m in sorted(inputs):
    check_finite(inputs[m], f"{field}[{m!r}]")


def check_integer(value: Any, field: str, minimum: int) -> int:
  """`value` as an int; ValueError naming `field` unless it is an integer >= `minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{field}: expected an integer >= {minimum}, got {value!r}")
  return int(value)


def check_number(value: Any, field: str, minimum: float, inclusive: bool = True, *,
                 maximum: float = math.inf, what: str = "a finite number") -> float:
  """`value` as a float; ValueError naming `field` unless it is a finite number
  >= `minimum` (> `minimum` when not `inclusive`) and <= `maximum`."""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
        and math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
        and value <= maximum)
  if not ok:
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    bound += f" and <= {maximum:g}" if maximum < math.inf else ""
    raise ValueError(f"{field}: expected {what} {bound}, got {value!r}")
  return float(value)


def check_labels(labels: Any, num_classes: int, *, batch_size: int | None = None,
                 field: str = "labels") -> None:
  """Checks that `labels` is int [B] (`B = batch_size` when given) and, when concrete
  (not traced under jit), that its values lie in `[0, num_classes)`.

  Raises:
    ValueError naming `field`, the expected and the actual value.
  """
  shape, dtype = tuple(labels.shape), labels.dtype
  if (len(shape) != 1 or (batch_size is not None and shape[0] != batch_size)
      or not jnp.issubdtype(dtype, jnp.integer)):
    batch = "B" if batch_size is None else batch_size
    raise ValueError(f"{field}: expected int[{batch}], got {dtype}{list(shape)}")
  values = concrete(labels)
  if values is not None and values.size and (values.min() < 0 or values.max() >= num_classes):
    raise ValueError(f"{field}: expected values in [0, {num_classes}), got range "
                     f"[{values.min()}, {values.max()}]")


def _dims(*dims: Any) -> str:
  """`[4, 76]`: a shape as written in error messages."""
  return f"[{', '.join(map(str, dims))}]"
