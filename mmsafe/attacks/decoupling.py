"""The decoupling attack (MUROAN): an l0-budgeted attack on the fusion.

Vishwamitra et al., "Understanding and Measuring Robustness of Multimodal
Learning" (arXiv:2112.12792, 2021) attack the fused decision by changing only
a small fraction of the input space (100% success at 1.16% of the input in
their worst case). This module implements an attack in that threat model (the
paper's exact procedure is not reproduced; the algorithm below is ours):

* Budget: at most `k = floor(fraction * n)` entries per example may change,
  where `n` counts the entries of the attacked modalities jointly (or of one
  modality, for `modalities="m"`). Each changed entry moves by at most
  `max_change` (normalised units) and stays inside the optional box.
* Growing support by saliency: in round `r = 1..R` the support may hold
  `k_r = ceil(k r / R)` entries. It keeps the previous support and adds the
  entries with the largest gradient magnitude `|d loss / d x_i|` at the
  current adversarial point (one `lax.top_k` of size k; entries already chosen
  are ranked first), so the set grows nested and never exceeds `k`.
* Optimisation: `steps_per_round` signed-gradient ascent steps on the support,
  `delta <- clip(delta + step_size * sign(g), -max_change, max_change)`,
  entries outside the support held at exactly zero.
* Output: per example, the worst case over all iterates (misclassified first,
  then the highest loss), like `pgd`.

Why the budget provably holds: every iterate is `where(support, ., 0)` and the
support is the scatter of `k_r <= k` *distinct* `top_k` indices; the output
keeps the clean value bit-for-bit wherever the support is off.

The search is built from pieces: `_start_round` (grow the support),
`_step` (one signed-gradient step), `_close` (the last iterate joins the worst
case) and `_finalise` (the output); `_round` and `_search` loop them with a
strategy of `engine` ("python": a host loop over the pieces compiled once, the
fast one on XLA:CPU; "scan"/"fori": one `lax` loop nest, traceable).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import numerics
from mmsafe.attacks import common
from mmsafe.attacks import engine

Array = jax.Array
# Per-example worst case so far: (delta [B, n], support [B, n], loss [B], misclassified [B]).
Best = tuple[Array, Array, Array, Array]
# The rounds' loop state: (delta, support, worst case).
Carry = tuple[Array, Array, Best]


def budget(inputs: common.Inputs, fraction: float,
           modalities: str | Sequence[str] | None = None) -> tuple[int, int]:
  """`(k, n)`: the number of entries that may change per example and the total
  number of attacked entries per example (`k = floor(fraction * n)`)."""
  attacked = common.resolve_modalities(inputs, modalities)
  if isinstance(fraction, bool) or not isinstance(fraction, (float, int, np.floating,
                                                            np.integer)):
    raise ValueError(f"fraction: expected a Python float in [0, 1], got {fraction!r}")
  if not 0.0 <= float(fraction) <= 1.0:
    raise ValueError(f"fraction: expected a value in [0, 1], got {fraction!r}")
  n = sum(int(np.prod(inputs[m].shape[1:])) for m in attacked)
  return int(math.floor(float(fraction) * n)), n


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=("logits_fn", "inputs", "labels", "key", "x", "low", "high", "limit", "alpha",
                 "k"),
    meta_fields=("attacked", "shapes", "offsets", "k_max", "rounds", "steps_per_round", "loss",
                 "random_start"))
@dataclasses.dataclass(frozen=True)
class _Attack:
  """The checked arguments of one `decoupling` call, on flattened inputs (the
  arrays may be traced); a pytree whose leaves are the arrays (see `pgd`).

  Attributes:
    attacked: the attacked modalities, sorted; `shapes` their example shapes
      (same order) and `offsets` the start of each in the flat vector (n
      entries, last).
    x: float32 [B, n], the attacked entries of the clean inputs.
    low, high: [n] the box (+-inf where a modality has none).
    limit, alpha: [B|1, 1] `max_change` and `step_size`.
    k: int32, the budget (<= `k_max`, the static size of the saliency top_k).
  The other fields are `decoupling`'s arguments, checked.
  """

  logits_fn: jax.tree_util.Partial
  inputs: common.Inputs
  labels: Array
  key: Array
  attacked: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  offsets: tuple[int, ...]
  x: Array
  low: Array
  high: Array
  limit: Array
  alpha: Array
  k: Array
  k_max: int
  rounds: int
  steps_per_round: int
  loss: str
  random_start: bool

  @property
  def n(self) -> int:
    return self.x.shape[1]


def _check_budget(inputs: common.Inputs, attacked: tuple[str, ...], fraction: float | None,
                  count: int | Array | None, max_count: int | None) -> tuple[Array, int]:
  """`(k, k_max)`: the budget (int32, may be traced) and its static upper bound."""
  if (fraction is None) == (count is None):
    raise ValueError(f"fraction/count: expected exactly one of them, got fraction={fraction!r}, "
                     f"count={count!r}")
  if fraction is not None:
    k_max, _ = budget(inputs, fraction, attacked)
    return jnp.asarray(k_max, jnp.int32), k_max
  n = sum(int(np.prod(inputs[m].shape[1:])) for m in attacked)
  concrete_count = numerics.concrete(count)
  if concrete_count is not None and (concrete_count.shape != () or concrete_count < 0):
    raise ValueError(f"count: expected a non-negative integer scalar, got {count!r}")
  if max_count is None:
    if concrete_count is None:
      raise ValueError("max_count: expected a static int bounding a traced count, got None")
    max_count = int(concrete_count)
  k_max = min(common.check_positive_int(max_count, "max_count", minimum=0), n)
  return jnp.clip(jnp.asarray(count, jnp.int32), 0, k_max), k_max


def _check_change(max_change: float | Array, step_size: float | Array | None, batch: int
                  ) -> tuple[Array, Array]:
  """`(max_change, step_size)` as float32 scalars or [B] (step size default `max_change / 4`)."""
  max_change = common.check_radius(max_change, batch, "max_change")
  concrete = numerics.concrete(max_change)
  if concrete is not None and np.any(concrete <= 0):
    raise ValueError(f"max_change: expected values > 0, got {concrete}")
  step_size = (max_change / 4.0 if step_size is None
               else common.check_radius(step_size, batch, "step_size"))
  return max_change, step_size


def _flat_box(box: Mapping[str, tuple[Array, Array]], shapes: Mapping[str, tuple[int, ...]]
              ) -> tuple[Array, Array]:
  """The box of the flattened attacked entries, `(low [n], high [n])`, +-inf where
  a modality has none; `shapes` in attacked (flattening) order."""
  def side(index, fill):
    return jnp.concatenate([
        (jnp.broadcast_to(box[m][index], shape).reshape(-1) if m in box
         else jnp.full((int(np.prod(shape)),), fill)) for m, shape in shapes.items()])

  return side(0, -jnp.inf), side(1, jnp.inf)


def _flatten(attacked: Sequence[str], tree: Mapping[str, Array]) -> Array:
  """float32 [B, n]: the attacked modalities of `tree`, flattened and joined."""
  return jnp.concatenate([tree[m].astype(jnp.float32).reshape(tree[m].shape[0], -1)
                          for m in attacked], 1)


def _unflatten(attack: _Attack, flat: Array) -> dict[str, Array]:
  """The inverse of `_flatten`: attacked modality -> [B, ...]."""
  b = flat.shape[0]
  return {m: flat[:, attack.offsets[i]:attack.offsets[i + 1]].reshape((b,) + attack.shapes[i])
          for i, m in enumerate(attack.attacked)}


def _setup(logits_fn: common.LogitsFn, inputs: common.Inputs, labels: Array, key: Array, *,
           fraction: float | None, modalities: str | Sequence[str] | None,
           count: int | Array | None, max_count: int | None, rounds: int, steps_per_round: int,
           max_change: float | Array, step_size: float | Array | None,
           bounds: common.Bounds | None, loss: str, random_start: bool) -> _Attack:
  """`decoupling`'s arguments checked (ValueError naming the bad one) into an `_Attack`."""
  attacked = common.resolve_modalities(inputs, modalities)
  b = common.checked_batch(logits_fn, inputs, labels)
  k, k_max = _check_budget(inputs, attacked, fraction, count, max_count)
  rounds = common.check_positive_int(rounds, "rounds")
  steps_per_round = common.check_positive_int(steps_per_round, "steps_per_round")
  loss = common.check_loss(loss)
  if loss == "targeted":
    raise ValueError("loss: expected 'ce' or 'margin' (targeted restarts are pgd's), "
                     "got 'targeted'")
  max_change, step_size = _check_change(max_change, step_size, b)
  box = common.check_bounds(bounds, inputs, attacked)
  shapes = {m: tuple(inputs[m].shape[1:]) for m in attacked}
  offsets = tuple(int(o) for o in np.cumsum([0] + [int(np.prod(shapes[m])) for m in attacked]))
  low, high = _flat_box(box, shapes)
  return _Attack(logits_fn=common.as_partial(logits_fn), inputs=dict(inputs), labels=labels,
                 key=key, attacked=attacked, shapes=tuple(shapes.values()), offsets=offsets,
                 x=_flatten(attacked, inputs), low=low, high=high,
                 limit=common.per_example(max_change, 2), alpha=common.per_example(step_size, 2),
                 k=k, k_max=k_max, rounds=rounds, steps_per_round=steps_per_round, loss=loss,
                 random_start=random_start)


