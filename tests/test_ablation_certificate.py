"""The modality-ablation certificate: exact enumeration of the ablation votes on a
toy classifier (the certified counts withstand every change they cover), the
decoupling attack inside the certified counts, bad input, the ablated-input
objective; the certificate's arithmetic (per-class bounds, rounding to
multiples of 1 / N) against brute force on enumerable toys."""

import fractions
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmsafe import attacks, methods
from mmsafe.certify import ablation, ablation_votes, votes

SIZES = {"a": 6, "b": 5}
KEEP = {"a": 1, "b": 1}
W = {"a": np.array([[3.0, 0, 0], [2, 1, 0], [2, 0, 1], [1.5, 0, 1], [0.5, 1, 1], [0, 2, 0]]),
     "b": np.array([[1.0, 2, 0], [2, 0, 1], [0, 1, 0], [1, 0, 1], [0, 0, 1]])}


def toy_logits(x):
  """A linear 3-class classifier of the (ablated) entries."""
  return sum(np.asarray(x[m]) @ W[m] for m in sorted(x))


def jax_toy_logits(x):
  return sum(x[m] @ jnp.asarray(W[m], jnp.float32) for m in sorted(x))


def exact_probabilities(x):
  """[B, 3]: class probabilities of the ablated classifier, by enumerating all
  6 x 5 = 30 pairs of kept subsets."""
  counts = np.zeros((x["a"].shape[0], 3))
  subsets = {m: list(itertools.combinations(range(SIZES[m]), KEEP[m])) for m in SIZES}
  for sa, sb in itertools.product(subsets["a"], subsets["b"]):
    ablated = {}
    for m, kept in (("a", sa), ("b", sb)):
      mask = np.zeros(SIZES[m])
      mask[list(kept)] = 1.0
      ablated[m] = x[m] * mask
    counts[np.arange(len(counts)), np.argmax(toy_logits(ablated), 1)] += 1
  return counts / counts.sum(1, keepdims=True)


def changes(x, i, splits, values=(-10.0, 10.0)):
  """Every variant of example `i` with `(r_a, r_b)` in `splits` entries changed
  to any of `values`, as one batch."""
  out = {"a": [], "b": []}
  for ra, rb in splits:
    for pos_a, pos_b in itertools.product(itertools.combinations(range(SIZES["a"]), ra),
                                          itertools.combinations(range(SIZES["b"]), rb)):
      for new in itertools.product(values, repeat=ra + rb):
        a, b = x["a"][i].copy(), x["b"][i].copy()
        a[list(pos_a)], b[list(pos_b)] = new[:ra], new[ra:]
        out["a"].append(a)
        out["b"].append(b)
  return {m: np.stack(v) for m, v in out.items()}


def test_survival_is_the_enumerated_fraction_of_subsets_missing_the_changes():
  for n, k in ((6, 2), (5, 3)):
    subsets = list(itertools.combinations(range(n), k))
    for r in range(n + 1):
      missing = np.mean([not set(s) & set(range(r)) for s in subsets])
      np.testing.assert_allclose(np.exp(ablation.log_survival(n, k, r)), missing, atol=1e-12)


