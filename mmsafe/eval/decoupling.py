"""Success rate of the decoupling (l0, MUROAN; Vishwamitra et al. 2021) attack
(type "decoupling") against the fraction of input entries it may change,
jointly over modalities ("multi") or within one. The attack success rate (ASR)
is the fraction of clean-correct examples the attack makes misclassified; the
curve is the per-example worst case over the budgets up to each fraction
(monotone by construction), the independent per-budget numbers are `asr_raw`.
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
from mmsafe.attacks.decoupling import budget as decoupling_budget
from mmsafe.eval import base
from mmsafe.eval.batching import MULTI, Progress, over_batches, task_key
from mmsafe.eval.attack import BoxedAttack


class Decoupling(BoxedAttack):
  """The decoupling attack's ASR per scope and budget: {"num_examples",
  "clean_accuracy", "asr": {"<scope>@<fraction>": asr}, "curves"}.

  Args:
    fractions: fractions of the scope's input entries the attack may change.
    scopes: "multi" and/or modality names.
    rounds, steps_per_round, max_change, step_size, loss, random_start: the
      attack's (`attacks.decoupling`).
    box: clip to the raw value range (`Dataset.normalized_range`).
    loop: loop strategy of the attack (`mmsafe.attacks.engine.LOOPS`).
  """

  type = "decoupling"

  def __init__(self, *, fractions: float | Sequence[float] = (0.0025, 0.005, 0.0116, 0.025,
                                                              0.05),
               scopes: str | Sequence[str] = (MULTI,), rounds: int = 8, steps_per_round: int = 10,
               max_change: float = 2.0, step_size: float | None = None, loss: str = "margin",
               random_start: bool = False, box: bool = False, loop: str = "auto", **common):
    super().__init__(**common)
    base.bounded_floats(max_change, "max_change", 0.0, low_inclusive=False)
    if step_size is not None:
      base.bounded_floats(step_size, "step_size", 0.0, low_inclusive=False)
    self.options = {"rounds": rounds, "steps_per_round": steps_per_round,
                    "max_change": max_change, "step_size": step_size, "loss": loss,
                    "random_start": random_start}
    self.box, self.loop = bool(box), engine.resolve(loop)
    self._budgets(base.bounded_floats(fractions, "fractions", 0.0, 1.0),
                  base.strings(scopes, "scopes"))

  def _budgets(self, fractions: Sequence[float], scopes: Sequence[str]) -> None:
    """The tasks (scope, fraction, count), entries and largest count per scope."""
    zeros = {m: jnp.zeros((1, *s)) for m, s in self.input_shapes.items()}
    self.tasks, self.num_entries, self.max_count = [], {}, {}
    for scope in scopes:
      if scope != MULTI and scope not in self.input_shapes:
        raise ValueError(f"scopes: expected {MULTI!r} or one of {sorted(self.input_shapes)}, "
                         f"got {scope!r}")
      attacked = None if scope == MULTI else scope
      for fraction in sorted({float(f) for f in fractions}):
        number, self.num_entries[scope] = decoupling_budget(zeros, fraction, attacked)
        self.tasks.append((scope, fraction, number))
        self.max_count[scope] = max(self.max_count.get(scope, 0), number)

  def _attack(self, variables, inputs, labels, key, number, scope, loop):
    _, info = attacks.decoupling(jax.tree_util.Partial(self.apply_fn, variables), inputs, labels,
                                 key, modalities=None if scope == MULTI else scope, count=number,
                                 max_count=self.max_count[scope], bounds=self.bounds,
                                 return_info=True, loop=loop, **self.options)
    return info["misclassified"], info["fraction_changed"]

  def curves(self, variables: Any, correct: np.ndarray, progress: Progress = None
             ) -> dict[str, Any]:
    """{"decoupling": {scope: {"modalities", "fraction", "count", "num_entries", "asr",
    "asr_raw", "accuracy", "mean_fraction_changed"}}} (ASR over the clean-correct
    examples `correct` [N])."""
    num_correct = max(int(correct.sum()), 1)
    curves = {}
    for scope in self.max_count:
      indexed = [(i, t) for i, t in enumerate(self.tasks) if t[0] == scope]
      success_raw, changed = [], []
      for index, (_, _, number) in indexed:
        bad, extra = over_batches(functools.partial(self._program, scope=scope), variables,
                                  self.data.inputs, self.data.labels, batch_size=self.batch_size,
                                  key=task_key(self.seed, self.type, index),
                                  value=jnp.int32(number), progress=progress)
        success_raw.append(correct & bad)
        changed.append(float(extra.mean()))
      success = np.logical_or.accumulate(np.stack(success_raw), axis=0)
      curves[scope] = {
          "modalities": sorted(self.data.inputs) if scope == MULTI else [scope],
          "fraction": [t[1] for _, t in indexed], "count": [int(t[2]) for _, t in indexed],
          "num_entries": int(self.num_entries[scope]),
          "asr": [float(s.sum() / num_correct) for s in success],
          "asr_raw": [float(s.sum() / num_correct) for s in success_raw],
          "accuracy": [float((correct & ~s).mean()) for s in success],
          "mean_fraction_changed": changed}
    return {"decoupling": curves}

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    correct, _ = self.correct(variables, progress)
    curves = self.curves(variables, correct, progress)["decoupling"]
    return {"num_examples": int(correct.size), "clean_accuracy": float(correct.mean()),
            "asr": {f"{scope}@{fraction:g}": asr for scope, curve in curves.items()
                    for fraction, asr in zip(curve["fraction"], curve["asr"])},
            "curves": curves}