def _add(attack: _Attack, delta: Array) -> Array:
  """`x + delta` clipped into the box widened to include x (straight-through; see
  `common.add_in_box`): exactly x where delta is zero."""
  value = attack.x + delta
  clipped = jnp.clip(value, jnp.minimum(attack.low, attack.x), jnp.maximum(attack.high, attack.x))
  return value + jax.lax.stop_gradient(clipped - value)


def _evaluate(attack: _Attack, delta: Array) -> tuple[Array, tuple[Array, Array]]:
  """`(sum of the losses, (loss [B], misclassified [B]))` at `x + delta`.

  delta is zero off the support, so the input equals x there; the gradient
  covers every entry (the saliency of entries not chosen yet).
  """
  logits = attack.logits_fn(common.merge(attack.inputs, _unflatten(attack, _add(attack, delta))))
  per = common.per_example_loss(logits, attack.labels, attack.loss)
  return jnp.sum(per), (per, common.misclassified(logits, attack.labels))


def _loss_and_grad(attack: _Attack, delta: Array):
  """`_evaluate` and its gradient w.r.t. `delta`."""
  return jax.value_and_grad(functools.partial(_evaluate, attack), has_aux=True)(delta)


def _constrain(attack: _Attack, delta: Array, support: Array) -> Array:
  """`delta` clipped to `max_change`, into the box, and zeroed off the support."""
  delta = jnp.clip(delta, -attack.limit, attack.limit)
  delta = jnp.clip(attack.x + delta, attack.low, attack.high) - attack.x
  return jnp.where(support, delta, 0.0)