def test_enumerated_votes_certified_counts_withstand_every_change():
  rng = np.random.default_rng(0)
  x = {"a": np.abs(rng.normal(size=(12, 6))) + 1.0, "b": np.abs(rng.normal(size=(12, 5)))}
  p = exact_probabilities(x)
  top = np.sort(p, 1)
  gap, predicted = top[:, -1] - top[:, -2], np.argmax(p, 1)
  per_modality, total = ablation.certified_counts(gap, SIZES, KEEP)
  assert total.max() >= 1 and per_modality["a"].max() >= 1  # a non-trivial toy
  checked = 0
  for i in range(len(gap)):
    splits = {(ra, total[i] - ra) for ra in range(total[i] + 1) if total[i] - ra <= SIZES["b"]}
    splits |= {(per_modality["a"][i], 0), (0, per_modality["b"][i])}
    changed = changes(x, i, splits)
    assert np.all(np.argmax(exact_probabilities(changed), 1) == predicted[i]), i
    checked += len(changed["a"])
  assert checked > 100
  # Not vacuous: one changed entry more than some example's total flips its vote.
  flips = [np.any(np.argmax(exact_probabilities(changes(
      x, i, {(ra, total[i] + 1 - ra) for ra in range(total[i] + 2)})), 1) != predicted[i])
      for i in np.flatnonzero(total < 3)]
  assert any(flips)

  # Monte Carlo: the certified bound stays below the exact probability, and close.
  cert = ablation.certify(jax_toy_logits, {m: jnp.asarray(v, jnp.float32) for m, v in x.items()},
                          predicted,
                          KEEP, jax.random.PRNGKey(0), num_samples=4000, chunk_size=100)
  p_a = p[np.arange(len(p)), predicted]
  confident = cert.prediction >= 0
  np.testing.assert_array_equal(cert.prediction[confident], predicted[confident])
  assert np.all(cert.p_lower <= p_a) and np.all(cert.p_lower >= p_a - 0.05)
  assert np.all(cert.p_upper >= top[:, -2]) and np.all(cert.p_upper <= top[:, -2] + 0.05)
  # Rounded to multiples of 1 / 30: every class probability is one.
  np.testing.assert_allclose(cert.p_lower * 30, np.round(cert.p_lower * 30), atol=1e-9)
  np.testing.assert_allclose(cert.p_upper * 30, np.round(cert.p_upper * 30), atol=1e-9)
  assert np.all(cert.total <= total)  # p_lower - p_upper <= p_A - p_B


class Linear:
  """A model as the objectives call it (`apply(variables, inputs, train)` with
  `.logits`), linear on the concatenated modalities."""

  input_shapes = {"a": (60,), "b": (40,)}

  def apply(self, variables, inputs, train=False):
    del train
    x = jnp.concatenate([inputs["a"], inputs["b"]], -1)
    return types.SimpleNamespace(logits=x @ variables["params"]["w"])


@pytest.mark.slow
def test_decoupling_attack_never_breaks_the_certified_counts():
  # A linear matched filter of class templates: its ablated votes are confident.
  rng = np.random.default_rng(3)
  templates = {"a": np.sign(rng.normal(size=(3, 60))), "b": np.sign(rng.normal(size=(3, 40)))}
  labels = np.arange(24) % 3
  inputs = {m: jnp.asarray(t[labels] + 0.5 * rng.normal(size=(24, t.shape[1])), jnp.float32)
            for m, t in templates.items()}
  logits_fn = jax.jit(lambda x: sum(x[m] @ templates[m].T for m in sorted(x)))
  keep = {"a": 6, "b": 4}
  cert = ablation.certify(logits_fn, inputs, labels, keep, jax.random.PRNGKey(4),
                          num_samples=1000, chunk_size=100)
  transform = ablation.ablation(tuple(sorted(keep.items())))
  # The voter's expected logits, exact for a linear model: an entry of modality
  # m survives the ablation with probability k_m / n_m.
  surrogate = lambda x: logits_fn({m: x[m] * keep[m] / x[m].shape[1] for m in x})
  # `total` certifies every split, e.g. all changes in modality a.
  certified = cert.prediction >= 0
  assert np.all(ablation.certifies(cert, {"a": cert.total})[certified])
  budget = int(np.median(cert.total[certified]))
  chosen = certified & (cert.total >= budget)
  assert budget >= 2 and chosen.sum() >= 12
  target = jnp.asarray(np.where(certified, cert.prediction, labels))

  def flipped(count):
    adversarial, info = attacks.decoupling(surrogate, inputs, target, jax.random.PRNGKey(6),
                                           count=count, max_count=8 * budget, rounds=2,
                                           steps_per_round=5, max_change=5.0, return_info=True)
    assert np.all(np.asarray(info["changed"]) <= count)
    counts = votes.vote_counts(logits_fn, transform, adversarial, jax.random.PRNGKey(7),
                               num_samples=1000, chunk_size=100, num_classes=3)
    return chosen & (np.argmax(counts, 1) != cert.prediction)

  assert not np.any(flipped(budget))
  assert np.any(flipped(8 * budget))  # the attack has teeth beyond the certificate


