r"""Modality-ablation certificate (MMCert-style) against changed input entries.

Wang et al., "MMCert: Provable Defense against Adversarial Attacks to
Multi-modal Models" (CVPR 2024). The ablated classifier of a base classifier
`f` keeps, for every modality m independently, a uniformly random subset of
`k_m` of its `n_m` entries and sets the others to 0 (the training mean in
mmsafe's normalised space, i.e. the "missing" value), then votes:

    g(x) = argmax_c P[f(A(x)) = c],    A = the random ablation.

Guarantee (the derivation). Let an attacker change at most `r_m` entries of
modality m (any values: the l0 threat of the decoupling attack; a missing
modality is `r_m = n_m`). A subset that contains none of the changed entries
of any modality sees the same ablated input before and after the change, and
it occurs with probability

    s(r) = prod_m C(n_m - r_m, k_m) / C(n_m, k_m)

(subsets independent across modalities). So every class probability moves
by at most `delta(r) = 1 - s(r)`: `p'_A >= p_A - delta` and
`p'_B <= p_B + delta` for every other class B, and the vote cannot change while

    p_A - p_B > 2 delta(r)    <=>    s(r) > 1 - (p_A - p_B) / 2.

With Monte-Carlo votes (Cohen et al.'s CERTIFY, `mmsafe.certify.votes`),
`p_A` is replaced by its Clopper-Pearson lower bound at `1 - alpha` and
`p_B` by `1 - p_A_lower` (the other classes share at most the rest), so the
guarantee holds with probability at least `1 - alpha`. (MMCert also bounds
`p_B` by its own interval and rounds the bounds to multiples of
`1 / prod_m C(n_m, k_m)`; both only tighten it and are left out.)

Reported counts: `per_modality[m]`, the largest `r_m` certified with the other
modalities untouched; `total`, the largest `T` such that *every* split
`sum_m r_m = T` is certified (the decoupling attack's joint budget). `s` is
non-increasing in every `r_m`, so a certified split certifies every smaller one.
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from mmsafe import checks
from mmsafe.certify import votes
from mmsafe.certify.votes import ABSTAIN

Array = jax.Array
Inputs = Mapping[str, Array]


@flax.struct.dataclass
class AblationCertificate:
  """CERTIFY's result for a batch with the ablation (arrays [B], numpy).

  Attributes:
    prediction: the voted class `c_A`, or `ABSTAIN` (-1).
    per_modality: modality -> the largest number of changed entries of that
      modality alone that cannot change the vote (0 when abstaining).
    total: the largest number of changed entries, spread over the modalities
      in any way, that cannot change the vote (0 when abstaining).
    gap: the certified lower bound of `p_A - p_B` (`2 p_A_lower - 1`).
    p_lower: the Clopper-Pearson lower bound of `p_A`.
    correct: `prediction == label` (never for an abstention).
    keep: modality -> entries kept per ablation `k_m`; sizes: modality -> `n_m`.
    num_samples, alpha: the estimation's sample count and failure probability.
  """

  prediction: np.ndarray
  per_modality: dict[str, np.ndarray]
  total: np.ndarray
  gap: np.ndarray
  p_lower: np.ndarray
  correct: np.ndarray
  keep: dict[str, int] = flax.struct.field(pytree_node=False)
  sizes: dict[str, int] = flax.struct.field(pytree_node=False)
  num_samples: int = flax.struct.field(pytree_node=False)
  alpha: float = flax.struct.field(pytree_node=False)


def entry_counts(inputs: Inputs) -> dict[str, int]:
  """modality -> `n_m`, the number of entries of one example."""
  return {m: int(np.prod(v.shape[1:])) for m, v in sorted(inputs.items())}


def keep_counts(sizes: Mapping[str, int], fraction: float) -> dict[str, int]:
  """modality -> `k_m = max(1, floor(fraction n_m))` entries kept, fraction in (0, 1]."""
  fraction = checks.check_number(fraction, "fraction", 0.0, inclusive=False, maximum=1.0)
  return {m: max(1, math.floor(fraction * n)) for m, n in sorted(sizes.items())}


def check_keep(keep: Mapping[str, int], sizes: Mapping[str, int]) -> dict[str, int]:
  """modality -> `k_m` checked: an integer in `[1, n_m]` for exactly the
  modalities of `sizes`; ValueError naming `keep[m]` otherwise."""
  if sorted(keep) != sorted(sizes):
    raise ValueError(f"keep: expected a subset size per modality {sorted(sizes)}, got "
                     f"{sorted(keep)}")
  out = {}
  for m in sorted(sizes):
    k = checks.check_integer(keep[m], f"keep[{m!r}]", 1)
    if k > sizes[m]:
      raise ValueError(f"keep[{m!r}]: expected a subset size <= {sizes[m]} (the entries of "
                       f"modality {m!r}), got {k}")
    out[m] = k
  return out


@functools.lru_cache(maxsize=64)
def ablation(keep: tuple[tuple[str, int], ...]) -> votes.Transform:
  """The transform keeping a uniformly random subset of exactly `k_m` entries of
  every example's modality m (0 elsewhere), independently per modality and
  example, for sorted `(modality, k_m)` pairs (cached: programs compile once)."""
  sizes = dict(keep)

  def transform(key: Array, inputs: dict[str, Array]) -> dict[str, Array]:
    keys = jax.random.split(key, len(sizes))
    out = dict(inputs)
    for k, m in zip(keys, sorted(sizes)):
      x = inputs[m]
      flat = x.reshape(x.shape[0], -1)
      _, index = jax.lax.top_k(jax.random.uniform(k, flat.shape), sizes[m])
      rows = jnp.arange(flat.shape[0])[:, None]
      kept = jnp.zeros(flat.shape, bool).at[rows, index].set(True)
      out[m] = jnp.where(kept, flat, jnp.zeros((), x.dtype)).reshape(x.shape)
    return out

  return transform


def log_survival(size: int, keep: int, changed: np.ndarray) -> np.ndarray:
  """`log C(n - r, k) / C(n, k)` for `r = changed` (-inf where `n - r < k`): the
  log-probability that a random `k`-subset of `n` entries misses `r` given ones."""
  r = np.asarray(changed, np.float64)
  inside = size - r >= keep
  rs = np.where(inside, r, 0.0)
  value = (special.gammaln(size - rs + 1) - special.gammaln(size - rs - keep + 1)
           - special.gammaln(size + 1) + special.gammaln(size - keep + 1))
  return np.where(inside, np.minimum(value, 0.0), -np.inf)


# Slack on the log scale so that float rounding never certifies a boundary case
# `s(r) = 1 - gap / 2` (a tie of p'_A and p'_B).
_LOG_SLACK = 1e-9


def _log_threshold(gap: np.ndarray) -> np.ndarray:
  """`log(1 - gap / 2)` (plus a rounding slack): `s(r)` must exceed it (+inf where
  `gap <= 0`: nothing certified)."""
  gap = np.asarray(gap, np.float64)
  return np.where(gap > 0, np.log1p(-np.clip(gap, 0.0, 1.0) / 2.0) + _LOG_SLACK, np.inf)


def _profile(size: int, keep: int) -> np.ndarray:
  """`log s_m(r)` for `r = 0, 1, ...` up to the first `r` with `s_m(r) <= 1/2`
  (no gap certifies that many changes)."""
  r = np.arange(size - keep + 2)
  values = log_survival(size, keep, r)
  last = int(np.argmax(values <= np.log(0.5)))
  return values[:last + 1]


def _joint_profile(sizes: Mapping[str, int], keep: Mapping[str, int]) -> np.ndarray:
  """`min_{sum_m r_m = T} log s(r)` for `T = 0, 1, ...` (min-plus convolution of the
  modalities' profiles; beyond their ends `s <= 1/2`, so they end there)."""
  joint = np.zeros(1)
  for m in sorted(sizes):
    profile = _profile(sizes[m], keep[m])
    out = np.full(len(joint) + len(profile) - 1, np.inf)
    for r, value in enumerate(profile):
      out[r:r + len(joint)] = np.minimum(out[r:r + len(joint)], joint + value)
    joint = out
  return joint


def _largest_below(profile: np.ndarray, log_threshold: np.ndarray) -> np.ndarray:
  """int [B]: the last index before the first entry of `profile` that does not
  exceed `log_threshold` (0 where even the first does not; every profile ends
  at `s <= 1/2`, below any threshold)."""
  fails = profile[None, :] <= log_threshold[:, None]
  return np.maximum(np.argmax(fails, axis=1) - 1, 0)


def certified_counts(gap: np.ndarray, sizes: Mapping[str, int], keep: Mapping[str, int]
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`(per_modality, total)`: certified numbers of changed entries for class
  probability gaps `p_A - p_B` [B] (exact or certified lower bounds; module
  docstring). Both are 0 where `gap <= 0`."""
  keep = check_keep(keep, sizes)
  threshold = _log_threshold(gap)
  per_modality = {m: _largest_below(_profile(sizes[m], keep[m]), threshold) for m in sizes}
  return per_modality, _largest_below(_joint_profile(sizes, keep), threshold)


def certifies(certificate: AblationCertificate, changed: Mapping[str, np.ndarray]
              ) -> np.ndarray:
  """bool [B]: changing `changed[m]` entries of each modality m ([B] counts;
  absent modalities unchanged) is certified not to change the vote."""
  unknown = sorted(set(changed) - set(certificate.sizes))
  if unknown:
    raise ValueError(f"changed: unknown modalities {unknown}; expected a subset of "
                     f"{sorted(certificate.sizes)}")
  log_s = sum(log_survival(certificate.sizes[m], certificate.keep[m], changed[m])
              for m in changed)
  return (certificate.prediction != ABSTAIN) & (log_s > _log_threshold(certificate.gap))


def certify(logits_fn, inputs: Inputs, labels, keep: Mapping[str, int], key: Array, *,
            num_selection: int = 100, num_samples: int = 1000, alpha: float = 0.001,
            chunk_size: int = 100, progress: str | None = None) -> AblationCertificate:
  """CERTIFY (Cohen et al. 2019) with random ablation (MMCert, Wang et al. 2024).

  Args:
    logits_fn: the base classifier, dict modality -> [B, ...] to logits [B, K]
      (reuse one function object: programs are cached on it).
    inputs: modality -> float [B, ...] (normalised space); labels: int [B].
    keep: modality -> `k_m`, entries kept per ablation, in `[1, n_m]`
      (`keep_counts` from a fraction).
    key: PRNG key; the result is a function of it.
    num_selection, num_samples, alpha, chunk_size, progress: as
      `mmsafe.certify.smoothing.certify`.

  Returns:
    An `AblationCertificate`.

  A host driver (not jit-able) over one jitted program per chunk of votes; pure
  given `key`.

  Raises:
    ValueError for a subset size outside `[1, n_m]` or missing modalities,
    `num_samples` too small to ever certify at `alpha`, alpha outside
    (0, 1/2], non-finite inputs, or labels out of range.
  """
  if not isinstance(inputs, Mapping) or not inputs:
    raise ValueError(f"inputs: expected a non-empty dict modality -> [B, ...], got {inputs!r}")
  sizes = entry_counts(inputs)
  keep = check_keep(keep, sizes)
  votes.check_confidence(num_samples, alpha, "num_samples")
  checks.check_integer(num_selection, "num_selection", 1)
  checks.check_finite_inputs(inputs)
  batch = next(iter(inputs.values())).shape[0]
  checks.check_nonempty(batch)
  num_classes = jax.eval_shape(logits_fn, {m: jnp.asarray(v[:1]) for m, v in inputs.items()}
                               ).shape[-1]
  labels = np.asarray(labels)
  checks.check_labels(labels, num_classes, batch_size=batch)
  transform = ablation(tuple(sorted(keep.items())))
  select_key, estimate_key = jax.random.split(key)
  count = functools.partial(votes.vote_counts, logits_fn, transform, inputs,
                            chunk_size=chunk_size, num_classes=num_classes)
  chosen = np.argmax(count(select_key, num_samples=num_selection,
                           progress=progress and f"{progress} (select)"), axis=1)
  counts = count(estimate_key, num_samples=num_samples, progress=progress)
  p_lower = votes.clopper_pearson_lower(counts[np.arange(batch), chosen], num_samples, alpha)
  gap = 2.0 * p_lower - 1.0
  per_modality, total = certified_counts(gap, sizes, keep)
  prediction = np.where(gap > 0, chosen, ABSTAIN)
  return AblationCertificate(prediction=prediction, per_modality=per_modality, total=total,
                             gap=gap, p_lower=p_lower, correct=prediction == labels, keep=keep,
                             sizes=sizes, num_samples=num_samples, alpha=alpha)