def _keep_worse(best: Best, delta: Array, support: Array, per: Array, misclassified: Array
                ) -> Best:
  """`best` with the examples where `(delta, support)` is worse for the model replaced."""
  best_delta, best_support, best_loss, best_mis = best
  worse = common.is_worse(misclassified, per, best_mis, best_loss)
  pick = worse[:, None]
  return (jnp.where(pick, delta, best_delta), jnp.where(pick, support, best_support),
          jnp.where(worse, per, best_loss), jnp.where(worse, misclassified, best_mis))


def _empty(attack: _Attack) -> Array:
  return jnp.zeros(attack.x.shape, bool)


def _nothing(attack: _Attack) -> Best:
  """The worst case before any candidate: zero perturbation, empty support, loss -inf."""
  b = attack.x.shape[0]
  return (jnp.zeros(attack.x.shape, jnp.float32), _empty(attack),
          jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), bool))


def _grow_support(attack: _Attack, r: Array, grad: Array, support: Array) -> Array:
  """The support of round `r`: `ceil(k (r+1) / R)` entries, the previous support
  first, then the largest `|grad|` (one `top_k` of size `k_max`)."""
  b = attack.x.shape[0]
  allowed = (attack.k * (r + 1) + attack.rounds - 1) // attack.rounds  # <= k <= k_max
  score = jnp.where(support, jnp.inf, jnp.abs(grad))
  _, index = jax.lax.top_k(score, attack.k_max)
  chosen = jnp.broadcast_to(jnp.arange(attack.k_max) < allowed, (b, attack.k_max))
  return _empty(attack).at[jnp.arange(b)[:, None], index].set(chosen)


