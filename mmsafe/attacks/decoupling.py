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
"""

from __future__ import annotations

from collections.abc import Sequence
import math

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.attacks import common

Array = jax.Array


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


def decoupling(logits_fn: common.LogitsFn, inputs: common.Inputs, labels: Array,
               key: Array, *, fraction: float | None = None,
               modalities: str | Sequence[str] | None = None, count: int | Array | None = None,
               max_count: int | None = None, rounds: int = 8, steps_per_round: int = 10,
               max_change: float | Array = 2.0,
               step_size: float | Array | None = None, bounds: common.Bounds | None = None,
               loss: str = "margin", random_start: bool = False, return_info: bool = False):
  """MUROAN-style decoupling attack with an l0 budget (see the module docstring).

  The threat model of Vishwamitra et al. 2021 (a small fraction of the input
  entries changes); the algorithm (saliency-grown support, signed-gradient
  steps) is this library's, not the paper's.

  Pure and jit-able (one `lax.fori_loop` nest): the arrays (`inputs`,
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
    return_info: also return per-example arrays [B]: "misclassified",
      "loss", "changed" (number of entries changed, int32) and
      "fraction_changed".

  Returns:
    The adversarial inputs (same structure/dtypes), or `(inputs', info)`.

  Raises:
    ValueError for a fraction outside [0, 1], both or neither of fraction and
    count, a negative count, rounds/steps < 1, max_change <= 0, an unknown
    modality or malformed inputs.
  """
  attacked = common.resolve_modalities(inputs, modalities)
  b = common.batch_size(inputs, labels)
  if (fraction is None) == (count is None):
    raise ValueError(f"fraction/count: expected exactly one of them, got fraction={fraction!r}, "
                     f"count={count!r}")
  if fraction is not None:
    k_max, n = budget(inputs, fraction, attacked)
    k = jnp.asarray(k_max, jnp.int32)
  else:
    n = sum(int(np.prod(inputs[m].shape[1:])) for m in attacked)
    concrete_count = common._concrete(count)  # pylint: disable=protected-access
    if concrete_count is not None and (concrete_count.shape != () or concrete_count < 0):
      raise ValueError(f"count: expected a non-negative integer scalar, got {count!r}")
    if max_count is None:
      if concrete_count is None:
        raise ValueError("max_count: expected a static int bounding a traced count, got None")
      max_count = int(concrete_count)
    k_max = min(common.check_positive_int(max_count, "max_count", minimum=0), n)
    k = jnp.clip(jnp.asarray(count, jnp.int32), 0, k_max)
  rounds = common.check_positive_int(rounds, "rounds")
  steps_per_round = common.check_positive_int(steps_per_round, "steps_per_round")
  loss = common.check_loss(loss)
  if loss == "targeted":
    raise ValueError("loss: expected 'ce' or 'margin' (targeted restarts are pgd's), "
                     "got 'targeted'")
  max_change = common.check_radius(max_change, b, "max_change")
  concrete = common._concrete(max_change)  # pylint: disable=protected-access
  if concrete is not None and np.any(concrete <= 0):
    raise ValueError(f"max_change: expected values > 0, got {concrete}")
  step_size = (max_change / 4.0 if step_size is None
               else common.check_radius(step_size, b, "step_size"))
  box = common.check_bounds(bounds, inputs, attacked)

  shapes = {m: tuple(inputs[m].shape[1:]) for m in attacked}
  sizes = [int(np.prod(shapes[m])) for m in attacked]
  offsets = np.cumsum([0] + sizes)

  def flatten(tree):
    return jnp.concatenate([tree[m].astype(jnp.float32).reshape(b, -1) for m in attacked], 1)

  def unflatten(flat):
    return {m: flat[:, offsets[i]:offsets[i + 1]].reshape((b,) + shapes[m])
            for i, m in enumerate(attacked)}

  x = flatten(inputs)
  low = jnp.concatenate([
      (jnp.broadcast_to(box[m][0], shapes[m]).reshape(-1) if m in box
       else jnp.full((sizes[i],), -jnp.inf)) for i, m in enumerate(attacked)])
  high = jnp.concatenate([
      (jnp.broadcast_to(box[m][1], shapes[m]).reshape(-1) if m in box
       else jnp.full((sizes[i],), jnp.inf)) for i, m in enumerate(attacked)])
  limit = common.per_example(max_change, 2)
  alpha = common.per_example(step_size, 2)

  def add(delta):
    # x + delta clipped into the box widened to include x (straight-through; see
    # common.add_in_box): exactly x where delta is zero.
    value = x + delta
    clipped = jnp.clip(value, jnp.minimum(low, x), jnp.maximum(high, x))
    return value + jax.lax.stop_gradient(clipped - value)

  def output(delta, support):
    # Where the support is off, the clean entries pass through bit-for-bit.
    return common.merge(inputs, unflatten(jnp.where(support, add(delta), x)))

  def evaluate(delta):
    # delta is zero off the support, so the input equals x there; the gradient
    # covers every entry (the saliency of entries not chosen yet).
    logits = logits_fn(common.merge(inputs, unflatten(add(delta))))
    per = common.per_example_loss(logits, labels, loss)
    return jnp.sum(per), (per, jnp.argmax(logits, axis=-1) != labels)

  value_and_grad = jax.value_and_grad(evaluate, has_aux=True)

  def constrain(delta, support):
    delta = jnp.clip(delta, -limit, limit)
    delta = jnp.clip(x + delta, low, high) - x
    return jnp.where(support, delta, 0.0)

  def keep_worse(best, delta, support, per, misclassified):
    best_delta, best_support, best_loss, best_mis = best
    worse = common.is_worse(misclassified, per, best_mis, best_loss)
    pick = worse[:, None]
    return (jnp.where(pick, delta, best_delta), jnp.where(pick, support, best_support),
            jnp.where(worse, per, best_loss), jnp.where(worse, misclassified, best_mis))

  empty = jnp.zeros((b, n), bool)
  nothing = (jnp.zeros((b, n), jnp.float32), empty, jnp.full((b,), -jnp.inf, jnp.float32),
             jnp.zeros((b,), bool))
  if k_max == 0:
    _, (per, misclassified) = evaluate(nothing[0])
    best = (nothing[0], empty, per, misclassified)
  else:
    rows = jnp.arange(b)[:, None]

    def one_round(r, carry):
      delta, support, best = carry
      (_, (per, misclassified)), grad = value_and_grad(delta)
      best = keep_worse(best, delta, support, per, misclassified)
      allowed = (k * (r + 1) + rounds - 1) // rounds  # ceil(k (r+1) / R) <= k <= k_max
      score = jnp.where(support, jnp.inf, jnp.abs(grad))
      _, index = jax.lax.top_k(score, k_max)
      chosen = jnp.broadcast_to(jnp.arange(k_max) < allowed, (b, k_max))
      new_support = empty.at[rows, index].set(chosen)
      if random_start:
        noise = common.uniform(jax.random.fold_in(key, r), (b, n), -1.0, 1.0)
        delta = jnp.where(new_support & ~support, noise * limit, delta)
      support = new_support
      delta = constrain(delta, support)

      def step(_, inner):
        delta, best = inner
        (_, (per, misclassified)), grad = value_and_grad(delta)
        best = keep_worse(best, delta, support, per, misclassified)
        return constrain(delta + alpha * jnp.sign(grad), support), best

      delta, best = jax.lax.fori_loop(0, steps_per_round, step, (delta, best))
      return delta, support, best

    delta, support, best = jax.lax.fori_loop(
        0, rounds, one_round, (nothing[0], empty, nothing))
    _, (per, misclassified) = evaluate(delta)
    best = keep_worse(best, delta, support, per, misclassified)

  best_delta, best_support, best_loss, best_mis = best
  adversarial = output(best_delta, best_support)
  if not return_info:
    return adversarial
  changed = jnp.sum(flatten(adversarial) != x, axis=1).astype(jnp.int32)
  return adversarial, {"misclassified": best_mis, "loss": best_loss, "changed": changed,
                       "fraction_changed": changed.astype(jnp.float32) / n}
