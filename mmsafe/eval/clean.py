"""Clean accuracy (type "clean"): which examples the model classifies correctly
without any perturbation; an example with NaN/Inf logits never is. The attack
evaluators extend `Clean` (an example is robust only when it is also correct
clean)."""
from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.attacks import common
from mmsafe.eval import base
from mmsafe.eval.batching import Progress, over_batches, task_key

Array = jax.Array


def wrong(apply_fn: base.ApplyFn, variables: Any, inputs: Mapping[str, Array], labels: Array
          ) -> Array:
  """bool [B]: misclassified, or with NaN/Inf logits (`common.misclassified`)."""
  return common.misclassified(apply_fn(variables, inputs), labels)


def clean_flags(apply_fn: base.ApplyFn, variables: Any, inputs: Mapping[str, Array],
                labels: Array) -> tuple[Array, Array]:
  """(misclassified [B] as `wrong`, non-finite [B]: some logit is NaN/Inf), one
  forward pass."""
  logits = apply_fn(variables, inputs)
  return common.misclassified(logits, labels), ~jnp.all(jnp.isfinite(logits), axis=-1)


class Clean(base.Evaluator):
  """Clean accuracy: {"num_examples", "clean_accuracy"}."""

  type = "clean"

  @functools.cached_property
  def _clean_program(self):
    return jax.jit(lambda variables, inputs, labels, key, value: clean_flags(
        self.apply_fn, variables, inputs, labels))

  def correct(self, variables: Any, progress: Progress = None) -> tuple[np.ndarray, np.ndarray]:
    """(bool [N]: correctly classified, bool [N]: the logits hold a NaN/Inf; such
    an example counts as misclassified) on the evaluated split."""
    wrong_flags, non_finite = over_batches(
        self._clean_program, variables, self.data.inputs, self.data.labels,
        batch_size=self.batch_size, key=task_key(self.seed, "clean", 0),
        value=jnp.float32(0.0), progress=progress)
    return ~wrong_flags, non_finite > 0

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    correct, _ = self.correct(variables, progress)
    return {"num_examples": int(correct.size), "clean_accuracy": float(correct.mean())}
