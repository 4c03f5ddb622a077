"""Robustness evaluation suite over a dataset split (pure: returns plain dicts).

What it measures (CRMT, Yang et al., ICLR 2024, Sec. 4 / Tables 1-2 / Fig. 1
and 4; MUROAN, Vishwamitra et al. 2021):

* clean accuracy;
* robust accuracy against l2 FGM (cross-entropy, as in the paper) and l2-PGD
  (the chosen protocol) over an eps grid, for the multi-modal attack (all
  modalities, joint budget; scope "multi") and for each uni-modal attack
  (scope = the modality name);
* accuracy with each modality missing (replaced by a fill);
* the decoupling (l0) attack's success rate against the fraction of input
  entries it may change (jointly over modalities, or within one).

Definitions. An example is *robust* at eps when it is classified correctly
both clean and under the attack, so robust accuracy <= clean accuracy; NaN/Inf
logits (clean or attacked) count as a misclassification. Every
attack at a smaller eps (or l0 budget) is also a valid attack at a larger one,
so for PGD and the decoupling attack the reported curve is the per-example
worst case over the grid points up to eps (`accuracy`, monotone in eps by
construction). PGD attacks only the examples still undecided (robust so far,
and not certified: given sound certified radii, an example whose radius
exceeds eps cannot be broken at eps), which makes large-eps grids cheap; the
decoupling attack's independent per-eps numbers are kept as `asr_raw`. FGM is
reported per eps as is (its known non-monotonicity is part of what it
measures). The attack success rate (ASR) is the fraction of clean-correct
examples that the attack makes misclassified.

One class per kind of measurement (`CleanAccuracy`, `AttackCurves` for FGM
and PGD, `MissingModality`, `DecouplingCurves`, and `StrengthSweep`) holds its
jitted function: each compiles once per instance and (scope, fill or step
count); eps / budgets and the variables are traced arguments, so an instance
reruns on new variables (e.g. inside training, `mmsafe.eval.evaluators`)
without recompiling. `evaluate_robustness` composes them. The iterative attacks
(PGD, decoupling) loop with the strategy `loop` (`mmsafe.attacks.engine`):
"auto" is a host loop over attack steps compiled once per instance on XLA:CPU
(several times faster there than a compiled loop), the whole attack jitted
with `lax` loops elsewhere.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe import checks
from mmsafe.attacks import common
from mmsafe.attacks import engine
from mmsafe.attacks.decoupling import budget as decoupling_budget
from mmsafe.attacks.pgd import PGDProtocol, get_protocol
from mmsafe.data.pipeline import eval_batches

Array = jax.Array
ApplyFn = Callable[[Any, Mapping[str, Array]], Array]
Progress = Callable[[int], None] | None
MULTI = "multi"  # scope name of the multi-modal (all modalities, joint budget) attacks
# A certified radius decides an example robust at eps only when it exceeds eps by
# more than this relative margin (float32 rounding of the margins and constants).
CERTIFIED_SLACK = 1e-4
ATTACK_KINDS = ("fgm", "pgd")
# Each kind draws its randomness from the suite seed with its own index folded in.
_KIND_INDEX = {"clean": 0, "fgm": 1, "pgd": 2, "missing": 3, "decoupling": 4, "sweep": 5}


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
  """What `evaluate_robustness` runs.

  Attributes:
    protocol: a `PGDProtocol` or preset name (`mmsafe.attacks.PROTOCOLS`);
      its `multi_eps` / `uni_eps` (the paper's 0.5 / 1.0) are added to the
      grids and reported as the headline numbers.
    multi_eps: eps grid of the multi-modal attacks (joint l2, normalised space).
    uni_eps: eps grid of the uni-modal attacks.
    uni_extra_eps: optional modality -> radii added to that modality's grid
      only (e.g. budgets calibrated per modality).
    attacks: subset of ("fgm", "pgd").
    uni_modalities: modalities attacked alone (None: each of them; () none).
    missing_fills: fills for the missing-modality evaluation ("zeros",
      "mean", "noise"; see `attacks.drop_modality`), () to skip.
    decoupling_fractions: fractions of input entries the decoupling attack
      may change, () to skip.
    decoupling_scopes: "multi" (all modalities jointly) and/or modality names.
    decoupling: keyword arguments of `attacks.decoupling` (rounds,
      steps_per_round, max_change, step_size, loss, random_start).
    batch_size: examples per compiled call.
    seed: base seed of the attacks' randomness.
    per_example: also return which examples each measurement finds correct
      or robust (`encode_flags`), for statistics over test examples.
  """

  protocol: str | PGDProtocol = "default"
  multi_eps: Sequence[float] = (0.125, 0.25, 0.5, 1.0)
  uni_eps: Sequence[float] = (0.25, 0.5, 1.0, 2.0)
  uni_extra_eps: Mapping[str, Sequence[float]] | None = None
  attacks: Sequence[str] = ATTACK_KINDS
  uni_modalities: Sequence[str] | None = None
  missing_fills: Sequence[str] = ("zeros",)
  decoupling_fractions: Sequence[float] = (0.0025, 0.005, 0.0116, 0.025, 0.05)
  decoupling_scopes: Sequence[str] = (MULTI,)
  decoupling: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  batch_size: int = 256
  seed: int = 0
  per_example: bool = False


@dataclasses.dataclass(frozen=True)
class Task:
  """One evaluation task, run once over every batch of the split."""

  kind: str  # "clean" | "fgm" | "pgd" | "missing" | "decoupling"
  scope: str  # MULTI or a modality name ("" for clean)
  value: Any = None  # eps, fill or (fraction, count)


def eps_grid(values: Sequence[float], must_have: float, name: str) -> tuple[float, ...]:
  """The sorted positive values of `values` plus `must_have` (a protocol's budget)."""
  grid = sorted({float(v) for v in values} | {float(must_have)})
  for v in grid:
    if not np.isfinite(v) or v < 0:
      raise ValueError(f"{name}: expected finite values >= 0, got {v}")
  return tuple(v for v in grid if v > 0)


def encode_flags(flags: np.ndarray) -> str:
  """bool [N] as a hex string of its packed bits (compact in JSON; `decode_flags`)."""
  return np.packbits(np.asarray(flags, bool)).tobytes().hex()


def decode_flags(text: str, num_examples: int) -> np.ndarray:
  """The bool [num_examples] that `encode_flags` encoded."""
  packed = np.frombuffer(bytes.fromhex(text), np.uint8)
  if packed.size != -(-num_examples // 8):
    raise ValueError(f"flags: expected {-(-num_examples // 8)} bytes for {num_examples} "
                     f"examples, got {packed.size}")
  return np.unpackbits(packed)[:num_examples].astype(bool)


def balanced_batch_size(num_examples: int, batch_size: int) -> int:
  """The size of the fewest equal batches of at most `batch_size` covering
  `num_examples` (the last one padded by fewer rows than there are batches)."""
  num_batches = math.ceil(num_examples / max(min(batch_size, num_examples), 1))
  return math.ceil(num_examples / max(num_batches, 1))


def over_batches(fn: Callable, variables: Any, inputs: Mapping[str, np.ndarray],
                 labels: np.ndarray, *, batch_size: int, key: Array, value: Any = 0.0,
                 progress: Progress = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs `fn(variables, inputs, labels, key, value) -> (bad [B], extra [B])` over
  batches of a split (batch i gets `fold_in(key, i)`), calling `progress(1)`
  after each. The split is cut into the fewest batches of at most
  `batch_size`, all of one size (`balanced_batch_size`): one compilation per
  program, and at most one padded row per batch (400 examples in batches of
  at most 256: two batches of 200, not 256 + 144 with two compilations, nor
  512 rows).

  Returns:
    (bad bool [N], extra float64 [N]) of the real examples.
  """
  return _over(fn, variables, eval_batches(
      inputs, labels, batch_size=balanced_batch_size(len(labels), batch_size)),
               key=key, value=value, progress=progress)


def _over(fn: Callable, variables: Any, batches, *, key: Array, value: Any,
          progress: Progress = None) -> tuple[np.ndarray, np.ndarray]:
  """`over_batches` on the given batches (each with its `"valid"` rows first)."""
  bad_parts, extra_parts = [], []
  for index, batch in enumerate(batches):
    size = int(batch["valid"].sum())  # the real examples come first
    bad, extra = fn(variables, batch["inputs"], jnp.asarray(batch["label"], jnp.int32),
                    jax.random.fold_in(key, index), value)
    bad_parts.append(np.asarray(bad)[:size])
    extra_parts.append(np.asarray(extra, np.float64)[:size])
    if progress is not None:
      progress(1)
  return np.concatenate(bad_parts), np.concatenate(extra_parts)


def subset_batch_size(num_rows: int, full_batch_size: int) -> int:
  """The batch size for `num_rows` examples of a split batched by `full_batch_size`
  (`balanced_batch_size` of the whole split): the smallest of `full_batch_size`,
  its halves, quarters, ... (down to 8 rows) that covers the rows in as few
  batches as `full_batch_size` does. Subsets of any size then compile for a
  handful of shapes, and at most half of a batch is padding."""
  num_batches = math.ceil(num_rows / full_batch_size)
  needed = math.ceil(num_rows / max(num_batches, 1))
  size = full_batch_size
  while math.ceil(size / 2) >= max(needed, 8):
    size = math.ceil(size / 2)
  return size


def over_rows(fn: Callable, variables: Any, inputs: Mapping[str, np.ndarray],
              labels: np.ndarray, rows: np.ndarray, *, batch_size: int, key: Array,
              value: Any = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """`over_batches` on the examples `rows` (int indices) of a split batched by
  `batch_size`, in batches of `subset_batch_size`.

  Returns:
    (bad bool [len(rows)], extra float64 [len(rows)]).
  """
  if len(rows) == 0:
    return np.zeros(0, bool), np.zeros(0, np.float64)
  size = subset_batch_size(len(rows), balanced_batch_size(len(labels), batch_size))
  return _over(fn, variables, eval_batches({m: x[rows] for m, x in inputs.items()},
                                           labels[rows], batch_size=size),
               key=key, value=value)


def _wrong(apply_fn: ApplyFn, variables: Any, inputs: Mapping[str, Array], labels: Array
           ) -> Array:
  """bool [B]: misclassified, or with NaN/Inf logits (`common.misclassified`)."""
  return common.misclassified(apply_fn(variables, inputs), labels)


def _clean_flags(apply_fn: ApplyFn, variables: Any, inputs: Mapping[str, Array], labels: Array
                 ) -> tuple[Array, Array]:
  """(misclassified [B] as `_wrong`, non-finite [B]: some logit is NaN/Inf), one
  forward pass."""
  logits = apply_fn(variables, inputs)
  return common.misclassified(logits, labels), ~jnp.all(jnp.isfinite(logits), axis=-1)


class _Kind:
  """What the per-kind classes share: the apply function, batch size, key, loop
  strategy of the iterative attacks, their `tasks`, `_compile` and `_run`
  (task number `index` of the kind over a split)."""

  kind = ""
  bounds: common.Bounds | None = None  # box constraints of the attacks, read when tracing
  iterative = False  # whether `_attack` loops (and takes `loop`)

  def __init__(self, apply_fn: ApplyFn, *, batch_size: int, seed: int, loop: str = "auto"):
    if batch_size < 1:
      raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    self.apply_fn = apply_fn
    self.batch_size = int(batch_size)
    self.seed = int(seed)
    self.loop = engine.resolve(loop) if self.iterative else "scan"
    self.tasks: list[Task] = []

  def _compile(self, fn: Callable, static_argnames: str | Sequence[str]) -> Callable:
    """`fn(..., loop)` with the instance's strategy: called as is around the host
    loops of the attacks ("python": their steps compile once per apply function,
    static options and batch shape), or jitted whole (traced loops); both take
    the variables and eps / budgets as arrays (no recompilation per call)."""
    fn = functools.partial(fn, loop=self.loop)
    return fn if self.loop == "python" else jax.jit(fn, static_argnames=static_argnames)

  def _task_key(self, index: int) -> Array:
    """The key of task number `index` of this kind (the suite seed, the kind's
    index and the task's folded in)."""
    key = jax.random.fold_in(jax.random.PRNGKey(self.seed), _KIND_INDEX[self.kind])
    return jax.random.fold_in(key, index)

  def _run(self, fn: Callable, index: int, variables: Any, inputs, labels, value: Any,
           progress: Progress) -> tuple[np.ndarray, np.ndarray]:
    return over_batches(fn, variables, inputs, labels, batch_size=self.batch_size,
                        key=self._task_key(index), value=value, progress=progress)


class CleanAccuracy(_Kind):
  """Which examples the model classifies correctly (no perturbation); an example
  with NaN/Inf logits never is."""

  kind = "clean"

  def __init__(self, apply_fn: ApplyFn, *, batch_size: int = 256, seed: int = 0):
    super().__init__(apply_fn, batch_size=batch_size, seed=seed)
    self.tasks = [Task("clean", "")]
    self._fn = jax.jit(lambda variables, inputs, labels, key, value: _clean_flags(
        apply_fn, variables, inputs, labels))

  def __call__(self, variables: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
               progress: Progress = None, *, with_non_finite: bool = False
               ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """bool [N]: correctly classified; with `with_non_finite`, also bool [N]: the
    logits hold a NaN/Inf (such an example counts as misclassified)."""
    wrong, non_finite = self._run(self._fn, 0, variables, inputs, labels, jnp.float32(0.0),
                                  progress)
    return (~wrong, non_finite > 0) if with_non_finite else ~wrong


class _AttackCurves(_Kind):
  """Robust accuracy against an l2 attack over eps grids, one grid per scope.

  Args:
    grids: scope (MULTI or a modality name) -> eps values (> 0).
    protocol: the PGD protocol; its multi_eps / uni_eps name the headline entries.
    bounds: optional box constraints, modality -> (low, high) (normalised space).
    loop: loop strategy of PGD (`mmsafe.attacks.engine.LOOPS`).
  """

  static_argnames: tuple[str, ...] = ("scope",)  # of `_attack`, besides `loop`

  def __init__(self, apply_fn: ApplyFn, grids: Mapping[str, Sequence[float]], *,
               protocol: str | PGDProtocol = "default", bounds: common.Bounds | None = None,
               batch_size: int = 256, seed: int = 0, loop: str = "auto"):
    super().__init__(apply_fn, batch_size=batch_size, seed=seed, loop=loop)
    self.protocol = get_protocol(protocol)
    self.grids = {scope: tuple(sorted(float(e) for e in eps)) for scope, eps in grids.items()}
    self.tasks = [Task(self.kind, s, eps) for s, grid in self.grids.items() for eps in grid]
    self.bounds = bounds
    self._fn = self._compile(self._attack, self.static_argnames)

  def _attack(self, variables, inputs, labels, key, eps, scope, loop):
    raise NotImplementedError

  def _curve(self, variables, inputs, labels, correct, scope: str, grid: Sequence[float],
             first_index: int, progress: Progress, certified_radius: np.ndarray | None
             ) -> tuple[list[np.ndarray], dict[str, Any]]:
    """(robust bool [N] per eps, extra curve entries) of one scope; task numbers
    start at `first_index`; `certified_radius` [N]: the scope's sound certified
    radii, or None."""
    raise NotImplementedError

  def __call__(self, variables: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
               correct: np.ndarray, progress: Progress = None, *,
               certified: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """{"curves": {kind: {scope: curve}}, "headline": {"<kind>/<scope>@<eps>": accuracy},
    "per_example": {kind: {scope: [robust flags per eps]}}} for the clean-correct
    mask `correct` [N] (see `evaluate_robustness`); `certified`: scope -> [N]
    sound certified radii (see `PGDCurves`)."""
    curves, headline, flags, index = {}, {}, {}, 0
    for scope, grid in self.grids.items():
      radius = None if certified is None else _checked_radius(certified, scope, len(labels))
      robust, extra = self._curve(variables, inputs, labels, correct, scope, grid, index,
                                  progress, radius)
      index += len(grid)
      curves[scope] = {"modalities": sorted(inputs) if scope == MULTI else [scope],
                       "eps": list(grid), "accuracy": [float(r.mean()) for r in robust],
                       **extra}
      flags[scope] = [encode_flags(r) for r in robust]
      target = self.protocol.multi_eps if scope == MULTI else self.protocol.uni_eps
      if target in grid:
        headline[f"{self.kind}/{scope}@{target}"] = curves[scope]["accuracy"][grid.index(target)]
    return {"curves": {self.kind: curves}, "headline": headline,
            "per_example": {self.kind: flags}}


class FGMCurves(_AttackCurves):
  """Robust accuracy against l2 FGM (cross-entropy, as in CRMT Sec. 4), per eps as is
  (`mean_norm` is None)."""

  kind = "fgm"

  def _attack(self, variables, inputs, labels, key, eps, scope, loop):
    del key, loop  # one step: nothing to loop
    adversarial = attacks.fgm(lambda x: self.apply_fn(variables, x), inputs, labels, eps=eps,
                              modalities=None if scope == MULTI else scope, bounds=self.bounds,
                              loss="ce")
    return _wrong(self.apply_fn, variables, adversarial, labels), jnp.zeros(labels.shape)

  def _curve(self, variables, inputs, labels, correct, scope, grid, first_index, progress,
             certified_radius):
    del certified_radius  # one gradient per example: nothing worth skipping
    robust = [correct & ~self._run(functools.partial(self._fn, scope=scope), first_index + i,
                                   variables, inputs, labels, jnp.float32(eps), progress)[0]
              for i, eps in enumerate(grid)]
    return robust, {"mean_norm": None}


class PGDCurves(_AttackCurves):
  """Robust accuracy against l2-PGD (the protocol's strength): per example, the
  worst case over the grid up to each eps and over the protocol's losses.

  Only undecided examples are attacked: one misclassified clean, broken at a
  smaller eps, or broken by an earlier loss or restart at this eps is not
  robust at this eps whatever a further attack finds, so it is skipped; and
  given sound certified radii (`certified`), one whose radius exceeds eps (by
  `CERTIFIED_SLACK`) is robust at eps whatever any attack tries, so it is
  skipped too. Each restart runs on its own (`pgd(restarts=1,
  restart_offset=r)`) on the remaining examples, batched by `over_rows`. The
  `accuracy` curve is the one attacking every example at every eps with every
  loss and restart would give (up to the random starts, which depend on the
  batch). `mean_norm` is the mean, over the clean-correct examples, of the l2
  norm of the perturbation found within each eps (for an example broken
  earlier, the one that broke it); `num_certified` counts the clean-correct
  examples certified at each eps (None without `certified`).
  """

  kind = "pgd"
  iterative = True
  static_argnames = ("scope", "loss")

  def _attack(self, variables, inputs, labels, key, value, scope, loss, loop):
    """Restart `r` of the protocol's attack with `loss` at radius `eps`, for
    `value = (eps, r)`."""
    eps, restart = value
    kwargs = dict(self.protocol.pgd_kwargs(eps, loss), restarts=1, restart_offset=restart)
    _, info = attacks.pgd(jax.tree_util.Partial(self.apply_fn, variables), inputs, labels, key,
                          modalities=None if scope == MULTI else scope, bounds=self.bounds,
                          return_info=True, loop=loop, **kwargs)
    return info["misclassified"], info["norm"]

  def _curve(self, variables, inputs, labels, correct, scope, grid, first_index, progress,
             certified_radius):
    batches = math.ceil(len(labels) / balanced_batch_size(len(labels), self.batch_size))
    broken, norm = ~correct, np.zeros(len(labels))
    robust, norms, num_certified = [], [], []
    for i, eps in enumerate(grid):
      certified = np.zeros(len(labels), bool)
      if certified_radius is not None:
        certified = certified_radius > eps * (1 + CERTIFIED_SLACK)
        num_certified.append(int((correct & certified).sum()))
      for loss in self.protocol.losses:
        for restart in range(self.protocol.restarts):
          rows = np.flatnonzero(~broken & ~certified)
          broken[rows], norm[rows] = over_rows(
              functools.partial(self._fn, scope=scope, loss=loss), variables, inputs, labels,
              rows, batch_size=self.batch_size, key=self._task_key(first_index + i),
              value=(jnp.float32(eps), jnp.int32(restart)))
      if progress is not None:
        progress(batches)
      robust.append(correct & ~broken)
      norms.append(float(norm[correct].mean()) if correct.any() else 0.0)
    return robust, {"mean_norm": norms,
                    "num_certified": None if certified_radius is None else num_certified}


def _checked_radius(certified: Mapping[str, np.ndarray], scope: str, n: int) -> np.ndarray:
  """`certified[scope]` as float64 [n] (ValueError naming the scope otherwise)."""
  if scope not in certified:
    raise ValueError(f"certified: expected radii for scope {scope!r}, got scopes "
                     f"{sorted(certified)}")
  radius = np.asarray(certified[scope], np.float64)
  if radius.shape != (n,):
    raise ValueError(f"certified[{scope!r}]: expected shape ({n},) (one radius per example), "
                     f"got {radius.shape}")
  if np.isnan(radius).any():
    raise ValueError(f"certified[{scope!r}]: expected radii, got {int(np.isnan(radius).sum())} "
                     f"NaN")
  return radius


ATTACK_CURVES = {"fgm": FGMCurves, "pgd": PGDCurves}


class MissingModality(_Kind):
  """Accuracy with each modality missing (replaced by a fill, `attacks.drop_modality`).

  Args:
    modalities: the modalities dropped, one at a time.
    fills: subset of `attacks.FILLS`; the first names the headline entries.
    fill_means: modality -> per-entry mean (normalised space), for the "mean"
      fill and the centre of the "noise" fill.
  """

  kind = "missing"

  def __init__(self, apply_fn: ApplyFn, modalities: Sequence[str], fills: Sequence[str], *,
               fill_means: Mapping[str, Any] | None = None, batch_size: int = 256,
               seed: int = 0):
    super().__init__(apply_fn, batch_size=batch_size, seed=seed)
    for fill in fills:
      if fill not in attacks.FILLS:
        raise ValueError(f"missing_fills: expected values in {list(attacks.FILLS)}, "
                         f"got {fill!r}")
    self.fills = tuple(fills)
    self.fill_means = dict(fill_means or {})
    self.tasks = [Task("missing", m, fill) for m in modalities for fill in self.fills]
    self._fn = jax.jit(self._drop, static_argnames=("modality", "fill"))

  def _drop(self, variables, inputs, labels, key, value, modality, fill):
    del value
    dropped = attacks.drop_modality(inputs, modality, fill, key=key,
                                    mean=self.fill_means.get(modality))
    return _wrong(self.apply_fn, variables, dropped, labels), jnp.zeros(labels.shape)

  def __call__(self, variables: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
               correct: np.ndarray | None = None, progress: Progress = None) -> dict[str, Any]:
    """{"missing": {modality: {fill: accuracy}}, "headline": {"missing/<m>": accuracy},
    "per_example": {"missing": {modality: {fill: correct flags}}}}."""
    del correct  # accuracy without a modality is not conditioned on the clean result
    missing, headline, flags = {}, {}, {}
    for index, task in enumerate(self.tasks):
      fn = functools.partial(self._fn, modality=task.scope, fill=task.value)
      wrong, _ = self._run(fn, index, variables, inputs, labels, jnp.float32(0.0), progress)
      missing.setdefault(task.scope, {})[task.value] = float((~wrong).mean())
      flags.setdefault(task.scope, {})[task.value] = encode_flags(~wrong)
      if task.value == self.fills[0]:
        headline[f"missing/{task.scope}"] = missing[task.scope][task.value]
    return {"missing": missing, "headline": headline, "per_example": {"missing": flags}}


class DecouplingCurves(_Kind):
  """Success rate of the decoupling (l0, MUROAN) attack against the fraction of
  input entries it may change, worst case over the budgets up to each fraction.

  Args:
    input_shapes: modality -> one example's shape.
    fractions: fractions of the scope's entries the attack may change.
    scopes: MULTI (all modalities jointly) and/or modality names.
    options: keyword arguments of `attacks.decoupling` (rounds, steps_per_round,
      max_change, step_size, loss, random_start).
    loop: loop strategy of the attack (`mmsafe.attacks.engine.LOOPS`).
  """

  kind = "decoupling"
  iterative = True

  def __init__(self, apply_fn: ApplyFn, input_shapes: Mapping[str, Sequence[int]],
               fractions: Sequence[float], scopes: Sequence[str] = (MULTI,), *,
               options: Mapping[str, Any] | None = None, bounds: common.Bounds | None = None,
               batch_size: int = 256, seed: int = 0, loop: str = "auto"):
    super().__init__(apply_fn, batch_size=batch_size, seed=seed, loop=loop)
    modalities = sorted(input_shapes)
    zeros = {m: jnp.zeros((1, *s)) for m, s in input_shapes.items()}
    self.num_entries, self.max_count = {}, {}
    for scope in scopes:
      if scope != MULTI and scope not in input_shapes:
        raise ValueError(f"decoupling_scopes: expected {MULTI!r} or one of {modalities}, "
                         f"got {scope!r}")
      attacked = None if scope == MULTI else scope
      for fraction in sorted({float(f) for f in fractions}):
        count, self.num_entries[scope] = decoupling_budget(zeros, fraction, attacked)
        self.tasks.append(Task("decoupling", scope, (fraction, count)))
        self.max_count[scope] = max(self.max_count.get(scope, 0), count)
    self.options = dict(options or {})
    self.bounds = self.options.pop("bounds", bounds)
    self._fn = self._compile(self._attack, "scope")

  def _attack(self, variables, inputs, labels, key, count, scope, loop):
    _, info = attacks.decoupling(jax.tree_util.Partial(self.apply_fn, variables), inputs, labels,
                                 key, modalities=None if scope == MULTI else scope, count=count,
                                 max_count=self.max_count[scope], bounds=self.bounds,
                                 return_info=True, loop=loop, **self.options)
    return info["misclassified"], info["fraction_changed"]

  def __call__(self, variables: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
               correct: np.ndarray, progress: Progress = None) -> dict[str, Any]:
    """{"decoupling": {scope: {"modalities", "fraction", "count", "num_entries", "asr",
    "asr_raw", "accuracy", "mean_fraction_changed"}}} (ASR over clean-correct examples)."""
    num_correct = max(int(correct.sum()), 1)
    curves = {}
    for scope in self.max_count:
      indexed = [(i, t) for i, t in enumerate(self.tasks) if t.scope == scope]
      success_raw, changed = [], []
      for index, task in indexed:
        wrong, extra = self._run(functools.partial(self._fn, scope=scope), index, variables,
                                 inputs, labels, jnp.int32(task.value[1]), progress)
        success_raw.append(correct & wrong)
        changed.append(float(extra.mean()))
      success = np.logical_or.accumulate(np.stack(success_raw), axis=0)
      curves[scope] = {
          "modalities": sorted(inputs) if scope == MULTI else [scope],
          "fraction": [t.value[0] for _, t in indexed],
          "count": [int(t.value[1]) for _, t in indexed],
          "num_entries": int(self.num_entries[scope]),
          "asr": [float(s.sum() / num_correct) for s in success],
          "asr_raw": [float(s.sum() / num_correct) for s in success_raw],
          "accuracy": [float((correct & ~s).mean()) for s in success],
          "mean_fraction_changed": changed}
    return {"decoupling": curves}


def suite(apply_fn: ApplyFn | None, config: SuiteConfig,
          input_shapes: Mapping[str, Sequence[int]], *, bounds: common.Bounds | None = None,
          fill_means: Mapping[str, Any] | None = None) -> list[_Kind]:
  """The per-kind evaluations of `config`, in order: `CleanAccuracy`, the attack
  curves, `MissingModality`, `DecouplingCurves` (validates `config`)."""
  protocol = get_protocol(config.protocol)
  modalities = sorted(input_shapes)
  unknown_kinds = sorted(set(config.attacks) - set(ATTACK_KINDS))
  if unknown_kinds:
    raise ValueError(f"attacks: expected a subset of {list(ATTACK_KINDS)}, got {unknown_kinds}")
  uni = ()
  if config.uni_modalities is None or tuple(config.uni_modalities):
    uni = checks.select_modalities(config.uni_modalities, modalities, field="uni_modalities")
  grids = {MULTI: eps_grid(config.multi_eps, protocol.multi_eps, "multi_eps")}
  extra = dict(config.uni_extra_eps or {})
  unknown = sorted(set(extra) - set(modalities))
  if unknown:
    raise ValueError(f"uni_extra_eps: expected modalities among {modalities}, got {unknown}")
  grids.update({m: eps_grid(tuple(config.uni_eps) + tuple(extra.get(m, ())), protocol.uni_eps,
                            "uni_eps") for m in uni})
  shared = {"batch_size": config.batch_size, "seed": config.seed}
  parts: list[_Kind] = [CleanAccuracy(apply_fn, **shared)]
  parts += [ATTACK_CURVES[kind](apply_fn, grids, protocol=protocol, bounds=bounds, **shared)
            for kind in ATTACK_KINDS if kind in config.attacks]
  parts.append(MissingModality(apply_fn, modalities, config.missing_fills,
                               fill_means=fill_means, **shared))
  parts.append(DecouplingCurves(apply_fn, input_shapes, config.decoupling_fractions,
                                config.decoupling_scopes, options=config.decoupling,
                                bounds=bounds, **shared))
  return parts


def tasks(config: SuiteConfig, input_shapes: Mapping[str, Sequence[int]]) -> list[Task]:
  """The evaluation tasks of `config` (each runs once over every batch)."""
  return [task for part in suite(None, config, input_shapes) for task in part.tasks]


def num_work_units(config: SuiteConfig, input_shapes: Mapping[str, tuple[int, ...]],
                   num_examples: int) -> int:
  """Number of `progress` calls `evaluate_robustness` makes (tasks x batches)."""
  batches = -(-num_examples // config.batch_size)
  return len(tasks(config, input_shapes)) * batches


def _check_split(inputs: Mapping[str, np.ndarray], labels: np.ndarray) -> int:
  """The number of examples N of a split, checked: N >= 1 for labels and every
  modality, finite inputs (when concrete)."""
  n = int(labels.shape[0])
  if n == 0:
    raise ValueError("labels: expected at least one example, got 0")
  for m, x in inputs.items():
    if np.shape(x)[0] != n:
      raise ValueError(f"inputs[{m!r}]: expected {n} examples (as labels), got {np.shape(x)[0]}")
  checks.check_finite_inputs(inputs)
  return n


def suite_settings(config: SuiteConfig, num_examples: int,
                   bounds: common.Bounds | None) -> dict[str, Any]:
  """The "config" entry of `evaluate_robustness`'s results (grids and settings)."""
  protocol = get_protocol(config.protocol)
  return {"multi_eps": list(eps_grid(config.multi_eps, protocol.multi_eps, "multi_eps")),
          "uni_eps": list(eps_grid(config.uni_eps, protocol.uni_eps, "uni_eps")),
          "uni_extra_eps": {m: sorted(float(e) for e in v)
                            for m, v in dict(config.uni_extra_eps or {}).items()},
          "attacks": list(config.attacks), "missing_fills": list(config.missing_fills),
          "decoupling_fractions": sorted(float(f) for f in config.decoupling_fractions),
          "decoupling_scopes": list(config.decoupling_scopes),
          "decoupling": {k: v for k, v in dict(config.decoupling).items()
                         if isinstance(v, (int, float, str, bool))},
          "batch_size": min(config.batch_size, num_examples), "seed": config.seed,
          "box_constraints": sorted(bounds) if bounds else []}


def evaluate_robustness(apply_fn: ApplyFn, variables: Any, inputs: Mapping[str, np.ndarray],
                        labels: np.ndarray, config: SuiteConfig = SuiteConfig(), *,
                        bounds: common.Bounds | None = None,
                        fill_means: Mapping[str, Any] | None = None,
                        certified: Mapping[str, np.ndarray] | None = None,
                        progress: Progress = None) -> dict[str, Any]:
  """Runs the suite on a whole split; see the module docstring for definitions.

  Args:
    apply_fn: `(variables, inputs) -> fused logits [B, K]` in inference mode,
      e.g. `logits_apply(model)`.
    variables: the model variables.
    inputs: modality -> float32 [N, ...] (normalised, e.g. `Dataset.inputs`).
    labels: int [N].
    config: what to run.
    bounds: optional box constraints for the attacks, modality -> (low, high)
      in normalised space (e.g. `Dataset.normalized_range(m)`).
    fill_means: modality -> per-entry mean (one example's shape, normalised
      space; e.g. the training split's mean), needed by the "mean" fill and
      used as the centre of the "noise" fill.
    certified: optional scope ("multi" and each attacked modality) -> [N]
      sound certified radii of the evaluated classifier (`mmsafe.certify`,
      kind "sound": `radius` and `per_modality`); PGD does not attack an
      example at an eps its radius exceeds. Results are unchanged: such an
      example cannot be broken there.
    progress: called with the number of (task, batch) units done (e.g.
      `tqdm.update`; PGD reports each eps's batches at once); `num_work_units`
      gives the total.

  Returns:
    A dict of plain Python numbers and lists:
      "num_examples", "clean_accuracy", "num_non_finite" (examples whose clean
      logits hold a NaN/Inf: counted as misclassified, and so never robust
      under any attack), "protocol" (the PGD protocol),
      "config" (grids), "headline" (the paper's table entries: clean,
      "fgm/multi@0.5", "pgd/multi@0.5", "fgm/<m>@1.0", "pgd/<m>@1.0",
      "missing/<m>"), "curves" ({kind: {scope: {"modalities", "eps",
      "accuracy", "mean_norm"; PGD also "num_certified"}}}), "missing" ({m: {fill:
      accuracy}}) and "decoupling" ({scope: {"fraction", "count",
      "num_entries", "asr", "asr_raw", "accuracy", "mean_fraction_changed"}}).
      With `config.per_example`, also "per_example": which examples are correct
      clean ("clean"), robust at each eps ({kind: {scope: [flags per eps]}}) and
      correct without each modality ({"missing": {m: {fill: flags}}}), each a
      bool [N] as `encode_flags` writes it.
  """
  labels = np.asarray(labels)
  _check_split(inputs, labels)
  input_shapes = {m: tuple(np.shape(x)[1:]) for m, x in inputs.items()}
  clean, *parts = suite(apply_fn, config, input_shapes, bounds=bounds, fill_means=fill_means)
  if "mean" in config.missing_fills:
    lacking = sorted(set(input_shapes) - set(fill_means or {}))
    if lacking:
      raise ValueError(f"fill_means: expected a mean for every modality with fill 'mean', "
                       f"missing {lacking}")
  return run_suite([clean, *parts], config, variables, inputs, labels, bounds=bounds,
                   certified=certified, progress=progress)


def run_suite(parts: Sequence[_Kind], config: SuiteConfig, variables: Any,
              inputs: Mapping[str, np.ndarray], labels: np.ndarray, *,
              bounds: common.Bounds | None = None,
              certified: Mapping[str, np.ndarray] | None = None,
              progress: Progress = None) -> dict[str, Any]:
  """Runs the per-kind evaluations `parts` of `suite(..., config, ...)` and
  assembles the results dict of `evaluate_robustness` (`certified`: see there)."""
  labels = np.asarray(labels)
  n = _check_split(inputs, labels)
  clean, *others = parts
  correct, non_finite = clean(variables, inputs, labels, progress, with_non_finite=True)
  results: dict[str, Any] = {
      "num_examples": n, "clean_accuracy": float(correct.mean()),
      "num_non_finite": int(non_finite.sum()),
      "protocol": get_protocol(config.protocol).to_dict(),
      "config": suite_settings(config, n, bounds), "curves": {}, "missing": {},
      "decoupling": {}, "headline": {"clean": float(correct.mean())},
      "per_example": {"clean": encode_flags(correct)}}
  for part in others:
    skip = {"certified": certified} if isinstance(part, PGDCurves) else {}
    for key, section in part(variables, inputs, labels, correct, progress, **skip).items():
      results[key].update(section)
  if not config.per_example:
    del results["per_example"]
  return results


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
  """`(variables, inputs) -> logits` of a `mmsafe.models` model in inference mode
  (equal, and so sharing compiled programs, for equal models)."""
  return _LogitsApply(model)


class StrengthSweep(_Kind):
  """Robust accuracy of l2-PGD over a steps x restarts grid: evidence that an
  attack protocol has converged (more steps/restarts no longer lower it).

  For each step count, `max(restarts)` independent runs are made (step size
  2.5 eps / steps, worst iterate kept; run 0 starts at the clean input unless
  `random_start`, the others at random points of the ball); the result for R
  restarts is the per-example worst case over the first R runs (an example
  counts as broken when any of them misclassifies it), which is what
  `pgd(..., restarts=R, random_start=random_start)` computes (with its own keys).
  Compiles once per (scope, step count) and instance.

  Args:
    budgets: (scope, eps) pairs; scope "multi" or one of `modalities`.
    steps, restarts: the grids.
    loop: loop strategy of PGD (`mmsafe.attacks.engine.LOOPS`).
  """

  kind = "sweep"
  iterative = True

  def __init__(self, apply_fn: ApplyFn, budgets: Sequence[tuple[str, float]], *,
               modalities: Sequence[str], steps: Sequence[int] = (4, 10, 20, 50, 100),
               restarts: Sequence[int] = (1, 3, 5), loss: str = "ce",
               random_start: bool = False, batch_size: int = 256, seed: int = 0,
               loop: str = "auto"):
    super().__init__(apply_fn, batch_size=batch_size, seed=seed, loop=loop)
    for scope, eps in budgets:
      if scope != MULTI and scope not in modalities:
        raise ValueError(f"budgets: expected scope {MULTI!r} or one of {sorted(modalities)}, "
                         f"got {scope!r}")
      if not eps >= 0:
        raise ValueError(f"budgets: expected eps >= 0, got {eps!r} for {scope!r}")
    self.budgets = [(scope, float(eps)) for scope, eps in budgets]
    self.restarts = sorted({int(r) for r in restarts})
    self.steps = sorted({int(s) for s in steps})
    if not self.restarts or self.restarts[0] < 1 or not self.steps or self.steps[0] < 1:
      raise ValueError(f"steps/restarts: expected non-empty grids of integers >= 1, got "
                       f"{self.steps}/{self.restarts}")
    self.loss, self.random_start = loss, bool(random_start)
    self._clean = CleanAccuracy(apply_fn, batch_size=batch_size, seed=seed)
    self._fn = self._compile(self._attack, ("scope", "steps", "random_start"))

  def _attack(self, variables, inputs, labels, key, eps, scope, steps, random_start, loop):
    _, info = attacks.pgd(jax.tree_util.Partial(self.apply_fn, variables), inputs, labels, key,
                          eps=eps, steps=steps, modalities=None if scope == MULTI else scope,
                          loss=self.loss, random_start=random_start, return_info=True,
                          loop=loop)
    return info["misclassified"], jnp.zeros(labels.shape)

  def _row(self, variables, inputs, labels, correct, scope: str, eps: float, steps: int,
           progress: Progress) -> list[float]:
    broken = []
    for r in range(self.restarts[-1]):
      fn = functools.partial(self._fn, scope=scope, steps=steps,
                             random_start=self.random_start or r > 0)
      broken.append(self._run(fn, r, variables, inputs, labels, jnp.float32(eps), progress)[0])
    return [float((correct & ~np.any(broken[:count], axis=0)).mean())
            for count in self.restarts]

  def __call__(self, variables: Any, inputs: Mapping[str, np.ndarray], labels: np.ndarray,
               progress: Progress = None) -> dict[str, Any]:
    """{"clean_accuracy", "num_examples", "steps", "restarts", "loss", "random_start",
    "accuracy": {"<scope>@<eps>": [[acc for R in restarts] for S in steps]}}."""
    labels = np.asarray(labels)
    correct = self._clean(variables, inputs, labels)
    table = {f"{scope}@{eps}": [self._row(variables, inputs, labels, correct, scope, eps, s,
                                          progress) for s in self.steps]
             for scope, eps in self.budgets}
    return {"clean_accuracy": float(correct.mean()), "num_examples": int(len(labels)),
            "steps": self.steps, "restarts": self.restarts, "loss": self.loss,
            "random_start": self.random_start, "accuracy": table}


def pgd_strength_sweep(apply_fn: ApplyFn, variables: Any, inputs: Mapping[str, np.ndarray],
                       labels: np.ndarray, *, budgets: Sequence[tuple[str, float]],
                       steps: Sequence[int] = (4, 10, 20, 50, 100),
                       restarts: Sequence[int] = (1, 3, 5), loss: str = "ce",
                       random_start: bool = False, batch_size: int = 256, seed: int = 0,
                       progress: Progress = None) -> dict[str, Any]:
  """`StrengthSweep` run once on a split (see there); `progress(1)` after each batch."""
  sweep = StrengthSweep(apply_fn, budgets, modalities=sorted(inputs), steps=steps,
                        restarts=restarts, loss=loss, random_start=random_start,
                        batch_size=batch_size, seed=seed)
  return sweep(variables, inputs, labels, progress)
