"""Certified radii in the input units a user perturbs (`mmsafe.certify.units`).

Each test attacks in input space (perturb the input in its units, standardise,
classify) or compares with the exact minimal input-space perturbation of a
linear model, with standard deviations below 1, so that dropping the scale
(radii left in normalised units) makes a radius too large and fails it, and
unequal within a modality, so that the rule's `min_i std_i` is exercised.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks
from mmsafe import certify
from mmsafe.certify import smoothing, threats, units
from mmsafe.data import clips
from mmsafe.data.types import Standardization
from mmsafe.eval.radius_attack import make_radius_attack

K = 4


def _linear_problem(seed: int, stds: dict, batch: int = 48):
  """A linear model on standardised inputs: (stats, weights [D, K] per modality,
  inputs in input units, input-space logits, labels it predicts)."""
  rng = np.random.default_rng(seed)
  stats = {m: Standardization(rng.normal(size=s.shape).astype(np.float32), s)
           for m, s in stds.items()}
  weights = {m: jnp.asarray(rng.normal(size=(s.size, K)), jnp.float32) for m, s in stds.items()}
  raw = {m: jnp.asarray(stats[m].mean + stats[m].std * rng.normal(size=(batch, s.size)),
                        jnp.float32) for m, s in stds.items()}
  logits_of = lambda u: sum(((u[m] - stats[m].mean) / stats[m].std) @ weights[m] for m in u)
  return stats, weights, raw, logits_of, jnp.argmax(logits_of(raw), -1).astype(jnp.int32)


def _linear_certificate(stats, weights, raw, labels, input_scale):
  """The certificate of the linear model with its exact normalised constants."""
  x = {m: (raw[m] - stats[m].mean) / stats[m].std for m in raw}
  scores = {m: x[m] @ weights[m] for m in raw}
  eta = {m: certify.integration_factors(weights[m])[labels] for m in raw}
  return certify.radius_from_scores(scores, labels, eta, kind="sound", input_scale=input_scale)


STDS = {"a": np.asarray([0.2, 0.35, 0.5, 0.3, 0.45, 0.25], np.float32),
        "b": np.asarray([0.1, 0.25, 0.15, 0.2, 0.12], np.float32)}


def test_the_rule_is_the_smallest_std_in_input_units_for_every_dataset():
  clip = {m: clips.clip_standardization(m) for m in ("visual", "flow", "audio")}
  scales = certify.input_scales(clip)
  np.testing.assert_allclose(scales["visual"], min(clips.IMAGENET_STD), rtol=1e-6)
  np.testing.assert_allclose(scales["flow"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(scales["audio"], 2 * clips.AUDIO_STD, rtol=1e-6)
  assert units.unit_names(clip) == {"audio": "raw fbank", "flow": "pixel/255",
                                    "visual": "pixel/255"}
  assert units.describe("input", clip) == ("input units (audio: raw fbank, flow: pixel/255, "
                                           "visual: pixel/255)")
  assert units.describe("normalised") == "normalised input space"
  # The embedded datasets: per-feature stds of the raw features.
  embedded = {"fou": Standardization(np.zeros(3, np.float32), STDS["a"][:3]),
              "pix": Standardization(np.zeros((1, 1, 1), np.float32), np.full((1, 1, 1), 2.7,
                                                                                np.float32))}
  assert certify.input_scales(embedded) == pytest.approx({"fou": 0.2, "pix": 2.7})
  with pytest.raises(ValueError, match=r"stats\['v'\].raw_per_unit: expected a finite positive"):
    certify.input_scales({"v": Standardization(np.zeros(1), np.ones(1), raw_per_unit=0.0)})
  with pytest.raises(ValueError, match=r"units: expected one of \('normalised', 'input'\)"):
    units.describe("raw")


@pytest.mark.slow
def test_linear_model_radii_against_the_exact_minimal_input_space_perturbation():
  # Closed form: the smallest input-space d with (w_y - w_k).(d / std) = -margin_k
  # has norm margin_k / ||(w_y - w_k) / std||. The certified radius is sound (at
  # most the exact distance) and within max_i std_i / min_i std_i of it, per
  # modality and jointly; in normalised units (the scale dropped) it exceeds it.
  stats, weights, raw, logits_of, labels = _linear_problem(0, STDS)
  cert = _linear_certificate(stats, weights, raw, labels, certify.input_scales(stats))
  normalised = _linear_certificate(stats, weights, raw, labels, None)
  assert cert.units == "input" and normalised.units == "normalised"
  logits, y, rows = np.asarray(logits_of(raw)), np.asarray(labels), np.arange(len(labels))
  margin = logits[rows, y][:, None] - logits  # [B, K]
  gradient = {m: (np.asarray(weights[m])[:, y].T[:, None, :] - np.asarray(weights[m]).T[None])
              / STDS[m] for m in STDS}  # [B, K, D]: grad of h_y - h_k in u^(m)
  norm = {m: np.linalg.norm(g, axis=-1) for m, g in gradient.items()}
  joint = np.sqrt(sum(n ** 2 for n in norm.values()))
  exact = lambda n: np.min(np.where(n > 0, margin / np.maximum(n, 1e-30), np.inf), axis=1)
  ratio = {m: STDS[m].max() / STDS[m].min() for m in STDS}
  for radius, n, loose in [(cert.radius, joint, max(ratio.values()))] + [
      (cert.per_modality[m], norm[m], ratio[m]) for m in STDS]:
    radius, distance = np.asarray(radius), exact(n)
    assert np.all(radius <= distance * (1 + 1e-5))
    assert np.all(radius >= distance / loose * (1 - 1e-5))
  assert np.all(np.asarray(normalised.radius) > exact(joint))


@pytest.mark.slow
def test_attacks_in_input_space_break_nothing_at_0999_r_and_something_at_3_r():
  stats, weights, raw, logits_of, labels = _linear_problem(1, STDS)
  cert = _linear_certificate(stats, weights, raw, labels, certify.input_scales(stats))
  radius = np.asarray(cert.radius)
  for factor, breaks in ((0.999, False), (3.0, True)):
    adversarial = attacks.pgd(logits_of, raw, labels, jax.random.PRNGKey(2),
                              eps=factor * radius, steps=100, restarts=2, loss="margin")
    broken = np.asarray(jnp.argmax(logits_of(adversarial), -1) != labels)
    assert broken.any() == breaks, (factor, int(broken.sum()))
  for m in STDS:  # Each modality alone, at its uni-modal radius.
    adversarial = attacks.pgd(logits_of, raw, labels, jax.random.PRNGKey(3),
                              eps=0.999 * cert.per_modality[m], steps=100, restarts=2,
                              loss="margin", modalities=m)
    assert np.all(np.asarray(jnp.argmax(logits_of(adversarial), -1) == labels)), m


def test_the_radius_check_allows_for_float32_rounding_of_large_input_values():
  # Inputs near 1e4 in their units: storing an attacked point in float32 moves it
  # by up to float32's epsilon times its norm, far beyond the attack's 1e-4 r
  # margin, so a check without that allowance stops with "attack left the ball".
  # The radii are exact (a linear model, std 1), so nothing may break either.
  d, mean = 4096, 1e4
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(d, 2)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(16, d)), jnp.float32)
  x = (x + mean) - mean  # the normalised inputs as read back from input units
  logits = np.asarray(x @ w, np.float64)
  radius = np.abs(logits[:, 0] - logits[:, 1]) / np.linalg.norm(np.asarray(w[:, 0] - w[:, 1]))
  attack = make_radius_attack(lambda v, inputs: inputs["a"] @ v["w"], steps=20, restarts=1)
  attacked, broken = attack({"w": w}, {"a": x}, logits.argmax(1), radius, jax.random.PRNGKey(0),
                            {"a": (jnp.full((d,), mean), jnp.ones((d,)))})
  assert attacked.all() and not broken.any()


@pytest.mark.slow
def test_clip_radii_are_in_pixel_per_255_and_hold_against_uint8_frame_attacks():
  # A clip-shaped toy: uint8 frames [B, T, S, S, 3] and raw fbank audio, normalised
  # by `clips.normalize_inputs` as in the compiled step. The attack moves the
  # frames in pixel/255 (u = bytes / 255) and the audio in fbank units.
  rng = np.random.default_rng(3)
  frames = rng.integers(0, 256, size=(32, 2, 4, 4, 3)).astype(np.uint8)
  fbank = (clips.AUDIO_MEAN + 3.0 * rng.normal(size=(32, 6, 5))).astype(np.float32)
  kernels = {"visual": jnp.asarray(rng.normal(size=(96, K)), jnp.float32),
             "audio": jnp.asarray(rng.normal(size=(30, K)) * 0.05, jnp.float32)}
  scores_of = lambda x: {m: x[m].reshape(x[m].shape[0], -1) @ kernels[m] for m in kernels}
  logits_of_units = lambda u: sum(scores_of(clips.normalize_inputs(
      {"visual": u["visual"] * 255.0, "audio": u["audio"]})).values())
  stats = {m: clips.clip_standardization(m) for m in kernels}
  u = {"visual": jnp.asarray(frames, jnp.float32) / 255.0, "audio": jnp.asarray(fbank)}
  labels = jnp.argmax(logits_of_units(u), -1).astype(jnp.int32)
  normalised = clips.normalize_inputs({"visual": frames, "audio": fbank})
  eta = {m: certify.integration_factors(kernels[m])[labels] for m in kernels}
  cert = certify.radius_from_scores(scores_of(normalised), labels, eta, kind="sound",
                                    input_scale=certify.input_scales(stats))
  radius = np.asarray(cert.radius)
  assert np.all(radius > 0) and np.median(radius) < 1.0  # a few pixel/255 units, not bytes
  for factor, breaks in ((0.999, False), (3.0, True)):
    adversarial = attacks.pgd(logits_of_units, u, labels, jax.random.PRNGKey(4),
                              eps=factor * radius, steps=100, restarts=2, loss="margin")
    broken = np.asarray(jnp.argmax(logits_of_units(adversarial), -1) != labels)
    assert broken.any() == breaks, (factor, int(broken.sum()))


@pytest.mark.slow
def test_smoothing_radii_in_input_units_are_sound_for_a_linear_classifier():
  # For a linear binary base classifier the smoothed classifier is the base one
  # (symmetric noise), so its exact input-space distance to the boundary is
  # |w.x + b| / ||w / std||; CERTIFY's input-unit radius may not exceed it, and
  # its normalised radius (the scale dropped) does for these stds below 1.
  rng = np.random.default_rng(5)
  stats = {m: Standardization(np.zeros(s.shape, np.float32), s) for m, s in STDS.items()}
  w = {m: rng.normal(size=s.size).astype(np.float32) for m, s in STDS.items()}
  x = {m: rng.normal(size=(64, s.size)).astype(np.float32) for m, s in STDS.items()}
  logits_fn = jax.jit(lambda v: jnp.stack([jnp.zeros(v["a"].shape[0]), sum(
      v[m] @ w[m] for m in w)], -1))
  labels = np.asarray(jnp.argmax(logits_fn(x), -1))
  sigma = {"a": 0.5, "b": 0.25}
  key = jax.random.PRNGKey(6)
  certificates = {scale is None: smoothing.certify(
      logits_fn, x, labels, sigma, key, num_samples=2000, chunk_size=1000, input_scale=scale)
      for scale in (None, certify.input_scales(stats))}
  cert, normalised = certificates[False], certificates[True]
  assert cert.units == "input" and normalised.units == "normalised"
  scale = certify.input_scales(stats)
  np.testing.assert_allclose(cert.radius, min(scale[m] * sigma[m] for m in sigma)
                             * normalised.normalized_radius, rtol=1e-6)
  for m in sigma:
    np.testing.assert_allclose(cert.per_modality[m], scale[m] * normalised.per_modality[m],
                               rtol=1e-6)
  exact = np.abs(sum(x[m] @ w[m] for m in w)) / np.sqrt(sum(
      np.sum((w[m] / STDS[m]) ** 2) for m in w))
  certified = np.asarray(cert.prediction) != smoothing.ABSTAIN
  assert certified.sum() > 32
  assert np.all(np.asarray(cert.radius)[certified] < exact[certified])
  assert np.any(np.asarray(normalised.radius)[certified] > exact[certified])
  with pytest.raises(ValueError, match=r"input_scale: expected modalities \['a', 'b'\]"):
    smoothing.certify(logits_fn, x, labels, sigma, key, num_samples=100, input_scale={"a": 1.0})


def test_missing_modality_outcome_is_the_same_in_either_unit():
  stats, weights, raw, _, labels = _linear_problem(7, STDS)
  scale = certify.input_scales(stats)
  x = {m: np.asarray((raw[m] - stats[m].mean) / stats[m].std) for m in raw}
  cert = _linear_certificate(stats, weights, raw, labels, scale)
  normalised = _linear_certificate(stats, weights, raw, labels, None)
  fills = {m: 0.9 * v for m, v in x.items()}  # near enough to certify some, not all
  outcome = threats.missing_certified(cert, x, fills, input_scale=scale)
  expected = threats.missing_certified(normalised, x, fills)
  for m in ("a", "b", "any"):
    np.testing.assert_array_equal(outcome[m], expected[m])
  assert 0 < np.sum(outcome["a"]) < len(labels)
  with pytest.raises(ValueError, match="input_scale: expected the scales of a certificate"):
    threats.missing_certified(cert, x, fills)
