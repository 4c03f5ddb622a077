"""Loop strategies of the iterative attacks (`pgd`, `decoupling`).

An attack is built from pieces (start, one step, finish); the strategy only
decides how the steps are looped, so every strategy computes the same numbers
(up to float rounding of differently fused programs) with the same keys:

* "python": a host loop over the pieces, each compiled once (`jax.jit`, keyed
  on the static settings and shapes; the arrays, eps included, are
  arguments). Only possible when the caller is not tracing.
* "scan": `lax.fori_loop` (a scan), fully unrolled up to `UNROLL_LIMIT` steps
  (e.g. the few steps of adversarial training inside a jitted train step).
* "fori": `lax.fori_loop` without unrolling (the smallest program).
* "auto": "python" on XLA:CPU when the inputs are concrete, else "scan".

Why (`experiments/bench_attacks.py`, mfeat JT model, B = 128, XLA:CPU): a
convolution's gradient step inside a rolled while loop runs several times
slower than the same jitted step called from Python (PGD 10 steps: 150-510 ms
rolled, 75-97 ms host loop, 79-81 ms unrolled; 50 steps x 5 restarts:
7.1 s rolled, 2.7 s host loop; decoupling: 3.8 s rolled, 0.8 s host loop),
and the host loop costs one dispatch per step. On GPU/TPU (not measured
here) a compiled loop saves the dispatches, so "auto" keeps it traced there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from mmsafe.programs import is_traced

LOOPS = ("auto", "python", "scan", "fori")
# Loops of at most this many steps are fully unrolled by "scan".
UNROLL_LIMIT = 16


def resolve(loop: str, *trees: Any) -> str:
  """The concrete strategy ("python", "scan" or "fori") of `loop` for arrays `trees`.

  Raises:
    ValueError for an unknown strategy, or "python" while `trees` are traced.
  """
  if loop not in LOOPS:
    raise ValueError(f"loop: expected one of {list(LOOPS)}, got {loop!r}")
  traced = is_traced(*trees)
  if loop == "python" and traced:
    raise ValueError("loop: 'python' needs concrete inputs, but the caller is tracing; "
                     "use 'scan' or 'fori'")
  if loop != "auto":
    return loop
  return "python" if not traced and jax.default_backend() == "cpu" else "scan"


def repeat(loop: str, n: int, body: Callable[[Any, Any], Any], carry: Any) -> Any:
  """`carry = body(i, carry)` for `i` in `range(n)` with strategy `loop` (resolved):
  a Python loop (`i` a Python int; `body` should call compiled pieces) or a
  `lax.fori_loop` (unrolled fully by "scan" up to `UNROLL_LIMIT` steps)."""
  if loop == "python":
    for i in range(n):
      carry = body(i, carry)
    return carry
  unroll = loop == "scan" and n <= UNROLL_LIMIT
  return jax.lax.fori_loop(0, n, body, carry, unroll=True if unroll else 1)


def rolled(loop: str) -> str:
  """The strategy of an outer loop (restarts, rounds) around step loops of
  strategy `loop`: the host loop stays one, a traced loop stays rolled (an
  unrolled one would copy every step loop it holds)."""
  return "python" if loop == "python" else "fori"


def host_ready(tree: Any, like: Any = None) -> Any:
  """`tree` with its leaves on the device: numpy arrays are transferred once, not
  at every call of a compiled piece. When `like` (default: `tree`) holds a
  committed, replicated array (e.g. the model variables), every leaf is placed
  like it: jit compiles committed and uncommitted arguments separately, and a
  piece or an eager op that reads only uncommitted inputs (PGD's first iterate,
  the initial worst case) returns uncommitted arrays, so the later pieces would
  otherwise compile twice (first call, later calls)."""
  placement = next((leaf.sharding for leaf in jax.tree_util.tree_leaves(
      tree if like is None else like) if isinstance(leaf, jax.Array) and leaf.committed
                    and leaf.sharding.is_fully_replicated), None)
  if placement is None:
    return jax.tree_util.tree_map(jax.numpy.asarray, tree)
  return jax.tree_util.tree_map(
      lambda leaf: leaf if isinstance(leaf, jax.Array) and leaf.committed
      else jax.device_put(leaf, placement), tree)
