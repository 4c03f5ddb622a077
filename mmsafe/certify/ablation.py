r"""Modality-ablation certificate (MMCert-style) against changed input entries.

Wang et al., "MMCert: Provable Defense against Adversarial Attacks to
Multi-modal Models" (CVPR 2024). The ablated classifier of a base classifier
`f` keeps, for every modality m independently, a uniformly random subset of
`k_m` of its `n_m` entries and sets the others to 0 (the training mean in
mmsafe's normalised space, i.e. the "missing" value), then votes:

    g(x) = argmax_c P[f(A(x)) = c],    A = the random ablation.

Guarantee (MMCert's Theorem 1, in subset counts). There are
`N = prod_m C(n_m, k_m)` ablations, each with probability `1 / N`, so every
class probability is a multiple of `1 / N`: `p_c = N_c / N`, `N_c` the number
of ablations on which `f` votes c. Let an attacker change at most `r_m`
entries of modality m (any values: the l0 threat of the decoupling attack; a
missing modality is `r_m = n_m`). An ablation that keeps none of the changed
entries sees the same input before and after the change; exactly

    N s(r) = prod_m C(n_m - r_m, k_m),    s(r) = prod_m C(n_m - r_m, k_m) / C(n_m, k_m)

of them do (subsets independent across modalities), so at most
`D(r) = N (1 - s(r))` votes change: `N'_A >= N_A - D` and `N'_B <= N_B + D` for
every other class B. Given integers `a <= N_A` and `b >= N_B` for every
B != A, the vote cannot change while

    a - D(r) > b + D(r)    <=>    2 D(r) < a - b    <=>    s(r) > 1 - (a - b) / (2 N).

Estimation (`class_bounds`). `num_selection` votes choose the class A;
`num_samples` fresh votes, independent of them, bound `p_A` from below and
`p_B = max_{c != A} p_c` from above, by one of two rules chosen per example on
the selection votes (`choose_per_class`: the rule whose bounds at the selection
proportions give the larger gap; like the choice of A it depends on the
selection votes only, so each rule's guarantee holds conditionally on it):

* pair (Cohen et al.; Levine & Feizi's randomised ablation): the one-sided
  Clopper-Pearson bound `p_A >= p_lower` at level alpha, and
  `p_B <= 1 - p_A <= 1 - p_lower` (the other classes share at most the rest);
  one interval, so it holds with probability `>= 1 - alpha`.
* per class (the per-class bounds of MMCert, after Jia et al.'s "Certified
  robustness for top-k predictions", ICLR 2020): one-sided Clopper-Pearson
  bounds at level `alpha / 2`, `p_A >= p_lower` and `p_c <= u_c` for every
  class c != A, and `p_upper = min(max_{c != A} u_c, 1 - p_lower)`. Bonferroni
  over the two classes the argument uses: A and the runner-up
  `B* = argmax_{c != A} p_c`, unknown but fixed (not chosen from the votes).
  By the union bound `P[p_A < p_lower or p_B* > u_B*] <= alpha / 2 + alpha / 2`,
  and outside that event every c != A has `p_c <= p_B* <= u_B* <= max u_c` and
  `p_c <= 1 - p_A <= 1 - p_lower`. Taking the largest `u_c` (the runner-up's by
  count) covers B* without knowing it, so no interval per class is needed:
  splitting alpha over all K classes (simultaneous intervals for every class)
  is also sound, and looser for K > 2. The second bound of the min never
  binds in exact arithmetic (`N_c <= n - N_A`, `u_c` grows with the count and
  at one level `u(n - k) = 1 - lower(k)`); it guards the quantiles' float
  rounding. This rule certifies more when the other classes share the rest
  (it can certify with `p_A < 1/2`) and a little less when the votes are nearly
  unanimous or K = 2 (`alpha / 2` instead of alpha), which the choice on the
  selection votes avoids.

Rounding (`round_bounds`). `p_A >= p_lower` implies `N_A >= a = ceil(N p_lower)`
and `p_B <= p_upper` implies `N_B <= b = floor(N p_upper)`, so the condition
above holds with these integers. (`2 D(r)` is an integer, so rounding the gap
alone certifies nothing more: `2 D < N gap <=> 2 D < ceil(N gap)`; rounding the
two bounds apart gains up to one subset of margin, `a - b <= ceil(N gap) + 1`.)
`certified_counts` takes `gap = (a - b) / N` and recovers `a - b = ceil(N gap)`.
With probability `>= 1 - alpha` over the votes, a non-abstained prediction is
`g(x)` and every certified change keeps it.

Float safety: up to `N = 2^32` the counts are integers evaluated exactly in
float64, after a slack of `1e-4` subsets that absorbs the error of `N p` and of
the quantiles. Beyond it (e.g. `C(4000, 80)` has 169 digits) a rounded bound
moves by less than `1 / N < 2.4e-10`, below the `1e-9` slack the log-space test
`log s(r) > log(1 - gap / 2)` keeps against float error, so the rounding is
skipped there: a no-op, and leaving out a tightening is safe.

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
from mmsafe import programs
from mmsafe.certify import votes
from mmsafe.certify.ablation_votes import class_bounds, choose_per_class
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
    gap: the certified lower bound of `p_A - p_B`, `p_lower - p_upper`.
    p_lower: the lower bound of `p_A` (Clopper-Pearson, rounded up to a multiple
      of `1 / N` where `N <= 2^32`; module docstring).
    p_upper: the upper bound of every other class's probability (rounded down
      likewise).
    per_class: whether the bounds are per class (Bonferroni over A and the
      runner-up) rather than the pair `p_A`, `1 - p_A` (`choose_per_class`).
    correct: `prediction == label` (never for an abstention).
    keep: modality -> entries kept per ablation `k_m`; sizes: modality -> `n_m`.
    num_samples, alpha: the estimation's sample count and failure probability.
  """

  prediction: np.ndarray
  per_modality: dict[str, np.ndarray]
  total: np.ndarray
  gap: np.ndarray
  p_lower: np.ndarray
  p_upper: np.ndarray
  per_class: np.ndarray
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


