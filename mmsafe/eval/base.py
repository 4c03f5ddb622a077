"""What every evaluator shares: the common keyword arguments, the evaluated
split, the test-time defence, the model's logits, field checks and compiled
programs.

An evaluator (`Evaluator` subclasses, one module per type) is built from fixed
keyword arguments: its constructor's keyword-only parameters are its config
keys (`mmsafe.eval.registry.build_evaluators` refuses any other, naming it),
and its constructor checks their values, raising ValueError("<field>: expected
..., got ..."). Everything a compiled program reads besides its traced
arguments (box constraints, fill means, budgets) is fixed at construction or
computed once from those arguments (`bounds`, a cached property), so a program
traced on the first `run` stays right for every later one; the variables,
eps and budgets are traced arguments (no recompilation per run).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any, ClassVar

import jax
import numpy as np

from mmsafe import checks
from mmsafe import data as data_lib
from mmsafe import methods
from mmsafe.eval.batching import Progress

Array = jax.Array
ApplyFn = Callable[[Any, Mapping[str, Array]], Array]


def sequence(value: Any, field: str, kind: type, what: str) -> tuple:
  """`value` (one item or a list of them) as a tuple of `kind` items."""
  values = (value,) if isinstance(value, (str, int, float)) else value
  try:
    return tuple(v if kind is str else kind(v) for v in values)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{field}: expected {what} or a list of them, got {value!r}") from e


def floats(value: Any, field: str) -> tuple[float, ...]:
  """`value` (one number or a list of them) as floats."""
  return sequence(value, field, float, "a number")


def bounded_floats(value: Any, field: str, low: float, high: float = math.inf, *,
                   low_inclusive: bool = True) -> tuple[float, ...]:
  """`value` (one number or a list of them) as floats, each finite, >= `low` (>
  when not `low_inclusive`) and <= `high` (`checks.check_number`)."""
  return tuple(checks.check_number(v, field, low, low_inclusive, maximum=high,
                                   what="finite values") for v in floats(value, field))


def flag(value: Any, field: str) -> bool:
  """`value` as a bool (ValueError naming `field` unless it is one)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{field}: expected True or False, got {value!r}")
  return bool(value)


def strings(value: Any, field: str) -> tuple[str, ...]:
  """`value` (one name or a list of them) as a tuple of names."""
  names = sequence(value, field, str, "a name")
  if not all(isinstance(v, str) for v in names):
    raise ValueError(f"{field}: expected a name or a list of names, got {value!r}")
  return names


