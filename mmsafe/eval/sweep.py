"""Robust accuracy of l2-PGD over a steps x restarts grid (type "sweep"): evidence
that an attack protocol has converged (more steps / restarts no longer lower it).

For each step count, `max(restarts)` independent runs are made (step size
2.5 eps / steps, worst iterate kept; run 0 starts at the clean input unless
`random_start`, the others at random points of the ball); the result for R
restarts is the per-example worst case over the first R runs (an example
counts as broken when any of them misclassifies it), which is what
`pgd(..., restarts=R, random_start=random_start)` computes (with its own keys).
Compiles once per (scope, step count) and instance.
"""
from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe.attacks import engine
from mmsafe.attacks.pgd import PGDProtocol, get_protocol
from mmsafe.eval import base
from mmsafe.eval.batching import MULTI, Progress, over_batches, task_key
from mmsafe.eval.clean import Clean


class Sweep(Clean):
  """PGD robust accuracy per step count and restarts, at the protocol's budgets
  times `scales`, multi-modal and for each modality alone: {"clean_accuracy",
  "num_examples", "steps", "restarts", "loss", "random_start", "accuracy":
  {"<scope>@<eps>": [[acc for R in restarts] for S in steps]}}.

  Args:
    protocol: its `multi_eps` / `uni_eps` times `scales` are the budgets.
    scales: positive multipliers of the protocol's budgets.
    steps, restarts: the grids (integers >= 1).
    loss, random_start: the attack's (`attacks.pgd`).
    loop: loop strategy of PGD (`mmsafe.attacks.engine.LOOPS`).
  """

  type = "sweep"

  def __init__(self, *, protocol: str | PGDProtocol = "default",
               scales: float | Sequence[float] = (1.0, 4.0),
               steps: int | Sequence[int] = (4, 10, 20, 50, 100),
               restarts: int | Sequence[int] = (1, 3, 5), loss: str = "ce",
               random_start: bool = False, loop: str = "auto", **common):
    super().__init__(**common)
    budget = get_protocol(protocol)
    scales = base.bounded_floats(scales, "scales", 0.0, low_inclusive=False)
    self.budgets = [(MULTI, budget.multi_eps * s) for s in scales]
    self.budgets += [(m, budget.uni_eps * s) for m in sorted(self.input_shapes) for s in scales]
    self.steps = sorted(set(base.sequence(steps, "steps", int, "an integer")))
    self.restarts = sorted(set(base.sequence(restarts, "restarts", int, "an integer")))
    if not self.restarts or self.restarts[0] < 1 or not self.steps or self.steps[0] < 1:
      raise ValueError(f"steps/restarts: expected non-empty grids of integers >= 1, got "
                       f"{self.steps}/{self.restarts}")
    self.loss, self.random_start = loss, bool(random_start)
    self.loop = engine.resolve(loop)

  @functools.cached_property
  def _program(self):
    return base.compile_program(self._attack, self.loop, ("scope", "steps", "random_start"))

  def _attack(self, variables, inputs, labels, key, eps, scope, steps, random_start, loop):
    _, info = attacks.pgd(jax.tree_util.Partial(self.apply_fn, variables), inputs, labels, key,
                          eps=eps, steps=steps, modalities=None if scope == MULTI else scope,
                          loss=self.loss, random_start=random_start, return_info=True,
                          loop=loop)
    return info["misclassified"], jnp.zeros(labels.shape)

  def _row(self, variables, correct, scope: str, eps: float, steps: int,
           progress: Progress) -> list[float]:
    """Accuracy for each restart count at `steps` steps."""
    broken = []
    for r in range(self.restarts[-1]):
      fn = functools.partial(self._program, scope=scope, steps=steps,
                             random_start=self.random_start or r > 0)
      broken.append(over_batches(fn, variables, self.data.inputs, self.data.labels,
                                 batch_size=self.batch_size, key=task_key(self.seed, "sweep", r),
                                 value=jnp.float32(eps), progress=progress)[0])
    return [float((correct & ~np.any(broken[:number], axis=0)).mean())
            for number in self.restarts]

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    correct, _ = self.correct(variables)
    table = {f"{scope}@{eps}": [self._row(variables, correct, scope, eps, s, progress)
                                for s in self.steps]
             for scope, eps in self.budgets}
    return {"clean_accuracy": float(correct.mean()), "num_examples": int(correct.size),
            "steps": self.steps, "restarts": self.restarts, "loss": self.loss,
            "random_start": self.random_start, "accuracy": table}