def _start_round(attack: _Attack, r: Array, carry: Carry) -> Carry:
  """Round `r`'s first iterate: the worst case takes the current one, the support
  grows (new entries start at zero, or uniform in `+-max_change` with
  `random_start`, key `fold_in(key, r)`), and the iterate is constrained to it."""
  delta, support, best = carry
  (_, (per, misclassified)), grad = _loss_and_grad(attack, delta)
  best = _keep_worse(best, delta, support, per, misclassified)
  new_support = _grow_support(attack, r, grad, support)
  if attack.random_start:
    noise = common.uniform(jax.random.fold_in(attack.key, r), attack.x.shape, -1.0, 1.0)
    delta = jnp.where(new_support & ~support, noise * attack.limit, delta)
  return _constrain(attack, delta, new_support), new_support, best


def _step(attack: _Attack, carry: Carry) -> Carry:
  """One signed-gradient step on the support; the worst case takes the iterate
  the gradient was taken at."""
  delta, support, best = carry
  (_, (per, misclassified)), grad = _loss_and_grad(attack, delta)
  best = _keep_worse(best, delta, support, per, misclassified)
  return _constrain(attack, delta + attack.alpha * jnp.sign(grad), support), support, best


def _round(attack: _Attack, loop: str, r: int | Array, carry: Carry) -> Carry:
  """Round `r`: grow the support, then `steps_per_round` steps on it (strategy
  `loop`, resolved)."""
  start, step, _, _ = _COMPILED if loop == "python" else _PIECES
  return engine.repeat(loop, attack.steps_per_round, lambda _, c: step(attack, c),
                       start(attack, r, carry))


def _close(attack: _Attack, carry: Carry) -> Best:
  """The worst case after the last round: the last iterate joins it."""
  delta, support, best = carry
  _, (per, misclassified) = _evaluate(attack, delta)
  return _keep_worse(best, delta, support, per, misclassified)


def _search(attack: _Attack, loop: str) -> Best:
  """The worst case over every iterate of every round (the clean input for
  k_max = 0); steps looped with strategy `loop` (resolved)."""
  nothing = engine.host_ready(_nothing(attack), like=attack) if loop == "python" else (
      _nothing(attack))
  if attack.k_max == 0:
    _, (per, misclassified) = _evaluate(attack, nothing[0])
    return (nothing[0], nothing[1], per, misclassified)
  close = _COMPILED[2] if loop == "python" else _close
  return close(attack, engine.repeat(engine.rolled(loop), attack.rounds,
                                     functools.partial(_round, attack, loop),
                                     (nothing[0], nothing[1], nothing)))


def _finalise(attack: _Attack, best: Best, return_info: bool):
  """The adversarial inputs of the worst case (and the info dict with `return_info`).
  Where the support is off, the clean entries pass through bit-for-bit."""
  best_delta, best_support, best_loss, best_mis = best
  flat = jnp.where(best_support, _add(attack, best_delta), attack.x)
  adversarial = common.merge(attack.inputs, _unflatten(attack, flat))
  if not return_info:
    return adversarial
  changed = jnp.sum(_flatten(attack.attacked, adversarial) != attack.x, axis=1).astype(jnp.int32)
  return adversarial, {"misclassified": best_mis, "loss": best_loss, "changed": changed,
                       "fraction_changed": changed.astype(jnp.float32) / attack.n}


