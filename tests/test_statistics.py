"""mmsafe.eval.statistics: intervals against scipy and against simulated coverage,
and every verdict coming out each way."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mmsafe.eval import statistics


def test_seed_interval_is_the_t_interval_of_the_paired_differences():
  a = np.array([0.71, 0.74, 0.69, 0.77, 0.72])
  b = np.array([0.70, 0.70, 0.70, 0.71, 0.69])
  interval = statistics.paired_difference(a, b)
  expected = scipy_stats.ttest_1samp(a - b, 0.0).confidence_interval(0.95)
  assert interval.mean == pytest.approx((a - b).mean())
  assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high))
  assert interval.df == 4 and interval.num_examples == 0
  assert interval.seed_std == pytest.approx((a - b).std(ddof=1))


def _simulate(rng, seeds, examples, sd_seed, sd_example, sd_noise):
  return (rng.normal(0, sd_seed, (seeds, 1)) + rng.normal(0, sd_example, (1, examples))
          + rng.normal(0, sd_noise, (seeds, examples)))


def test_two_way_interval_covers_the_population_mean_and_seeds_alone_do_not():
  """Differences drawn from mu + seed + example + noise (mu = 0): the interval
  over seeds and examples covers 0 at least 95% of the time; the t interval
  over the per-seed means alone misses the test split's sampling error."""
  rng = np.random.default_rng(0)
  trials, both, seeds_only = 1500, 0, 0
  for _ in range(trials):
    d = _simulate(rng, 5, 400, sd_seed=0.01, sd_example=0.3, sd_noise=0.3)
    interval = statistics.paired_interval(d)
    both += interval.low <= 0 <= interval.high
    per_seed = statistics.paired_interval(d.mean(axis=1))
    seeds_only += per_seed.low <= 0 <= per_seed.high
  assert both / trials >= 0.94
  assert seeds_only / trials < 0.85


def test_two_way_interval_matches_its_formula():
  rng = np.random.default_rng(1)
  d = _simulate(rng, 5, 50, 0.02, 0.1, 0.1)
  seed_term = d.mean(1).var(ddof=1) / 5
  example_term = d.mean(0).var(ddof=1) / 50
  df = (seed_term + example_term) ** 2 / (seed_term ** 2 / 4 + example_term ** 2 / 49)
  half = scipy_stats.t.ppf(0.975, df) * np.sqrt(seed_term + example_term)
  interval = statistics.paired_interval(d)
  assert interval.df == pytest.approx(df)
  assert (interval.low, interval.high) == pytest.approx((d.mean() - half, d.mean() + half))
  assert interval.num_seeds == 5 and interval.num_examples == 50


def _interval(low, high):
  return statistics.Interval(mean=(low + high) / 2, low=low, high=high, confidence=0.95,
                             num_seeds=5, num_examples=0, seed_std=0.0, df=4.0)


@pytest.mark.parametrize("low, high, expected", [
    (0.02, 0.05, statistics.REPRODUCED),  # wholly above the effect 0.01
    (0.005, 0.05, statistics.INCONCLUSIVE),  # above 0 but not above the effect
    (-0.01, 0.05, statistics.INCONCLUSIVE),
    (-0.05, -0.001, statistics.CONTRADICTED),  # wholly below 0
])
def test_improvement_verdicts(low, high, expected):
  assert statistics.verdict(_interval(low, high), effect=0.01) == expected


@pytest.mark.parametrize("low, high, expected", [
    (-0.005, 0.008, statistics.REPRODUCED),  # inside (-0.01, 0.01)
    (-0.005, 0.02, statistics.INCONCLUSIVE),
    (0.01, 0.04, statistics.CONTRADICTED),  # wholly above the effect: it does change
    (-0.04, -0.02, statistics.CONTRADICTED),
])
def test_equivalence_verdicts(low, high, expected):
  assert statistics.verdict(_interval(low, high), effect=0.01,
                            kind=statistics.EQUIVALENT) == expected


def test_spearman_and_its_grouped_bootstrap():
  rng = np.random.default_rng(2)
  x = rng.normal(size=30)
  y = x + rng.normal(scale=0.5, size=30)
  assert statistics.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)
  interval = statistics.spearman_interval(x, y, num_resamples=500)
  assert interval.low <= interval.mean <= interval.high and interval.low > 0.3
  # Resampling 15 groups of two (e.g. modality pairs x seeds) keeps groups whole.
  grouped = statistics.spearman_interval(x, y, groups=np.repeat(np.arange(15), 2),
                                         num_resamples=500)
  assert grouped.num_seeds == 15 and grouped.mean == interval.mean
  unrelated = statistics.spearman_interval(x, rng.normal(size=30), num_resamples=500)
  assert unrelated.low < 0 < unrelated.high


def test_bad_input_names_the_field():
  with pytest.raises(ValueError, match=r"differences: expected shape \[S >= 2\]"):
    statistics.paired_interval([0.1])
  with pytest.raises(ValueError, match="differences: expected finite values, got 1"):
    statistics.paired_interval([0.1, np.nan, 0.2])
  with pytest.raises(ValueError, match="confidence: expected a level in"):
    statistics.paired_interval([0.1, 0.2], confidence=95)
  with pytest.raises(ValueError, match="expected equal shapes"):
    statistics.paired_difference([0.1, 0.2], [0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="effect: expected a minimal effect >= 0, got -0.1"):
    statistics.verdict(_interval(0, 1), effect=-0.1)
  with pytest.raises(ValueError, match="kind: expected one of"):
    statistics.verdict(_interval(0, 1), effect=0.1, kind="better")
  with pytest.raises(ValueError, match="groups: expected >= 3 groups"):
    statistics.spearman_interval([1, 2, 3, 4], [1, 2, 3, 4], groups=[0, 0, 1, 1])