def test_bad_input_is_refused_naming_the_argument():
  inputs = {"a": jnp.ones((2, 5)), "b": jnp.ones((2, 4))}
  logits_fn = lambda x: sum(x[m] @ jnp.asarray(W[m], jnp.float32) for m in sorted(x))
  labels = jnp.zeros(2, jnp.int32)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"keep\['b'\]: expected a subset size <= 4 \(the entries"):
    ablation.certify(logits_fn, inputs, labels, {"a": 2, "b": 5}, key)
  with pytest.raises(ValueError, match=r"keep\['a'\]: expected an integer >= 1, got 0"):
    ablation.certify(logits_fn, inputs, labels, {"a": 0, "b": 2}, key)
  with pytest.raises(ValueError, match=r"keep: expected a subset size per modality"):
    ablation.certify(logits_fn, inputs, labels, {"a": 2}, key)
  with pytest.raises(ValueError, match=r"num_samples: expected at least 7 samples"):
    ablation.certify(logits_fn, inputs, labels, KEEP, key, num_samples=6, alpha=0.01)
  with pytest.raises(ValueError, match=r"method_kwargs.ablation_keep_fraction"):
    methods.get("ablated")(Linear(), {"ablation_keep_fraction": 1.5})
  for spec, message in (("a:0,b:2", r"keep\['a'\]: expected an integer >= 1, got 0"),
                        ("a:61,b:2", r"keep\['a'\]: expected a subset size <= 60"),
                        ("a:3", r"keep: expected a subset size per modality \['a', 'b'\]"),
                        ("a3,b:2", r"keep: expected 'modality:count' items .* got 'a3'")):
    with pytest.raises(ValueError, match=r"method_kwargs.ablation_keep_counts: " + message):
      methods.get("ablated")(Linear(), {"ablation_keep_counts": spec,
                                        "ablation_keep_fraction": 0.2})
  # The certificate covers numbers of changed entries: an l2 radius, a negative
  # count or more entries than the modality has are refused, not answered.
  cert = types.SimpleNamespace(prediction=np.array([0]), gap=np.array([0.5]), sizes=SIZES,
                               keep=KEEP)
  for changed in (np.array([0.5]), np.array([-1]), np.array([7])):
    with pytest.raises(ValueError, match=r"changed\['a'\]: expected numbers of changed entries, "
                       r"integers in \[0, 6\] \(the ablation certificate covers changed "
                       r"entries, not an l2"):
      ablation.certifies(cert, {"a": changed})
  with pytest.raises(ValueError, match=r"changed: unknown modalities \['c'\]"):
    ablation.certifies(cert, {"c": np.array([1])})
  for gap in (1.5, np.nan):
    with pytest.raises(ValueError, match=r"gap: expected certified lower bounds of p_A - p_B, "
                       r"finite and in \[-1, 1\]"):
      ablation.certified_counts(np.array([gap]), SIZES, KEEP)
  counts, chosen = np.array([[8, 2, 0]]), np.array([0])
  with pytest.raises(ValueError, match=r"alpha: expected a finite number > 0 and <= 0.5"):
    ablation_votes.class_bounds(counts, chosen, 0.7)
  with pytest.raises(ValueError, match=r"counts: expected vote counts \[B, K\]"):
    ablation_votes.class_bounds(counts / 10, chosen, 0.01)
  with pytest.raises(ValueError, match=r"chosen: expected a class in \[0, 3\)"):
    ablation_votes.class_bounds(counts, np.array([3]), 0.01)
  with pytest.raises(ValueError, match=r"subsets: expected an integer >= 1, got 0"):
    ablation.round_bounds(np.array([0.5]), np.array([0.2]), 0)


