"""Intervals and verdicts for comparing trained methods (pure numpy / scipy).

Experiments compare methods A and B trained with the same seeds and evaluated
on the same test examples. The evidence is the seed-paired difference
`d[s] = metric(A, s) - metric(B, s)` or, where the metric is a mean over test
examples, the per-example differences `d[s, i] = outcome(A, s, i) - outcome(B, s, i)`.

Interval over seeds and examples (`paired_interval` on [S, N]). Model the
differences as `d[s, i] = mu + alpha_s + beta_i + eps_si` (training seed,
test example, interaction; independent, zero mean). The estimate of `mu` is
the grand mean, with variance `v_alpha / S + v_beta / N + v_eps / (S N)`.
The sample variance over seeds of the per-seed means estimates
`v_alpha + v_eps / N` and the sample variance over examples of the per-example
means estimates `v_beta + v_eps / S`, so

    se^2 = var_s(mean_i d) / S + var_i(mean_s d) / N

over-covers the interaction term once (conservative). The interval is
`mean +- t_q(df) se` with Welch-Satterthwaite degrees of freedom
`df = se^4 / ((var_s / S)^2 / (S - 1) + (var_i / N)^2 / (N - 1))`. It states
how sure one can be about the *population* of training runs and test
examples, where the t interval over seeds alone (`paired_interval` on [S])
ignores that the test split is a sample too.

Verdicts (`verdict`): a claim "A improves on B" holds (REPRODUCED) when the
whole interval lies above the claim's minimal effect `delta`, is CONTRADICTED
when it lies below 0, and is INCONCLUSIVE otherwise. A claim "A does not
change B" is an equivalence test: REPRODUCED when the interval lies inside
(-delta, delta), CONTRADICTED when it lies wholly outside it, INCONCLUSIVE
otherwise. No claim is judged by inverting another.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
IMPROVES, EQUIVALENT = "improves", "equivalent"
CLAIM_KINDS = (IMPROVES, EQUIVALENT)


@dataclasses.dataclass(frozen=True)
class Interval:
  """A mean difference with its two-sided confidence interval.

  Attributes:
    mean: the estimate (mean over seeds, and over examples when given).
    low, high: the interval's ends.
    confidence: its level (e.g. 0.95).
    num_seeds: S; num_examples: N (0 when the metric is per seed only).
    seed_std: sample standard deviation (ddof 1) of the per-seed differences.
    df: degrees of freedom of the t quantile.
  """

  mean: float
  low: float
  high: float
  confidence: float
  num_seeds: int
  num_examples: int
  seed_std: float
  df: float

  def text(self, digits: int = 3) -> str:
    """"+0.012 [+0.003, +0.021]"."""
    return (f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _checked(differences: Any) -> np.ndarray:
  d = np.asarray(differences, np.float64)
  if d.ndim not in (1, 2) or d.shape[0] < 2 or (d.ndim == 2 and d.shape[1] < 2):
    raise ValueError(f"differences: expected shape [S >= 2] or [S >= 2, N >= 2] (seeds, "
                     f"examples), got {d.shape}")
  if not np.isfinite(d).all():
    raise ValueError(f"differences: expected finite values, got {int((~np.isfinite(d)).sum())} "
                     f"non-finite")
  return d


def paired_interval(differences: Any, *, confidence: float = 0.95) -> Interval:
  """The confidence interval of the mean of seed-paired differences.

  Args:
    differences: [S] per-seed differences (t interval over seeds, S - 1 degrees
      of freedom) or [S, N] per-seed, per-example differences (the interval
      over seeds and examples of the module docstring).
    confidence: the interval's level, in (0, 1).
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence: expected a level in (0, 1), got {confidence}")
  d = _checked(differences)
  num_seeds = d.shape[0]
  per_seed = d.mean(axis=1) if d.ndim == 2 else d
  seed_term = per_seed.var(ddof=1) / num_seeds
  if d.ndim == 1:
    variance, df, num_examples = seed_term, float(num_seeds - 1), 0
  else:
    num_examples = d.shape[1]
    example_term = d.mean(axis=0).var(ddof=1) / num_examples
    variance = seed_term + example_term
    denominator = seed_term ** 2 / (num_seeds - 1) + example_term ** 2 / (num_examples - 1)
    df = float(variance ** 2 / denominator) if denominator > 0 else float(num_seeds - 1)
  half = float(scipy_stats.t.ppf(0.5 + confidence / 2, df)) * float(np.sqrt(variance))
  mean = float(d.mean())
  return Interval(mean=mean, low=mean - half, high=mean + half, confidence=confidence,
                  num_seeds=num_seeds, num_examples=num_examples,
                  seed_std=float(per_seed.std(ddof=1)), df=df)


