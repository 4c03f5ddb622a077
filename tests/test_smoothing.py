"""Randomized smoothing with per-modality noise: closed forms on a linear
classifier, EOT-PGD inside the certified radius, bad input, reproducibility,
and the Gaussian-augmentation objective."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmsafe import attacks, methods
from mmsafe.certify import smoothing, votes

SIGMA = {"a": 0.5, "b": 1.0}


def linear_problem():
  """A binary linear classifier `sign(w.x + b)` on two modalities, as logits
  `[0, w.x + b]`, and 6 inputs at various margins."""
  w = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.7, 1.5])}
  bias = 0.3
  logits_fn = lambda x: jnp.stack(
      [jnp.zeros(x["a"].shape[0]), x["a"] @ w["a"] + x["b"] @ w["b"] + bias], -1)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  inputs = {"a": 0.6 * jax.random.normal(keys[0], (6, 3)),
            "b": 0.6 * jax.random.normal(keys[1], (6, 2))}
  margin = np.asarray(inputs["a"] @ w["a"] + inputs["b"] @ w["b"] + bias)
  return logits_fn, inputs, w, margin


@pytest.mark.slow
def test_linear_classifier_radius_matches_the_closed_form():
  logits_fn, inputs, w, margin = linear_problem()
  labels = (margin > 0).astype(np.int32)
  # Closed form: w.(x + e) + b ~ N(margin, s^2), s^2 = sum_m sigma_m^2 ||w_m||^2.
  s = np.sqrt(sum(SIGMA[m] ** 2 * float(jnp.sum(w[m] ** 2)) for m in SIGMA))
  p_exact = stats.norm.cdf(np.abs(margin) / s)
  normalized, joint, per_modality = smoothing.radii(p_exact, SIGMA)
  np.testing.assert_allclose(normalized, np.abs(margin) / s, rtol=1e-6)
  np.testing.assert_allclose(joint, 0.5 * np.abs(margin) / s, rtol=1e-6)
  # The ellipsoid is exact for a linear classifier: the flipping point
  # d* = -margin S^2 w / (w S^2 w) has Mahalanobis norm |margin| / s ...
  d = {m: -(margin / s ** 2)[:, None] * SIGMA[m] ** 2 * np.asarray(w[m])[None] for m in SIGMA}
  mahalanobis = np.sqrt(sum(np.sum((d[m] / SIGMA[m]) ** 2, 1) for m in SIGMA))
  np.testing.assert_allclose(mahalanobis, normalized, rtol=1e-5)
  flipped = np.asarray(logits_fn({m: inputs[m] + 1.0001 * d[m] for m in SIGMA})[:, 1])
  assert np.all(np.sign(flipped) != np.sign(margin))
  # ... and the per-modality radius never exceeds the exact distance |margin| / ||w_m||.
  for m in SIGMA:
    assert np.all(per_modality[m] <= np.abs(margin) / float(jnp.linalg.norm(w[m])) + 1e-6)

  # Monte Carlo: the certified lower bound sits below the exact p_A, and close to it.
  cert = smoothing.certify(logits_fn, inputs, labels, SIGMA, jax.random.PRNGKey(0),
                           num_samples=10000, chunk_size=100, alpha=0.001)
  decided = cert.prediction >= 0
  np.testing.assert_array_equal(cert.prediction[decided], labels[decided])
  assert np.all(decided | (p_exact < 0.55))  # abstains only near p_A = 1/2
  assert np.all(cert.p_lower <= p_exact) and np.all(cert.p_lower >= p_exact - 0.03)
  assert np.all(cert.normalized_radius <= np.abs(margin) / s)
  assert np.all(cert.radius[decided] >= 0.5 * np.abs(margin[decided]) / s - 0.15)
  # The ellipsoid test: the flipping point d* lies outside it, 0.9 R sigma_a inside.
  norms = {m: 1.0001 * np.linalg.norm(d[m], axis=1) for m in SIGMA}
  assert not np.any(smoothing.certifies(cert, norms))
  inside = smoothing.certifies(cert, {"a": 0.9 * cert.per_modality["a"]})
  np.testing.assert_array_equal(inside, decided & (cert.normalized_radius > 0))
  # Isotropic noise: Cohen's sigma Phi^-1(p_A) is the exact l2 distance to the boundary.
  norm_w = np.sqrt(sum(float(jnp.sum(w[m] ** 2)) for m in SIGMA))
  _, joint_iso, _ = smoothing.radii(stats.norm.cdf(np.abs(margin) / (0.8 * norm_w)),
                                    {"a": 0.8, "b": 0.8})
  np.testing.assert_allclose(joint_iso, np.abs(margin) / norm_w, rtol=1e-6)


@functools.lru_cache(maxsize=None)
def small_model(batch=24):
  """A random two-tower tanh network (plain jnp: cheap to compile), its inputs
  and its predictions as labels; one per session, so the tests share programs."""
  keys = jax.random.split(jax.random.PRNGKey(3), 6)
  dims = {"a": 6, "b": 4}
  inputs = {m: jax.random.normal(k, (batch, d)) for k, (m, d) in zip(keys, dims.items())}
  hidden = {m: jax.random.normal(k, (d, 16)) / np.sqrt(d)
            for k, (m, d) in zip(keys[2:], dims.items())}
  out = {m: jax.random.normal(k, (16, 3)) for k, m in zip(keys[4:], dims)}
  logits_fn = jax.jit(lambda x: sum(jnp.tanh(x[m] @ hidden[m]) @ out[m] for m in sorted(x)))
  return logits_fn, inputs, jnp.argmax(logits_fn(inputs), -1)


def smoothed_class(logits_fn, inputs, key, num_samples=2000):
  counts = votes.vote_counts(logits_fn, smoothing.gaussian_noise(tuple(sorted(SIGMA.items()))),
                             inputs, key, num_samples=num_samples, chunk_size=100, num_classes=3)
  return np.argmax(counts, 1)


@pytest.mark.slow
def test_eot_pgd_never_breaks_the_certified_radius():
  logits_fn, inputs, labels = small_model()
  cert = smoothing.certify(logits_fn, inputs, labels, SIGMA, jax.random.PRNGKey(4),
                           num_samples=500, chunk_size=100)
  surrogate = smoothing.expected_logits(logits_fn, smoothing.gaussian_noise(
      tuple(sorted(SIGMA.items()))), jax.random.PRNGKey(5), 8)
  target = np.where(cert.prediction >= 0, cert.prediction, 0)
  ok = (cert.prediction >= 0) & (cert.radius > 0)
  eps = jnp.asarray(np.where(ok, 0.999 * cert.radius, 0.0), jnp.float32)
  adversarial = attacks.pgd(surrogate, inputs, jnp.asarray(target), jax.random.PRNGKey(6),
                            eps=eps, steps=10, loss="margin")
  after = smoothed_class(logits_fn, adversarial, jax.random.PRNGKey(7))
  assert ok.sum() > 15 and not np.any(ok & (after != cert.prediction))
  # The attack has teeth: at four times the certified radius it flips some votes.
  eps = jnp.asarray(4.0 * cert.radius, jnp.float32)
  adversarial = attacks.pgd(surrogate, inputs, jnp.asarray(target), jax.random.PRNGKey(6),
                            eps=eps, steps=10, loss="margin")
  after = smoothed_class(logits_fn, adversarial, jax.random.PRNGKey(7))
  assert np.any((cert.prediction >= 0) & (after != cert.prediction))


@pytest.mark.slow
def test_counts_are_reproducible_from_the_key_whatever_the_chunk_size():
  logits_fn, inputs, _ = small_model()
  noise = smoothing.gaussian_noise(tuple(sorted(SIGMA.items())))
  count = lambda key, chunk: votes.vote_counts(logits_fn, noise, inputs, key, num_samples=200,
                                               chunk_size=chunk, num_classes=3)
  np.testing.assert_array_equal(count(jax.random.PRNGKey(0), 7),
                                count(jax.random.PRNGKey(0), 100))
  assert np.all(count(jax.random.PRNGKey(0), 100).sum(1) == 200)
  assert not np.array_equal(count(jax.random.PRNGKey(0), 100),
                            count(jax.random.PRNGKey(1), 100))


def test_bad_input_is_refused_naming_the_argument():
  logits_fn, inputs, labels = small_model()
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"sigma\['b'\]: expected a finite number > 0, got 0"):
    smoothing.certify(logits_fn, inputs, labels, {"a": 0.5, "b": 0.0}, key)
  with pytest.raises(ValueError, match=r"sigma\['a'\]"):
    smoothing.certify(logits_fn, inputs, labels, -1.0, key)
  with pytest.raises(ValueError, match=r"sigma: expected one noise level per modality"):
    smoothing.certify(logits_fn, inputs, labels, {"a": 0.5}, key)
  # 9 of 9 votes bound p_A by 0.001^(1/9) < 1/2 at alpha 0.001: nothing certifies.
  with pytest.raises(ValueError, match=r"num_samples: expected at least 10 samples"):
    smoothing.certify(logits_fn, inputs, labels, SIGMA, key, num_samples=9, alpha=0.001)
  with pytest.raises(ValueError, match=r"num_samples: expected at least 11 samples"):
    smoothing.predict(logits_fn, inputs, SIGMA, key, num_samples=10, alpha=0.001)
  with pytest.raises(ValueError, match=r"alpha"):
    smoothing.certify(logits_fn, inputs, labels, SIGMA, key, alpha=0.0)


class Linear:
  """A model as the objectives call it (`apply(variables, inputs, train)` with
  `.logits`), linear on the concatenated modalities."""

  def apply(self, variables, inputs, train=False):
    del train
    x = jnp.concatenate([inputs["a"], inputs["b"]], -1)
    return types.SimpleNamespace(logits=x @ variables["params"]["w"])


def test_gaussian_augmentation_trains_on_noisy_inputs():
  _, inputs, labels = small_model()
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (10, 3))}
  batch = {"inputs": inputs, "label": labels}
  rng = jax.random.PRNGKey(9)
  loss_fn = jax.jit(methods.get("gaussian_aug")(Linear(), {"noise_sigma": 0.7}))
  loss, (_, metrics) = loss_fn(params, {}, batch, rng)
  noisy = smoothing.gaussian_noise((("a", 0.7), ("b", 0.7)))(rng, inputs)
  expected = methods.cross_entropy(Linear().apply({"params": params}, noisy).logits, labels)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  clean = methods.cross_entropy(Linear().apply({"params": params}, inputs).logits, labels)
  assert abs(float(loss) - float(clean)) > 1e-3 and "accuracy" in metrics
  with pytest.raises(ValueError, match=r"method_kwargs.noise_sigma"):
    methods.get("gaussian_aug")(Linear(), {"noise_sigma": 0.0})