def parse_keep(spec: str | Mapping[str, int]) -> dict[str, int]:
  """modality -> `k_m` from `"audio:40,visual:2"` (or a mapping, returned as a
  dict); ValueError naming the malformed item. Ranges: `check_keep`."""
  if isinstance(spec, Mapping):
    return dict(spec)
  keep = {}
  for item in str(spec).split(","):
    name, sep, count = item.strip().partition(":")
    if not sep or not name or not count.strip().lstrip("-").isdigit():
      raise ValueError(f"keep: expected 'modality:count' items separated by commas (e.g. "
                       f"'audio:40,visual:2'), got {item!r} in {spec!r}")
    keep[name.strip()] = int(count)
  return keep


def keep_label(keep: Mapping[str, int]) -> str:
  """`"audio:40,visual:2"`: the inverse of `parse_keep`, modalities sorted."""
  return ",".join(f"{m}:{keep[m]}" for m in sorted(keep))


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


def num_subsets(sizes: Mapping[str, int], keep: Mapping[str, int]) -> int:
  """`N = prod_m C(n_m, k_m)`, the number of equally likely ablations (exact)."""
  keep = check_keep(keep, sizes)
  return math.prod(math.comb(sizes[m], keep[m]) for m in sorted(sizes))


@functools.lru_cache(maxsize=programs.MAX_PROGRAMS)
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


# Up to this many ablations the certificate is evaluated in integer subset
# counts, exact in float64; beyond it rounding to multiples of 1 / N is a no-op
# (module docstring).
_EXACT_SUBSETS = 2 ** 32
# Slack in subsets: absorbs the float error of `N p` (< 2^-20 for N <= 2^32) and
# of the Clopper-Pearson quantiles before they are rounded to integers.
_COUNT_SLACK = 1e-4
# Slack on the log scale so that float rounding never certifies a boundary case
# `s(r) = 1 - gap / 2` (a tie of p'_A and p'_B) for N > 2^32.
_LOG_SLACK = 1e-9


