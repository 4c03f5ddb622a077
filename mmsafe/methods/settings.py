"""Typed method settings: each method's hyper-parameters as a frozen dataclass.

A method declares a `Settings` subclass whose fields are named like the
`config.method_kwargs` entries they come from (`rho`, `ogm_alpha`, ...), each
with its default and its range (`setting`). Building one checks every field
(`check_settings`: its type, then its range; a ValueError names the field, the
expected and the actual value) and normalises numbers to Python `float` /
`int`, so a settings object is hashable and static under `jax.jit`. Checks
that involve several fields go in the subclass's `check`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any

import numpy as np

_KINDS = (bool, int, float, str)


def setting(default: Any, *, minimum: float | None = None, exclusive_minimum: bool = False,
            maximum: float | None = None, exclusive_maximum: bool = False,
            choices: tuple[str, ...] | None = None) -> Any:
  """A settings field with its default and range: numbers in `[minimum,
  maximum]` (an end open when `exclusive_*`), strings among `choices`."""
  return dataclasses.field(default=default, metadata={
      "minimum": minimum, "exclusive_minimum": exclusive_minimum, "maximum": maximum,
      "exclusive_maximum": exclusive_maximum, "choices": choices})


@functools.cache
def field_kinds(cls: type) -> dict[str, tuple[type, bool]]:
  """field name -> (`bool`, `int`, `float` or `str`, whether None is allowed),
  from the annotations of settings class `cls`."""
  hints = typing.get_type_hints(cls)
  kinds = {}
  for field in dataclasses.fields(cls):
    args = typing.get_args(hints[field.name]) or (hints[field.name],)
    kind = [a for a in args if a is not type(None)]
    if len(kind) != 1 or kind[0] not in _KINDS:
      raise TypeError(f"{cls.__name__}.{field.name}: expected one of {_KINDS} (or None), "
                      f"got {hints[field.name]}")
    kinds[field.name] = (kind[0], type(None) in args)
  return kinds


def _bound(meta: dict) -> str:
  """`>= 0`, `> 0 and < 1`, ...: a field's range as written in error messages."""
  parts = []
  if meta["minimum"] is not None:
    parts.append(f"{'>' if meta['exclusive_minimum'] else '>='} {meta['minimum']:g}")
  if meta["maximum"] is not None:
    parts.append(f"{'<' if meta['exclusive_maximum'] else '<='} {meta['maximum']:g}")
  return " and ".join(parts)


def _check_number(value: Any, name: str, kind: type, meta: dict) -> int | float:
  """`value` as `kind` (int or float) in the field's range, else a ValueError."""
  if kind is int:
    what, ok = "an integer", isinstance(value, (int, np.integer))
  else:
    what = "a finite number"
    ok = isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value)
  ok = ok and not isinstance(value, bool)
  if ok and meta["minimum"] is not None:
    ok = value > meta["minimum"] if meta["exclusive_minimum"] else value >= meta["minimum"]
  if ok and meta["maximum"] is not None:
    ok = value < meta["maximum"] if meta["exclusive_maximum"] else value <= meta["maximum"]
  if not ok:
    raise ValueError(f"{name}: expected {what} {_bound(meta)}, got {value!r}")
  return kind(value)


def check_value(cls: type, name: str, value: Any) -> Any:
  """`value` of field `name` of settings class `cls`, checked and normalised
  (numbers to Python `int` / `float`); a ValueError names `method_kwargs.<name>`,
  the expected and the actual value."""
  kind, optional = field_kinds(cls)[name]
  meta = cls.__dataclass_fields__[name].metadata
  field = f"method_kwargs.{name}"
  if value is None and optional:
    return None
  if kind is bool:
    if not isinstance(value, (bool, np.bool_)):
      raise ValueError(f"{field}: expected True or False, got {value!r}")
    return bool(value)
  if kind is str:
    if not isinstance(value, str) or (meta["choices"] and value not in meta["choices"]):
      expected = f"one of {list(meta['choices'])}" if meta["choices"] else "a string"
      raise ValueError(f"{field}: expected {expected}{' or None' if optional else ''}, "
                       f"got {value!r}")
    return value
  return _check_number(value, field, kind, meta)


def check_settings(settings: "Settings") -> None:
  """Checks and normalises every field of `settings` in place (see `check_value`)."""
  for name in field_kinds(type(settings)):
    object.__setattr__(settings, name, check_value(type(settings), name, getattr(settings, name)))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Base of every method's settings: checked when built (`check_settings`,
  then `check` for rules across fields)."""

  def __post_init__(self):
    check_settings(self)
    self.check()

  def check(self) -> None:
    """Rules across fields; a ValueError naming the field. None by default."""
