"""Input checks shared by every floor of mmsafe: fail fast, naming the field,
the expected and the actual value."""

from __future__ import annotations

from collections.abc import Sequence


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