# The certificate's arithmetic on enumerable toys: a classifier voting on the
# entries an ablation keeps, each entry carrying evidence for one of 3 classes
# (the last two entries of a modality for classes 1 and 2, the others for 0).
# 7 x 5 entries keeping 1 + 1: N = 35 ablations (odd, so rounding shows even
# in the pair rule) and certified counts up to 2; 5 x 4 keeping 2 + 2: N = 60.
TOYS = (({"a": 7, "b": 5}, {"a": 1, "b": 1}), ({"a": 5, "b": 4}, {"a": 2, "b": 2}))
CLASSES = 3


def kept_entries(sizes, keep):
  """modality -> bool [N, n_m]: the entries each of the N ablations keeps."""
  rows = list(itertools.product(*(itertools.combinations(range(sizes[m]), keep[m])
                                  for m in sorted(sizes))))
  out = {m: np.zeros((len(rows), sizes[m]), bool) for m in sorted(sizes)}
  for i, row in enumerate(rows):
    for m, entries in zip(sorted(sizes), row):
      out[m][i, list(entries)] = True
  return out


def evidence(size):
  """[size, 3]: the class each entry of a modality speaks for."""
  return np.eye(CLASSES)[[0] * (size - 2) + [1, 2]]


def toy_inputs(sizes, count, seed=0):
  """modality -> [count, n_m]: positive entry values (each entry's weight)."""
  rng = np.random.default_rng(seed)
  return {m: rng.uniform(0.2, 2.0, size=(count, n)) for m, n in sorted(sizes.items())}


def votes_of(x, kept):
  """int [N]: the toy classifier's vote on every ablation of one example."""
  return np.argmax(sum((kept[m] * x[m]) @ evidence(x[m].size) for m in kept), axis=1)


def touched(kept, changed):
  """bool [N]: the ablations keeping one of the `changed` entries (modality ->
  entry indices)."""
  return np.logical_or.reduce([kept[m][:, list(e)].any(axis=1) for m, e in changed.items()])


def brute_force_safe(votes_, chosen, kept, split):
  """Whether changing `split[m]` entries of every modality m cannot change the
  vote `chosen`, trying every set of changed entries, the ablations that keep one
  of them voting for anything: `u_A > u_B + |touched|` for every class B."""
  sizes = {m: v.shape[1] for m, v in kept.items()}
  for entries in itertools.product(*(itertools.combinations(range(sizes[m]), split[m])
                                     for m in sorted(sizes))):
    hit = touched(kept, dict(zip(sorted(sizes), entries)))
    untouched = np.bincount(votes_[~hit], minlength=CLASSES)
    if any(untouched[chosen] <= untouched[c] + hit.sum() for c in range(CLASSES) if c != chosen):
      return False
  return True


def worst_votes(counts, chosen, kept, split):
  """int [N]: votes with the class counts `counts`, arranged worst for changing
  the first `split[m]` entries of each modality: the chosen class's votes on the
  ablations keeping a changed entry, the runner-up's on the others."""
  hit = touched(kept, {m: range(r) for m, r in split.items()})
  runner_up = max((c for c in range(CLASSES) if c != chosen), key=lambda c: counts[c])
  order = [chosen] + [c for c in range(CLASSES) if c not in (chosen, runner_up)] + [runner_up]
  out = np.empty(len(hit), np.int64)
  out[np.argsort(~hit, kind="stable")] = np.concatenate([np.full(counts[c], c) for c in order])
  return out


