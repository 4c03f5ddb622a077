"""The votes of the modality-ablation certificate (`mmsafe.certify.ablation`) as
class-probability bounds: Clopper-Pearson bounds of the chosen class and of the
others from the estimation votes (`class_bounds`), and the choice between the
per-class and the pair bounds from the selection votes (`choose_per_class`).
See `mmsafe.certify.ablation`'s module docstring (Estimation) for the rule.
"""

from __future__ import annotations

import numpy as np

from mmsafe import checks
from mmsafe.certify import votes


def class_bounds(counts: np.ndarray, chosen: np.ndarray, alpha: float,
                 per_class: np.ndarray | bool = True) -> tuple[np.ndarray, np.ndarray]:
  """`(p_lower, p_upper)` [B]: bounds `p_A >= p_lower` of the class `chosen` and
  `p_c <= p_upper` of every other class c that hold together with probability
  `>= 1 - alpha` over the votes (module docstring).

  Args:
    counts: int [B, K], the votes per class of each example's estimation sample.
    chosen: int [B], the class A, chosen independently of `counts`.
    alpha: the failure probability, in (0, 1/2].
    per_class: bool, scalar or [B]: Clopper-Pearson bounds of every class at
      `alpha / 2` (Bonferroni over A and the runner-up) with `p_upper =
      min(max_{c != A} u_c, 1 - p_lower)`; False: `p_lower` at `alpha` and
      `p_upper = 1 - p_lower`.
  """
  alpha = checks.check_number(alpha, "alpha", 0.0, inclusive=False, maximum=0.5)
  counts = np.asarray(counts)
  if counts.ndim != 2 or not np.issubdtype(counts.dtype, np.integer) or np.any(counts < 0):
    raise ValueError(f"counts: expected vote counts [B, K] (non-negative integers), got "
                     f"{counts.dtype} {counts.shape}")
  batch, num_classes = counts.shape
  chosen = np.asarray(chosen)
  if chosen.shape != (batch,) or np.any(chosen < 0) or np.any(chosen >= num_classes):
    raise ValueError(f"chosen: expected a class in [0, {num_classes}) per example [{batch}], "
                     f"got {chosen!r}")
  per_class = np.broadcast_to(np.asarray(per_class, bool), (batch,))
  rows, trials = np.arange(batch), counts.sum(axis=1)
  level = np.where(per_class, alpha / 2.0, alpha)
  p_lower = votes.clopper_pearson_lower(counts[rows, chosen], trials, level)
  # Upper bounds by symmetry: u(k of n) = 1 - (lower bound for n - k of n).
  upper = 1.0 - votes.clopper_pearson_lower(trials[:, None] - counts, trials[:, None],
                                            level[:, None])
  upper[rows, chosen] = 0.0
  p_upper = np.where(per_class, np.minimum(upper.max(axis=1), 1.0 - p_lower), 1.0 - p_lower)
  return p_lower, p_upper


def choose_per_class(selection: np.ndarray, chosen: np.ndarray, num_samples: int,
                     alpha: float) -> np.ndarray:
  """bool [B]: whether the per-class bounds give a larger gap than the pair for
  `num_samples` votes in the proportions of the selection votes `selection`
  [B, K] (a function of the selection votes only; module docstring)."""
  selection = np.asarray(selection)
  scale = num_samples / np.maximum(selection.sum(axis=1, keepdims=True), 1)
  expected = np.rint(selection * scale).astype(np.int64)
  pair, per_class = (np.subtract(*class_bounds(expected, chosen, alpha, per_class=rule))
                     for rule in (False, True))
  return per_class > pair