# The pieces of the search, traced or compiled once (per static settings and
# shapes) for the "python" loop: start of a round, step, close, finalise.
_PIECES = (_start_round, _step, _close, _finalise)
_COMPILED = (jax.jit(_start_round), jax.jit(_step), jax.jit(_close),
             jax.jit(_finalise, static_argnums=2))


def decoupling(logits_fn: common.LogitsFn, inputs: common.Inputs, labels: Array,
               key: Array, *, fraction: float | None = None,
               modalities: str | Sequence[str] | None = None, count: int | Array | None = None,
               max_count: int | None = None, rounds: int = 8, steps_per_round: int = 10,
               max_change: float | Array = 2.0,
               step_size: float | Array | None = None, bounds: common.Bounds | None = None,
               loss: str = "margin", random_start: bool = False, return_info: bool = False,
               loop: str = "auto"):
  """MUROAN-style decoupling attack with an l0 budget (see the module docstring).

  The threat model of Vishwamitra et al. 2021 (a small fraction of the input
  entries changes); the algorithm (saliency-grown support, signed-gradient
  steps) is this library's, not the paper's.

  Pure and jit-able (with a traced `loop`): the arrays (`inputs`,
  `labels`, `key`, `max_change`, `step_size`, `bounds` and, with a static
  `max_count`, `count`) may be traced; `logits_fn`, `fraction`, `rounds`,
  `steps_per_round`, `modalities`, `loss` and the boolean options are static.
  Checks that need values run only on concrete inputs.

  Args:
    logits_fn: dict modality -> [B, ...] to fused logits [B, K].
    inputs: modality -> float [B, ...] in normalised space.
    labels: int [B].
    key: PRNG key (used for the random initial value of newly chosen entries
      when `random_start`).
    fraction: the fraction of input entries (per example, over the attacked
      modalities jointly) that may change, in [0, 1]; static. The budget is
      `k = floor(fraction * n)` entries (`budget(inputs, fraction)`).
    modalities: attacked modalities (None: all, jointly; a name: within one).
    count: instead of `fraction`, the budget `k` as a number of entries; it
      may be traced under `jax.jit` when the static `max_count` bounds it
      (one compilation for a whole grid of budgets). Counts above
      `max_count` are clipped to it.
    max_count: static upper bound for a traced `count` (the size of the
      saliency `top_k`); defaults to `count` when that is concrete.
    rounds: number of support-growing rounds R >= 1.
    steps_per_round: signed-gradient steps per round >= 1.
    max_change: bound on the change of each entry (normalised units), > 0;
      scalar or [B].
    step_size: per-step change; default `max_change / 4`.
    bounds: optional box, modality -> (low, high) in normalised space.
    loss: "margin" (default; its gradient does not vanish on confident
      examples) or "ce".
    random_start: newly chosen entries start uniform in `[-max_change,
      max_change]` instead of at zero.
    return_info: also return per-example arrays [B]: "misclassified" (also
      True where the logits are NaN/Inf),
      "loss", "changed" (number of entries changed, int32) and
      "fraction_changed".
    loop: the loop strategy, as for `pgd` (`engine.LOOPS`; "auto": a host
      loop over compiled steps on XLA:CPU with concrete inputs).

  Returns:
    The adversarial inputs (same structure/dtypes), or `(inputs', info)`.

  Raises:
    ValueError for a fraction outside [0, 1], both or neither of fraction and
    count, a negative count, rounds/steps < 1, max_change <= 0, an unknown
    modality, an unknown loop (or "python" under a transformation), malformed
    inputs/labels, an empty batch, or (when concrete) NaN/Inf inputs or labels
    outside `[0, K)`.
  """
  attack = _setup(logits_fn, inputs, labels, key, fraction=fraction, modalities=modalities,
                  count=count, max_count=max_count, rounds=rounds,
                  steps_per_round=steps_per_round, max_change=max_change, step_size=step_size,
                  bounds=bounds, loss=loss, random_start=random_start)
  loop = engine.resolve(loop, attack)
  if loop == "python":
    attack = engine.host_ready(attack)
  finalise = _COMPILED[3] if loop == "python" else _finalise
  return finalise(attack, _search(attack, loop), return_info)