def brute_force_counts(safe, sizes):
  """`(per_modality, total)` from `safe(split)`: the largest count of one
  modality, and the largest total whose every split is safe (with all smaller)."""
  def largest(splits):
    t = 0
    while splits(t + 1) and all(safe(s) for s in splits(t + 1)):
      t += 1
    return t

  alone = {m: largest(lambda r, m=m: [{**dict.fromkeys(sizes, 0), m: r}] if r <= sizes[m] else [])
           for m in sorted(sizes)}
  names = sorted(sizes)
  total = largest(lambda t: [dict(zip(names, (r, t - r))) for r in range(t + 1)
                             if r <= sizes[names[0]] and t - r <= sizes[names[1]]])
  return alone, total


def certificate_of(gap, sizes, keep):
  """The counts `certified_counts` gives, as plain ints."""
  per_modality, total = ablation.certified_counts(np.atleast_1d(gap), sizes, keep)
  return {m: int(v[0]) for m, v in per_modality.items()}, int(total[0])


@pytest.mark.parametrize("sizes,keep", TOYS)
def test_exact_probabilities_certify_what_brute_force_allows(sizes, keep):
  kept = kept_entries(sizes, keep)
  subsets = len(kept["a"])
  assert subsets == ablation.num_subsets(sizes, keep)
  x = toy_inputs(sizes, 16)
  largest, ties, looser = 0, 0, 0
  for i in range(16):
    votes_ = votes_of({m: v[i] for m, v in x.items()}, kept)
    counts = np.bincount(votes_, minlength=CLASSES)
    chosen = int(np.argmax(counts))
    margin = counts[chosen] - np.max(np.delete(counts, chosen))
    alone, total = certificate_of(margin / subsets, sizes, keep)
    # Tight: exactly what the worst classifier with these class counts allows.
    worst = brute_force_counts(
        lambda s: brute_force_safe(worst_votes(counts, chosen, kept, s), chosen, kept, s), sizes)
    assert (alone, total) == worst, i
    # Sound: the toy classifier itself withstands at least as much.
    truth_alone, truth_total = brute_force_counts(
        lambda s: brute_force_safe(votes_, chosen, kept, s), sizes)
    assert total <= truth_total and all(alone[m] <= truth_alone[m] for m in sizes), i
    looser += (total, alone) != (truth_total, truth_alone)
    # `certifies` tests any split the same way.
    cert = types.SimpleNamespace(prediction=np.array([chosen if margin > 0 else -1]),
                                 gap=np.array([margin / subsets]), sizes=sizes, keep=keep)
    for m in sizes:
      assert ablation.certifies(cert, {m: np.array([alone[m]])})[0] == (margin > 0)
      if alone[m] < sizes[m]:
        assert not ablation.certifies(cert, {m: np.array([alone[m] + 1])})[0]
    # A tie `2 D(r) = margin` (not certified: p'_A = p'_B is possible).
    ties += any(2 * (subsets - math.prod(math.comb(sizes[o] - (r if o == m else 0), keep[o])
                                          for o in sizes)) == margin
                for m in sizes for r in range(1, sizes[m] + 1))
    largest = max(largest, total, *alone.values())
  assert largest >= 1  # not vacuous
  if subsets == 35:  # and on this toy a tie, and a classifier sturdier than its counts
    assert largest >= 2 and ties and looser


