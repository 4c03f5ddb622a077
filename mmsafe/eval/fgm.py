"""Robust accuracy against l2 FGM (type "fgm"; cross-entropy, as in CRMT Sec. 4),
per eps as is: its known non-monotonicity in eps is part of what it measures
(`mean_norm` is None). Definitions: `mmsafe.eval.attack`."""
from __future__ import annotations

import functools

import jax.numpy as jnp

from mmsafe import attacks
from mmsafe.eval.attack import AttackEvaluator
from mmsafe.eval.batching import MULTI, over_batches, task_key
from mmsafe.eval.clean import wrong


class FGM(AttackEvaluator):
  """Robust accuracy against l2 FGM over the eps grids (keys: `AttackEvaluator`)."""

  type = "fgm"

  def _attack(self, variables, inputs, labels, key, eps, scope, loop):
    del key, loop  # one step: nothing to loop
    adversarial = attacks.fgm(lambda x: self.apply_fn(variables, x), inputs, labels, eps=eps,
                              modalities=None if scope == MULTI else scope, bounds=self.bounds,
                              loss="ce")
    return wrong(self.apply_fn, variables, adversarial, labels), jnp.zeros(labels.shape)

  def _curve(self, variables, correct, scope, grid, first_index, progress, certified_radius):
    del certified_radius  # one gradient per example: nothing worth skipping
    robust = []
    for i, eps in enumerate(grid):
      broken, _ = over_batches(functools.partial(self._program, scope=scope), variables,
                               self.data.inputs, self.data.labels, batch_size=self.batch_size,
                               key=task_key(self.seed, self.type, first_index + i),
                               value=jnp.float32(eps), progress=progress)
      robust.append(correct & ~broken)
    return robust, {"mean_norm": None}