def round_bounds(p_lower: np.ndarray, p_upper: np.ndarray, subsets: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`(ceil(N p_lower) / N, floor(N p_upper) / N)` for `N = subsets` ablations
  (`num_subsets`): still bounds, as every class probability is a multiple of
  `1 / N`; unchanged for `N > 2^32` (module docstring)."""
  subsets = checks.check_integer(subsets, "subsets", 1)
  p_lower, p_upper = np.asarray(p_lower, np.float64), np.asarray(p_upper, np.float64)
  if subsets > _EXACT_SUBSETS:
    return p_lower, p_upper
  lower = np.ceil(p_lower * subsets - _COUNT_SLACK) / subsets
  upper = np.floor(p_upper * subsets + _COUNT_SLACK) / subsets
  return np.clip(lower, 0.0, 1.0), np.clip(upper, 0.0, 1.0)


def _survivors(size: int, keep: int, changed: np.ndarray | int, exact: bool) -> np.ndarray:
  """float64, for `r = changed`: `C(n - r, k)`, the `k`-subsets of `n` entries
  missing `r` given ones (exact: integers <= 2^32), or `log s = log C(n - r, k)
  / C(n, k)` when not `exact`."""
  if not exact:
    return log_survival(size, keep, changed)
  table = np.array([math.comb(size - r, keep) for r in range(size + 1)], np.float64)
  return table[np.asarray(changed)]


def _combine(exact: bool) -> np.ufunc:
  """How survivors combine over modalities: the product of the counts (the
  ablations missing every changed entry) or the sum of the logs (`log s`)."""
  return np.multiply if exact else np.add


def _profile(size: int, keep: int, exact: bool) -> np.ndarray:
  """`_survivors` for `r = 0, 1, ...` up to the first `r` with `s_m(r) <= 1/2`
  (no gap certifies that many changes)."""
  values = _survivors(size, keep, np.arange(size - keep + 2), exact)
  last = int(np.argmax(values <= (values[0] / 2 if exact else np.log(0.5))))
  return values[:last + 1]


def _alone_profile(sizes: Mapping[str, int], keep: Mapping[str, int], modality: str,
                   exact: bool) -> np.ndarray:
  """`_profile` of `modality` combined with the other modalities untouched."""
  others = [_survivors(sizes[m], keep[m], 0, exact) for m in sorted(sizes) if m != modality]
  return functools.reduce(_combine(exact), others, _profile(sizes[modality], keep[modality],
                                                             exact))


def _joint_profile(sizes: Mapping[str, int], keep: Mapping[str, int], exact: bool
                   ) -> np.ndarray:
  """`min_{sum_m r_m = T}` of the combined survivors for `T = 0, 1, ...`
  (min-product / min-plus convolution of the modalities' profiles; beyond their
  ends `s <= 1/2`, so they end there)."""
  combine = _combine(exact)
  joint = np.ones(1) if exact else np.zeros(1)
  for m in sorted(sizes):
    profile = _profile(sizes[m], keep[m], exact)
    out = np.full(len(joint) + len(profile) - 1, np.inf)
    for r, value in enumerate(profile):
      out[r:r + len(joint)] = np.minimum(out[r:r + len(joint)], combine(joint, value))
    joint = out
  return joint


def _threshold(gap: np.ndarray, subsets: int) -> np.ndarray:
  """What the combined survivors must exceed for `gap` [B] (+inf where nothing is
  certified): `N - M / 2` with `M = ceil(N gap)` the certified integer margin
  (`2 D(r) < M`) where `N <= 2^32`, else `log(1 - gap / 2)` plus a slack."""
  if subsets <= _EXACT_SUBSETS:
    margin = np.ceil(gap * subsets - _COUNT_SLACK)
    return np.where(margin > 0, subsets - margin / 2.0, np.inf)
  return np.where(gap > 0, np.log1p(-np.clip(gap, 0.0, 1.0) / 2.0) + _LOG_SLACK, np.inf)


def _largest_below(profile: np.ndarray, threshold: np.ndarray) -> np.ndarray:
  """int [B]: the last index before the first entry of `profile` that does not
  exceed `threshold` (0 where even the first does not; every profile ends at
  `s <= 1/2`, below any threshold)."""
  fails = profile[None, :] <= threshold[:, None]
  return np.maximum(np.argmax(fails, axis=1) - 1, 0)


def _check_gap(gap: np.ndarray) -> np.ndarray:
  """float64 [B]; ValueError naming `gap` unless finite and in [-1, 1]."""
  gap = np.atleast_1d(np.asarray(gap, np.float64))
  if not np.all(np.isfinite(gap)) or np.any(np.abs(gap) > 1.0):
    raise ValueError(f"gap: expected certified lower bounds of p_A - p_B, finite and in "
                     f"[-1, 1], got {gap!r}")
  return gap


def certified_counts(gap: np.ndarray, sizes: Mapping[str, int], keep: Mapping[str, int]
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """`(per_modality, total)`: certified numbers of changed entries for class
  probability gaps `p_A - p_B` [B] (exact or certified lower bounds; MMCert's
  Theorem 1, module docstring). Both are 0 where `gap <= 0`. Where `N <= 2^32`
  the test `2 D(r) < ceil(N gap)` is exact in integer subset counts (the true
  gap is a multiple of `1 / N`), else `s(r) > 1 - gap / 2` in log space."""
  keep = check_keep(keep, sizes)
  gap = _check_gap(gap)
  subsets = num_subsets(sizes, keep)
  exact = subsets <= _EXACT_SUBSETS
  threshold = _threshold(gap, subsets)
  per_modality = {m: _largest_below(_alone_profile(sizes, keep, m, exact), threshold)
                  for m in sorted(sizes)}
  return per_modality, _largest_below(_joint_profile(sizes, keep, exact), threshold)


def _check_changed(value: np.ndarray, field: str, size: int) -> np.ndarray:
  """int [B] numbers of changed entries; ValueError naming `field` unless they
  are integers in `[0, size]` (the certificate covers nothing else)."""
  changed = np.asarray(value)
  if (not np.issubdtype(changed.dtype, np.integer) or np.any(changed < 0)
      or np.any(changed > size)):
    raise ValueError(f"{field}: expected numbers of changed entries, integers in [0, {size}] "
                     f"(the ablation certificate covers changed entries, not an l2 or other "
                     f"norm radius), got {value!r}")
  return changed


def certifies(certificate: AblationCertificate, changed: Mapping[str, np.ndarray]
              ) -> np.ndarray:
  """bool [B]: changing `changed[m]` entries of each modality m ([B] integer
  counts in `[0, n_m]`; absent modalities unchanged) is certified not to change
  the vote."""
  sizes, keep = certificate.sizes, certificate.keep
  unknown = sorted(set(changed) - set(sizes))
  if unknown:
    raise ValueError(f"changed: unknown modalities {unknown}; expected a subset of "
                     f"{sorted(sizes)}")
  changed = {m: _check_changed(changed[m], f"changed[{m!r}]", sizes[m]) for m in changed}
  subsets = num_subsets(sizes, keep)
  exact = subsets <= _EXACT_SUBSETS
  survivors = functools.reduce(_combine(exact), [
      _survivors(sizes[m], keep[m], changed.get(m, 0), exact) for m in sorted(sizes)])
  threshold = _threshold(np.asarray(certificate.gap, np.float64), subsets)
  return (certificate.prediction != ABSTAIN) & (survivors > threshold)


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
      `mmsafe.certify.smoothing.certify`; the selection votes also choose the
      bounds (`choose_per_class`), the estimation votes give them
      (`class_bounds`, `round_bounds`).

  Returns:
    An `AblationCertificate`; with probability `>= 1 - alpha` its
    non-abstained predictions and certified counts hold (module docstring).

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
  selection = count(select_key, num_samples=num_selection,
                    progress=progress and f"{progress} (select)")
  chosen = np.argmax(selection, axis=1)
  per_class = choose_per_class(selection, chosen, num_samples, alpha)
  counts = count(estimate_key, num_samples=num_samples, progress=progress)
  p_lower, p_upper = round_bounds(*class_bounds(counts, chosen, alpha, per_class),
                                  num_subsets(sizes, keep))
  gap = p_lower - p_upper
  per_modality, total = certified_counts(gap, sizes, keep)
  prediction = np.where(gap > 0, chosen, ABSTAIN)
  return AblationCertificate(prediction=prediction, per_modality=per_modality, total=total,
                             gap=gap, p_lower=p_lower, p_upper=p_upper, per_class=per_class,
                             correct=prediction == labels, keep=keep, sizes=sizes,
                             num_samples=num_samples, alpha=alpha)
