"""Accuracy with each modality missing (type "missing"): the modality replaced by
a fill (`attacks.drop_modality`: "zeros", "mean", "noise"), per fill. Not
conditioned on the clean result (CRMT Sec. 4, missing-modality rows)."""
from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe import attacks
from mmsafe import data as data_lib
from mmsafe.eval import base
from mmsafe.eval.batching import Progress, encode_flags, over_batches, task_key
from mmsafe.eval.clean import wrong


class Missing(base.Evaluator):
  """Accuracy with each modality missing, per fill: {"num_examples", "accuracy":
  {modality: {fill: accuracy}}}.

  Args:
    fills: subset of `attacks.FILLS`; the first names the headline entries.
    fill_examples: training examples averaged for the "mean" fill (the centre of
      the "noise" fill; 0: all).
  """

  type = "missing"

  def __init__(self, *, fills: str | Sequence[str] = ("zeros",), fill_examples: int = 0,
               **common):
    super().__init__(**common)
    self.fill_examples = base.count(fill_examples, "fill_examples")
    self.fills = base.strings(fills, "fills")
    for fill in self.fills:
      if fill not in attacks.FILLS:
        raise ValueError(f"fills: expected values in {list(attacks.FILLS)}, got {fill!r}")
    if {"mean", "noise"} & set(self.fills) and "train" not in self.splits:
      raise ValueError(f"fills: the 'mean' and 'noise' fills need a 'train' split, got splits "
                       f"{sorted(self.splits)}")
    self.tasks = [(m, fill) for m in sorted(self.input_shapes) for fill in self.fills]

  @functools.cached_property
  def fill_means(self) -> dict[str, np.ndarray]:
    """Training-split means for the "mean" / "noise" fills (empty when neither
    is used), computed once."""
    if not {"mean", "noise"} & set(self.fills):
      return {}
    return data_lib.modality_means(self.splits["train"], self.fill_examples)

  @functools.cached_property
  def _program(self):
    """The compiled drop-and-classify step, built on first use (after `fill_means`)."""
    means = self.fill_means

    def drop(variables, inputs, labels, key, value, modality, fill):
      del value
      dropped = attacks.drop_modality(inputs, modality, fill, key=key, mean=means.get(modality))
      return wrong(self.apply_fn, variables, dropped, labels), jnp.zeros(labels.shape)

    return jax.jit(drop, static_argnames=("modality", "fill"))

  def accuracies(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    """{"missing": {modality: {fill: accuracy}}, "headline": {"missing/<m>": accuracy
    with the first fill}, "per_example": {"missing": {modality: {fill: flags}}}}."""
    missing, headline, flags = {}, {}, {}
    for index, (modality, fill) in enumerate(self.tasks):
      fn = functools.partial(self._program, modality=modality, fill=fill)
      bad, _ = over_batches(fn, variables, self.data.inputs, self.data.labels,
                            batch_size=self.batch_size, key=task_key(self.seed, self.type, index),
                            value=jnp.float32(0.0), progress=progress)
      missing.setdefault(modality, {})[fill] = float((~bad).mean())
      flags.setdefault(modality, {})[fill] = encode_flags(~bad)
      if fill == self.fills[0]:
        headline[f"missing/{modality}"] = missing[modality][fill]
    return {"missing": missing, "headline": headline, "per_example": {"missing": flags}}

  def measure(self, variables: Any, progress: Progress = None) -> dict[str, Any]:
    return {"num_examples": len(self.data),
            "accuracy": self.accuracies(variables, progress)["missing"]}
