"""The modality-ablation certificate: exact enumeration of the ablation votes on a
toy classifier (the certified counts withstand every change they cover), the
decoupling attack inside the certified counts, bad input, the ablated-input
objective."""

import itertools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks, methods
from mmsafe.certify import ablation, votes

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
  assert np.all(cert.total <= total)  # 2 p_lower - 1 <= p_A - p_B


class Linear:
  """A model as the objectives call it (`apply(variables, inputs, train)` with
  `.logits`), linear on the concatenated modalities."""

  def apply(self, variables, inputs, train=False):
    del train
    x = jnp.concatenate([inputs["a"], inputs["b"]], -1)
    return types.SimpleNamespace(logits=x @ variables["params"]["w"])


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


def test_ablated_objective_keeps_exactly_k_entries_per_modality():
  inputs = {"a": jnp.ones((4, 60)), "b": jnp.ones((4, 40))}
  transform = jax.jit(ablation.ablation((("a", 3), ("b", 2))))
  kept = transform(jax.random.PRNGKey(0), inputs)
  assert np.all(np.sum(np.asarray(kept["a"]) != 0, 1) == 3)
  assert np.all(np.sum(np.asarray(kept["b"]) != 0, 1) == 2)
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (100, 3))}
  loss_fn = jax.jit(methods.get("ablated")(Linear(), {"ablation_keep_fraction": 0.05}))
  batch = {"inputs": inputs, "label": jnp.zeros(4, jnp.int32)}
  loss, (_, metrics) = loss_fn(params, {}, batch, jax.random.PRNGKey(2))
  expected = methods.cross_entropy(Linear().apply({"params": params}, transform(
      jax.random.PRNGKey(2), inputs)).logits, batch["label"])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert "accuracy" in metrics
