"""Monte-Carlo votes of a base classifier under random input transforms, and the
binomial bounds that turn vote counts into guarantees.

Shared by randomized smoothing (`mmsafe.certify.smoothing`: Gaussian noise)
and the modality-ablation certificate (`mmsafe.certify.ablation`: random
subsets of entries kept). Both are instances of the same recipe (Cohen,
Rosenfeld & Kolter, ICML 2019, Sec. 3.2, CERTIFY / PREDICT):

* `vote_counts`: `counts[b, c]` = how many of `num_samples` random
  transforms `T_s(x_b)` the base classifier labels `c`. Sample `s` uses the
  key `fold_in(key, s)`, so the counts are a function of `key` alone (not of
  the chunk size). Samples are drawn and classified in chunks of
  `chunk_size` inside one jitted program per (logits_fn, transform, chunk
  size); the loop over chunks runs on the host with an optional tqdm bar.
* `clopper_pearson_lower`: the one-sided `(1 - alpha)` Clopper-Pearson lower
  bound of a binomial proportion (Cohen et al.'s `LowerConfBound`).
* `binomial_test_pvalue`: the two-sided p-value of `n_A` successes out of
  `n_A + n_B` against 1/2, and `decide`, Cohen et al.'s PREDICT from counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from mmsafe import checks, programs

Array = jax.Array
Inputs = Mapping[str, Array]
# (key of one sample, inputs [B, ...]) -> transformed inputs [B, ...]
Transform = Callable[[Array, dict[str, Array]], dict[str, Array]]
ABSTAIN = -1


def check_confidence(num_samples: int, alpha: float, field: str = "num_samples") -> None:
  """ValueError naming `field` when `num_samples` votes cannot reach a lower bound
  above 1/2 at confidence `1 - alpha`: even `num_samples` out of
  `num_samples` gives `alpha^(1/n) <= 1/2`, so nothing could be certified."""
  checks.check_number(alpha, "alpha", 0.0, inclusive=False, maximum=0.5)
  checks.check_integer(num_samples, field, 1)
  if alpha ** (1.0 / num_samples) <= 0.5:
    needed = math.floor(math.log2(1.0 / alpha)) + 1
    raise ValueError(f"{field}: expected at least {needed} samples for confidence "
                     f"1 - alpha = {1 - alpha:g} (with fewer the bound cannot exceed 1/2 and "
                     f"nothing can be certified), got {num_samples}")


def clopper_pearson_lower(successes: np.ndarray, trials: int, alpha: float) -> np.ndarray:
  """One-sided `(1 - alpha)` Clopper-Pearson lower bound of a binomial proportion:
  the `alpha` quantile of Beta(k, n - k + 1), 0 for k = 0 (float64, host)."""
  successes = np.asarray(successes, np.float64)
  safe = np.maximum(successes, 1.0)
  bound = stats.beta.ppf(alpha, safe, trials - safe + 1.0)
  return np.where(successes > 0, bound, 0.0)


def binomial_test_pvalue(n_a: np.ndarray, n_b: np.ndarray) -> np.ndarray:
  """Two-sided p-value of `n_a` successes in `n_a + n_b` Bernoulli(1/2) trials
  (exact; symmetric, so `min(1, 2 P[X <= min(n_a, n_b)])`)."""
  n_a, n_b = np.asarray(n_a), np.asarray(n_b)
  return np.minimum(1.0, 2.0 * stats.binom.cdf(np.minimum(n_a, n_b), n_a + n_b, 0.5))


def decide(counts: np.ndarray, alpha: float) -> np.ndarray:
  """int [B]: PREDICT's decision from vote counts [B, K]: the top class when the
  binomial test of the top two counts rejects 1/2 at `alpha`, else `ABSTAIN`."""
  order = np.argsort(-counts, axis=1, kind="stable")
  rows = np.arange(counts.shape[0])
  n_a, n_b = counts[rows, order[:, 0]], counts[rows, order[:, 1]]
  return np.where(binomial_test_pvalue(n_a, n_b) <= alpha, order[:, 0], ABSTAIN)


def _chunk_counts(logits_fn, transform: Transform, chunk_size: int, num_classes: int,
                  inputs: dict[str, Array], key: Array, start: Array, num_samples: Array
                  ) -> Array:
  """int32 [B, K]: votes of samples `start .. start + chunk_size - 1` (those
  below `num_samples`), sample `s` transformed with key `fold_in(key, s)`."""
  index = start + jnp.arange(chunk_size)
  transformed = jax.vmap(lambda s: transform(jax.random.fold_in(key, s), inputs))(index)
  batch = next(iter(inputs.values())).shape[0]
  flat = {m: v.reshape((chunk_size * batch,) + v.shape[2:]) for m, v in transformed.items()}
  labels = jnp.argmax(logits_fn(flat), axis=-1).reshape(chunk_size, batch)
  votes = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)
  return jnp.sum(votes * (index < num_samples)[:, None, None].astype(jnp.int32), axis=0)


def vote_counts(logits_fn, transform: Transform, inputs: Inputs, key: Array, *,
                num_samples: int, chunk_size: int, num_classes: int,
                progress: str | None = None) -> np.ndarray:
  """int64 [B, K]: how often the base classifier `argmax logits_fn` labels
  `transform(fold_in(key, s), inputs)` with each class, `s < num_samples`.

  `logits_fn` and `transform` key the compiled program by identity (reuse
  them across calls to compile once). `progress`: a tqdm description (None:
  no bar)."""
  checks.check_integer(num_samples, "num_samples", 1)
  chunk_size = min(checks.check_integer(chunk_size, "chunk_size", 1), num_samples)
  program = programs.compiled(_chunk_counts, logits_fn, transform, chunk_size, num_classes)
  inputs = {m: jnp.asarray(v) for m, v in inputs.items()}
  batch = next(iter(inputs.values())).shape[0]
  counts = np.zeros((batch, num_classes), np.int64)
  starts = range(0, num_samples, chunk_size)
  bar = tqdm(starts, desc=progress, unit="chunk", leave=False, disable=progress is None)
  for start in bar:
    counts += np.asarray(program(inputs, key, jnp.int32(start), jnp.int32(num_samples)))
  return counts