def paired_difference(a: Any, b: Any, *, confidence: float = 0.95) -> Interval:
  """`paired_interval(a - b)` for the metrics (or outcomes) of two methods, row s
  of each from training seed s ([S] or [S, N], N the same test examples)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired_difference: expected equal shapes (seeds, examples), got "
                     f"{a.shape} and {b.shape}")
  return paired_interval(a - b, confidence=confidence)


def verdict(interval: Interval, *, effect: float, kind: str = IMPROVES) -> str:
  """The verdict on a claim from its interval (see the module docstring).

  Args:
    interval: the interval of the claimed difference (positive: as claimed).
    effect: the claim's minimal effect delta, >= 0.
    kind: IMPROVES ("A is better than B by at least delta") or EQUIVALENT
      ("A does not change B by delta or more").
  """
  if not effect >= 0:
    raise ValueError(f"effect: expected a minimal effect >= 0, got {effect}")
  if kind == IMPROVES:
    if interval.low > effect:
      return REPRODUCED
    return CONTRADICTED if interval.high < 0 else INCONCLUSIVE
  if kind == EQUIVALENT:
    if -effect < interval.low and interval.high < effect:
      return REPRODUCED
    return CONTRADICTED if interval.low >= effect or interval.high <= -effect else INCONCLUSIVE
  raise ValueError(f"kind: expected one of {list(CLAIM_KINDS)}, got {kind!r}")


def spearman(x: Any, y: Any) -> float:
  """Spearman's rank correlation of two equal-length samples (ties averaged)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
    raise ValueError(f"spearman: expected two samples of equal length >= 3, got {x.shape} "
                     f"and {y.shape}")
  rx, ry = scipy_stats.rankdata(x), scipy_stats.rankdata(y)
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def spearman_interval(x: Any, y: Any, *, groups: Sequence[Any] | None = None,
                      confidence: float = 0.95, num_resamples: int = 4000,
                      seed: int = 0) -> Interval:
  """Spearman's correlation of (x, y) with a percentile bootstrap interval.

  Args:
    x, y: paired observations.
    groups: optional group label per observation (e.g. the modality pair of
      several seeds): the bootstrap resamples whole groups, since observations
      of one group are not independent. None: each observation is its own group.
    confidence, num_resamples, seed: the bootstrap's level, size and seed.
  Returns:
    An Interval whose `num_seeds` is the number of groups resampled.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  estimate = spearman(x, y)
  labels = np.arange(len(x)) if groups is None else np.asarray(groups)
  if labels.shape != x.shape:
    raise ValueError(f"groups: expected one label per observation ({len(x)}), got "
                     f"{labels.shape}")
  members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
  if len(members) < 3:
    raise ValueError(f"groups: expected >= 3 groups to resample, got {len(members)}")
  rng = np.random.default_rng(seed)
  draws = []
  for _ in range(num_resamples):
    rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
    draws.append(spearman(x[rows], y[rows]) if len(np.unique(rows)) >= 3 else np.nan)
  draws = np.asarray(draws)
  draws = draws[np.isfinite(draws)]
  tail = 50 * (1 - confidence)
  low, high = np.percentile(draws, [tail, 100 - tail])
  return Interval(mean=estimate, low=float(low), high=float(high), confidence=confidence,
                  num_seeds=len(members), num_examples=0, seed_std=float(draws.std(ddof=1)),
                  df=float("nan"))