def test_per_class_bounds_fail_together_with_probability_at_most_alpha():
  # Every outcome of 200 votes over 3 classes, exactly: the event the
  # certificate needs, p_A >= p_lower and every other p_c <= p_upper.
  p, trials, alpha = np.array([0.45, 0.35, 0.2]), 200, 0.15
  counts = np.array([(a, b, trials - a - b) for a in range(trials + 1)
                     for b in range(trials + 1 - a)])
  weight = stats.multinomial.pmf(counts, trials, p)
  chosen = np.zeros(len(counts), np.int64)
  for per_class in (False, True):
    p_lower, p_upper = ablation_votes.class_bounds(counts, chosen, alpha, per_class)
    assert np.all(p_upper <= 1.0 - p_lower)
    fails = (p_lower > p[0]) | (p_upper < p[1])
    assert weight[fails].sum() <= alpha
  # Each per-class bound is Clopper-Pearson at alpha / 2 (Bonferroni over A and
  # the runner-up): the binomial tail at the bound is alpha / 2. Without the
  # correction the event above fails with probability 0.21 > alpha.
  inside = counts[(counts[:, 0] > 0) & (counts[:, 1:].max(axis=1) < trials)][::97]
  p_lower, p_upper = ablation_votes.class_bounds(inside, chosen[:len(inside)], alpha, True)
  np.testing.assert_allclose(stats.binom.sf(inside[:, 0] - 1, trials, p_lower), alpha / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(stats.binom.cdf(inside[:, 1:].max(axis=1), trials, p_upper),
                             alpha / 2, rtol=1e-6)


def test_rounding_gives_the_tightest_multiples_and_is_a_no_op_for_huge_n():
  subsets = 35
  grid = np.linspace(0.0, 1.0, 35 * 13 + 1)
  lower, upper = ablation.round_bounds(grid, grid, subsets)
  for bound in (lower, upper):
    np.testing.assert_allclose(bound * subsets, np.round(bound * subsets), atol=1e-9)
  # The tightest multiples of 1 / N still bounding (up to float error).
  assert np.all(lower >= grid - 1e-12) and np.all(lower - 1.0 / subsets < grid)
  assert np.all(upper <= grid + 1e-12) and np.all(upper + 1.0 / subsets > grid)
  lower, upper = ablation.round_bounds(grid, grid, 2 ** 33)
  np.testing.assert_array_equal(lower, grid)
  np.testing.assert_array_equal(upper, grid)
  # N with 178 digits: the log-space counts against exact big-integer arithmetic,
  # `2 (N - N s(r)) < N gap`.
  sizes, keep = {"audio": 4000, "visual": 240}, {"audio": 80, "visual": 4}
  subsets = ablation.num_subsets(sizes, keep)
  assert len(str(subsets)) == 178
  gaps = np.random.default_rng(0).uniform(0.0, 1.0, 50)
  per_modality, _ = ablation.certified_counts(gaps, sizes, keep)

  def exact(m, gap):
    r = 0
    while 2 * (subsets - subsets // math.comb(sizes[m], keep[m])
               * math.comb(sizes[m] - r - 1, keep[m])) < fractions.Fraction(gap) * subsets:
      r += 1
    return r

  for m in sizes:
    assert [exact(m, g) for g in gaps] == per_modality[m].tolist()
  assert per_modality["audio"].max() >= 20


def test_rounding_and_per_class_bounds_each_certify_strictly_more():
  # 1000 votes 676 / 184 / 140 on the 35-ablation toy, alpha = 0.001.
  sizes, keep = TOYS[0]
  counts, chosen = np.array([[676, 184, 140]]), np.array([0])
  out = {}
  for per_class in (False, True):
    bounds = ablation_votes.class_bounds(counts, chosen, 0.001, per_class)
    for rounded in (False, True):
      lower, upper = ablation.round_bounds(*bounds, 35) if rounded else bounds
      alone, total = certificate_of(lower - upper, sizes, keep)
      out[per_class, rounded] = (alone["a"], alone["b"], total)
  # Before: the pair, unrounded (margin 9.01 subsets, 2 D = 10 for one entry of a).
  assert out[False, False] == (0, 0, 0)
  assert out[False, True] == (1, 0, 0)  # 23 - 12 = 11 > 10
  assert out[True, False] == (1, 0, 0)  # 21.90 - 7.95 = 13.95 < 14 = 2 D for b
  assert out[True, True] == (1, 1, 1)  # 22 - 7 = 15 > 14


def test_simulated_votes_certify_at_most_the_truth_and_more_than_before():
  sizes, keep = TOYS[0]
  kept = kept_entries(sizes, keep)
  x = toy_inputs(sizes, 24, seed=1)
  table = [votes_of({m: v[i] for m, v in x.items()}, kept) for i in range(24)]
  p = np.stack([np.bincount(t, minlength=CLASSES) for t in table]) / 35
  top = np.argmax(p, axis=1)
  truth = [brute_force_counts(lambda s, i=i: brute_force_safe(table[i], top[i], kept, s), sizes)
           for i in range(24)]
  truth = np.array([[a["a"], a["b"], t] for a, t in truth])
  rng = np.random.default_rng(2)
  sums = np.zeros(3, np.int64)
  for _ in range(3):
    selection = np.stack([rng.multinomial(100, q) for q in p])
    counts = np.stack([rng.multinomial(1000, q) for q in p])
    chosen = np.argmax(selection, axis=1)
    per_class = ablation_votes.choose_per_class(selection, chosen, 1000, 0.001)
    bounds = ablation_votes.class_bounds(counts, chosen, 0.001, per_class)
    rounded = ablation.round_bounds(*bounds, 35)
    before_gap = 2 * votes.clopper_pearson_lower(counts[np.arange(24), chosen], 1000, 0.001) - 1
    rows = []
    for gap in (before_gap, np.subtract(*bounds), np.subtract(*rounded)):
      alone, total = ablation.certified_counts(gap, sizes, keep)
      rows.append(np.stack([alone["a"], alone["b"], total], axis=1))
    before, unrounded, after = rows
    # Sound: a positive gap claims the strict top class and at most the truth.
    claimed = np.subtract(*rounded) > 0
    strict_top = np.sort(p, axis=1)[:, -1] > np.sort(p, axis=1)[:, -2]
    assert np.all((chosen == top) & strict_top | ~claimed)
    assert np.all(after <= truth)
    assert np.all(after >= unrounded)  # rounding: a theorem
    assert np.all(after >= before)  # per-class bounds: on this toy (module docstring)
    sums += [before.sum(), unrounded.sum(), after.sum()]
  assert sums[0] < sums[1] < sums[2] <= 3 * truth.sum()


def test_bounds_rule_follows_the_selection_votes():
  chosen = np.zeros(4, np.int64)
  selection = np.array([[100, 0, 0], [99, 1, 0], [60, 20, 20], [50, 30, 20]])
  np.testing.assert_array_equal(ablation_votes.choose_per_class(selection, chosen, 1000, 0.001),
                                [False, False, True, True])
  # Two classes: p_B = 1 - p_A, the pair is always at least as tight.
  two = np.array([[70, 30], [55, 45], [100, 0]])
  assert not np.any(ablation_votes.choose_per_class(two, chosen[:3], 1000, 0.001))


@pytest.mark.slow
def test_ablated_objective_keeps_exactly_k_entries_per_modality():
  inputs = {"a": jnp.ones((4, 60)), "b": jnp.ones((4, 40))}
  transform = jax.jit(ablation.ablation((("a", 3), ("b", 2))))
  kept = transform(jax.random.PRNGKey(0), inputs)
  assert np.all(np.sum(np.asarray(kept["a"]) != 0, 1) == 3)
  assert np.all(np.sum(np.asarray(kept["b"]) != 0, 1) == 2)
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (100, 3))}
  batch = {"inputs": inputs, "label": jnp.zeros(4, jnp.int32)}
  expected = methods.cross_entropy(Linear().apply({"params": params}, transform(
      jax.random.PRNGKey(2), inputs)).logits, batch["label"])
  # The fraction (floor(0.05 n_m)) and the counts name the same ablation.
  for kwargs in ({"ablation_keep_fraction": 0.05},
                 {"ablation_keep_counts": "b:2,a:3", "ablation_keep_fraction": 0.5}):
    loss_fn = jax.jit(methods.get("ablated")(Linear(), kwargs))
    loss, (_, metrics) = loss_fn(params, {}, batch, jax.random.PRNGKey(2))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert "accuracy" in metrics
  assert ablation.keep_label(ablation.parse_keep("b:2,a:3")) == "a:3,b:2"
