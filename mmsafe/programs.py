"""Compiled programs built once per static structure, and tracing detection.

Every public entry point of `mmsafe.certify` (`certify`, `local_lipschitz`,
`jacobian_norms`, `local_constants`, `empirical_constants`, `sound_constants`,
`head_params`), and Gradient Blending's whole-split losses, run their
computation as one `jax.jit` program taken from `compiled`. A program
is keyed on what is static -- the model (or score function), by identity, and
the options (kind, mode, chunk size, precision, ...) by value; the shapes and
dtypes of its array arguments go to jit's own cache. A second direct call with
the same model, options and shapes therefore neither traces nor compiles.

Why a cache: building a new `jax.jit` on every call recompiles the whole
program each time, 10-20x the run time of the compiled program at B = 100 on
a CPU. The cache is bounded: beyond `MAX_PROGRAMS` the least recently used
program is dropped, and with it jit's cache of its compilations. The other
caches that key compiled programs use the same bound: the vote transforms of
`certify.smoothing.gaussian_noise` / `certify.ablation.ablation` (a program
built on a transform is cached on its identity) and the cross-process maximum
of `train.parallel`. A program holds its model (a Flax module is a small
description; the variables are always arguments, never constants).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
import functools
from typing import Any

import jax

# Programs kept: each is one (entry point, model, options) combination.
MAX_PROGRAMS = 64


class _ByIdentity:
  """`value` as a cache key compared by identity (a Flax model with dict
  attributes is not hashable). The key holds `value`, so its id stays unique."""

  __slots__ = ("value",)

  def __init__(self, value: Any):
    self.value = value

  def __hash__(self) -> int:
    return id(self.value)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _ByIdentity) and other.value is self.value


def compiled(fn: Callable[..., Any], subject: Any, *options: Hashable) -> Callable[..., Any]:
  """`jax.jit(functools.partial(fn, subject, *options))`, built once per
  `(fn, subject, options)`: `subject` (a model or score function) is keyed by
  identity, `options` by value."""
  return _jitted(fn, _ByIdentity(subject), options)


@functools.lru_cache(maxsize=MAX_PROGRAMS)
def _jitted(fn: Callable[..., Any], subject: _ByIdentity, options: tuple[Hashable, ...]
            ) -> Callable[..., Any]:
  return jax.jit(functools.partial(fn, subject.value, *options))


def derived(fn: Callable[[Any], Any], subject: Any) -> Any:
  """`fn(subject)`, computed once per `(fn, subject)` (`subject` by identity), so
  that a model derived from a model (e.g. its float32 form) keeps the programs
  compiled for it."""
  return _derived(fn, _ByIdentity(subject))


@functools.lru_cache(maxsize=MAX_PROGRAMS)
def _derived(fn: Callable[[Any], Any], subject: _ByIdentity) -> Any:
  return fn(subject.value)


def is_traced(*trees: Any) -> bool:
  """Whether any leaf of `trees` is a tracer (the caller runs under a transformation)."""
  return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))