def count(value: Any, field: str, minimum: int = 0) -> int:
  """`value` as an int >= `minimum` (ValueError naming `field` otherwise)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{field}: expected an integer >= {minimum}, got {value!r}")
  return int(value)


def eps_grid(values: Sequence[float], must_have: float, name: str) -> tuple[float, ...]:
  """The sorted positive values of `values` plus `must_have` (a protocol's budget)."""
  grid = sorted({float(v) for v in values} | {float(must_have)})
  for v in grid:
    if not np.isfinite(v) or v < 0:
      raise ValueError(f"{name}: expected finite values >= 0, got {v}")
  return tuple(v for v in grid if v > 0)


def compile_program(fn: Callable, loop: str, static_argnames: str | Sequence[str]) -> Callable:
  """`fn(..., loop)` with the loop strategy `loop` (`mmsafe.attacks.engine`): called
  as is around the host loops of the attacks ("python": their steps compile once
  per apply function, static options and batch shape), or jitted whole (traced
  loops); both take the variables and eps / budgets as arrays."""
  fn = functools.partial(fn, loop=loop)
  return fn if loop == "python" else jax.jit(fn, static_argnames=static_argnames)


@dataclasses.dataclass(frozen=True, eq=False)
class _LogitsApply:
  """`(variables, inputs) -> logits` of `model` in inference mode; equal for equal
  models (a module holding dicts is unhashable, so the hash is its repr's), so the
  attacks' compiled pieces are shared by every model of one architecture."""

  model: Any

  def __call__(self, variables: Any, inputs: Mapping[str, Array]) -> Array:
    return self.model.apply(variables, inputs, train=False).logits

  def __eq__(self, other: Any) -> bool:
    return isinstance(other, _LogitsApply) and self.model == other.model

  def __hash__(self) -> int:
    return hash(repr(self.model))


def logits_apply(model) -> ApplyFn:
  """`(variables, inputs) -> logits [B, K]` of a `mmsafe.models` model in inference
  mode (equal, and so sharing compiled programs, for equal models)."""
  return _LogitsApply(model)


class TestTimeDefence:
  """The test-time defence of method `name` (`methods.Method.defence`) around a
  model trained with it: `apply_fn` takes `prepare(variables)`."""

  def __init__(self, name: str, model, run_config: Mapping[str, Any] | None,
               splits: Mapping[str, Any], *, seed: int, batch_size: int):
    method = (run_config or {}).get("method")
    if method != name:
      raise ValueError(f"defence: {name!r} applies to a model trained with method {name!r}, "
                       f"got method {method!r}")
    if "train" not in splits:
      raise ValueError(f"defence: {name!r} builds its state from a 'train' split, got splits "
                       f"{sorted(splits)}")
    self.defence = methods.get(name).defence
    self.settings = self.defence.settings(run_config.get("method_kwargs") or {})
    self.model, self.splits, self.seed, self.batch_size = model, splits, seed, batch_size

  def apply_fn(self, defended: Mapping[str, Any], inputs: Mapping[str, Any]) -> jax.Array:
    """Fused logits of the defended classifier."""
    return self.defence.logits(self.model, self.settings, defended, inputs)

  @functools.cached_property
  def train_inputs(self) -> Mapping[str, np.ndarray]:
    """The training split's inputs, loaded on first use."""
    return data_lib.in_memory(self.splits["train"], 0).inputs

  def prepare(self, variables: Any) -> Any:
    """What `apply_fn` reads, built from the evaluated variables."""
    return self.defence.prepare(self.model, variables, self.train_inputs, self.settings,
                                seed=self.seed, batch_size=self.batch_size)


def defences() -> tuple[str, ...]:
  """The `defence` values: "none" and every method that declares a test-time defence."""
  return ("none", *(name for name in methods.names() if methods.get(name).defence))


class Evaluator:
  """One measurement on one split; subclasses set `type`, take their own keys as
  keyword-only constructor arguments (passing the common ones on) and implement
  `measure`.

  Args (the keys every type takes):
    name: the key in `config.evals`.
    model, splits: the evaluated model and the splits by name.
    run_config: the training run's config (its `method`, `method_kwargs`),
      needed by a `defence` other than "none".
    split: the split evaluated.
    every_steps: run every this many training steps (0: only offline).
    max_examples: evaluate the split's first this many examples (0: all).
    batch_size: examples per compiled call (None: the type's default).
    seed: base seed of the randomness.
    defence: "none", or a method with a test-time defence (`defences()`).
  """

  type: ClassVar[str] = ""
  default_batch_size: ClassVar[int] = 256

  def __init__(self, *, name: str, model, splits: Mapping[str, Any],
               run_config: Mapping[str, Any] | None = None, split: str = "validation",
               every_steps: int = 0, max_examples: int = 0, batch_size: int | None = None,
               seed: int = 0, defence: str = "none"):
    self.name, self.model, self.splits = name, model, splits
    self.every_steps = count(every_steps, "every_steps")
    self.max_examples = count(max_examples, "max_examples")
    self.batch_size = count(self.default_batch_size if batch_size is None else batch_size,
                            "batch_size", 1)
    self.seed = count(seed, "seed")
    self.split = self.split_named(split, "split")
    if defence not in defences():
      raise ValueError(f"defence: expected one of {list(defences())}, got {defence!r}")
    self.defence_name = defence
    self.defence = (None if defence == "none" else TestTimeDefence(
        defence, model, run_config, splits, seed=self.seed, batch_size=self.batch_size))
    self.apply_fn = self.defence.apply_fn if self.defence else logits_apply(model)
    self.input_shapes = dict(splits[self.split].modality_shapes)

  def split_named(self, split: str, field: str) -> str:
    """`split`, checked to be one of the splits (ValueError naming `field`)."""
    if split not in self.splits:
      raise ValueError(f"{field}: expected one of {sorted(self.splits)}, got {split!r}")
    return split

  @functools.cached_property
  def data(self) -> data_lib.Dataset:
    """The evaluated split in memory (its first `max_examples`), loaded on first use
    (ValueError naming the modality for a NaN / Inf input)."""
    data = data_lib.in_memory(self.splits[self.split], self.max_examples)
    checks.check_finite_inputs(data.inputs)
    return data

  def box_bounds(self, box: bool) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """Box constraints (normalised space) of the split's bounded modalities when
    `box`, else None."""
    if not box:
      return None
    return {m: self.data.normalized_range(m) for m in self.data.value_range
            if m in self.data.inputs}

  def run(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    """The metrics of `variables` (a dict of numbers, lists and dicts), of the
    defended classifier when there is a `defence`."""
    return self.measure(self.defence.prepare(variables) if self.defence else variables, progress)

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    """The metrics of what `self.apply_fn` computes with `variables`."""
    raise NotImplementedError
