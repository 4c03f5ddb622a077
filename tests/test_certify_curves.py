"""Certified-accuracy curves, mean radius, eta ratios and the report figures,
against plain Python loops."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import certify
from mmsafe.eval import plots


def _certificate(seed=0, batch=40, k=5):
  rng = np.random.default_rng(seed)
  correct = rng.random(batch) < 0.8
  radius = np.where(correct, rng.exponential(1.0, batch), 0.0).astype(np.float32)
  if batch > 3 and correct[3]:
    radius[3] = np.inf  # e.g. zero Lipschitz constants
  per_modality = {"audio": np.where(correct, radius * rng.uniform(1, 3, batch), 0.0),
                  "visual": np.where(correct, radius * rng.uniform(1, 3, batch), 0.0)}
  eta = {m: rng.uniform(0.0, 2.0, (batch, k)) for m in ("audio", "visual")}
  eta["audio"][min(5, batch - 1), 1] = 0.0  # a zero denominator is skipped
  labels = rng.integers(0, k, batch)
  labels[labels == 4] = 3  # class 4 has no sample
  for m in eta:
    eta[m][np.arange(batch), labels] = 0.0
  f32 = lambda d: {m: jnp.asarray(v, jnp.float32) for m, v in d.items()}
  cert = certify.Certificate(radius=jnp.asarray(radius), per_modality=f32(per_modality),
                             per_class=jnp.zeros((batch, k)), eta=f32(eta),
                             correct=jnp.asarray(correct), margin=jnp.zeros((batch, k)),
                             kind="local")
  return cert, labels


def test_certified_accuracy_and_mean_radius_match_loops():
  cert, _ = _certificate()
  radius, correct = np.asarray(cert.radius), np.asarray(cert.correct)
  thresholds = certify.radius_grid(3.0, 31)
  curve = np.asarray(certify.certified_accuracy(cert.radius, cert.correct, thresholds))
  for t, value in zip(thresholds, curve):
    expected = sum(1 for r, c in zip(radius, correct) if c and r >= t) / len(radius)
    assert value == pytest.approx(expected)
  assert curve[0] == pytest.approx(correct.mean())  # t = 0: clean accuracy
  assert np.all(np.diff(curve) <= 0)
  # The per-example rule, also over a leading seed axis, averages to the curve.
  at = certify.certified_at(radius, correct, thresholds)
  for t, row in zip(thresholds, at):
    np.testing.assert_array_equal(row, [bool(c and r >= t) for r, c in zip(radius, correct)])
  np.testing.assert_allclose(at.mean(axis=1), curve, rtol=1e-6)
  stacked = certify.certified_at(np.stack([radius, radius / 2]), np.stack([correct] * 2),
                                 thresholds)
  assert stacked.shape == (len(thresholds), 2, len(radius))
  np.testing.assert_array_equal(stacked[:, 0], at)
  finite = np.where(np.isfinite(radius), radius, 0.0)
  assert float(certify.mean_radius(jnp.asarray(finite))) == pytest.approx(finite.mean(), rel=1e-6)
  with_inf = np.where(np.arange(len(radius)) == 2, np.inf, radius)  # an infinite radius is
  expected = with_inf[np.isfinite(with_inf)].mean()                  # left out of the mean
  assert float(certify.mean_radius(jnp.asarray(with_inf))) == pytest.approx(expected, rel=1e-6)
  # `valid` drops padded examples.
  valid = np.arange(len(radius)) < 25
  masked = np.asarray(certify.certified_accuracy(cert.radius, cert.correct, thresholds,
                                                 valid=jnp.asarray(valid)))
  for t, value in zip(thresholds, masked):
    expected = sum(1 for r, c in zip(radius[:25], correct[:25]) if c and r >= t) / 25
    assert value == pytest.approx(expected)
  with pytest.raises(ValueError, match="valid"):
    certify.certified_accuracy(cert.radius, cert.correct, thresholds, valid=jnp.ones(3, bool))


def test_unimodal_curves_use_the_per_modality_radii():
  cert, _ = _certificate(seed=1)
  thresholds = np.array([0.0, 0.5, 1.0, 2.0], np.float32)
  curves = certify.unimodal_certified_accuracy(cert, thresholds)
  assert sorted(curves) == ["audio", "visual"]
  for m, curve in curves.items():
    r = np.asarray(cert.per_modality[m])
    expected = [np.mean(np.asarray(cert.correct) & (r >= t)) for t in thresholds]
    np.testing.assert_allclose(curve, expected, rtol=1e-6)


def test_eta_ratio_matches_a_loop_over_class_pairs():
  cert, labels = _certificate(seed=2)
  ratio = np.asarray(certify.eta_ratio(cert, jnp.asarray(labels), "visual", "audio"))
  num, den = np.asarray(cert.eta["visual"]), np.asarray(cert.eta["audio"])
  k = num.shape[1]
  for y in range(k):
    for j in range(k):
      values = [num[b, j] / den[b, j] for b in range(len(labels))
                if labels[b] == y and den[b, j] > 0]
      if y == j or not values:
        assert np.isnan(ratio[y, j]), (y, j)
      else:
        assert ratio[y, j] == pytest.approx(np.mean(values), rel=1e-5), (y, j)
  assert np.all(np.isnan(ratio[4]))  # no sample of class 4
  with pytest.raises(ValueError, match="unknown modality"):
    certify.eta_ratio(cert, jnp.asarray(labels), "flow", "audio")


def test_summary_is_json_ready_and_figures_are_written(tmp_path):
  cert, labels = _certificate(seed=3)
  thresholds = certify.radius_grid(2.0, 11)
  summary = certify.summarize(cert, thresholds)
  json.dumps(summary, allow_nan=False)
  assert summary["kind"] == "local" and summary["num_examples"] == 40
  assert summary["certified_accuracy"][0] == pytest.approx(summary["clean_accuracy"])
  curves = {kind: (thresholds, np.asarray(summary["certified_accuracy"]) * scale)
            for kind, scale in (("local", 1.0), ("sound", 0.5))}
  path = plots.plot_certified_accuracy(curves, str(tmp_path / "curves.png"))
  ratio = certify.eta_ratio(cert, jnp.asarray(labels), "visual", "audio")
  heat = plots.plot_eta_ratio_heatmap(ratio, str(tmp_path / "eta.png"), numerator="visual",
                                      denominator="audio")
  for p in (path, heat):
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="K, K"):
    plots.plot_eta_ratio_heatmap(np.ones((2, 3)), str(tmp_path / "bad.png"), numerator="a",
                                 denominator="b")


def _at(tree, path):
  """The leaf of `tree` at a `tree_leaves_with_path` path (dict keys only)."""
  for key in path:
    tree = tree[key.key]
  return tree


def test_concatenate_joins_batches():
  a, _ = _certificate(seed=4, batch=3)
  b, _ = _certificate(seed=5, batch=2)
  joined = certify.concatenate([a, b])
  assert joined.kind == "local"
  # Every per-example field is the first batch's rows, then the second's.
  for field in ("radius", "per_modality", "per_class", "eta", "correct", "margin"):
    for path, value in jax.tree_util.tree_leaves_with_path(getattr(joined, field)):
      parts = [_at(getattr(c, field), path) for c in (a, b)]
      np.testing.assert_array_equal(value, np.concatenate(parts), err_msg=f"{field}{path}")
  with pytest.raises(ValueError, match="at least one"):
    certify.concatenate([])
