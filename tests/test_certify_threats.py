"""Radii per threat model (`mmsafe.certify.threats`) on linear models, where
every radius and every missing-modality outcome has a closed form."""

import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import certify
from mmsafe.certify import ablation, smoothing, threats
from tests.test_certify_bounds import (_exact_local_tau, _exact_radii, _labels_mostly_correct,
                                       _linear_output, _linear_problem)


def _problem(head, scale):
  A, x, kernels, weights, bias = _linear_problem(3, head, seed=4, batch=40)
  x = {m: v * scale[m] for m, v in x.items()}
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, head)
  out = _linear_output(A, x, kernels, weights, bias, head)
  cert = certify.certified_radius(out, jnp.asarray(labels),
                                  _exact_local_tau(A, kernels, head, labels))
  return A, x, kernels, weights, bias, labels, cert


@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_threat_radii_are_the_joint_unimodal_and_worst_modality_radii(head):
  A, x, kernels, weights, bias, labels, cert = _problem(head, {"m0": 1.0, "m1": 1.0, "m2": 1.0})
  radii = threats.threat_radii(cert)
  exact, exact_uni = _exact_radii(A, x, kernels, weights, bias, head, labels)
  assert sorted(radii) == ["joint", "modality:m0", "modality:m1", "modality:m2",
                           "worst_modality"]
  if head == "concat":  # Thm 3.3 and Prop. 3.4 are exact on linear models
    np.testing.assert_allclose(radii["joint"], exact, rtol=1e-4, atol=1e-6)
    for m in A:
      np.testing.assert_allclose(radii[f"modality:{m}"], exact_uni[m], rtol=1e-4, atol=1e-6)
  else:  # Thm 3.5's triangle inequality: sound, below the exact radii
    assert np.all(radii["joint"] <= exact + 1e-6)
    for m in A:
      assert np.all(radii[f"modality:{m}"] <= exact_uni[m] + 1e-6)
      np.testing.assert_array_equal(radii[f"modality:{m}"], np.asarray(cert.per_modality[m]))
  np.testing.assert_allclose(radii["worst_modality"],
                             np.min([radii[f"modality:{m}"] for m in A], axis=0))
  assert np.all(radii["worst_modality"] >= radii["joint"] - 1e-6)


@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_a_certified_missing_modality_never_changes_the_prediction(head):
  # Small inputs in m0 make losing m0 certifiable for many examples; losing a
  # modality whose input is large is not.
  A, x, kernels, weights, bias, labels, cert = _problem(head, {"m0": 0.05, "m1": 1.0, "m2": 3.0})
  missing = threats.missing_certified(cert, x)
  distances = threats.fill_distances(x)
  for m in A:
    np.testing.assert_allclose(distances[m], np.linalg.norm(x[m], axis=1), rtol=1e-6)
    dropped = {k: np.zeros_like(v) if k == m else v for k, v in x.items()}
    logits = np.asarray(_linear_output(A, dropped, kernels, weights, bias, head).logits)
    kept = np.argmax(logits, -1) == labels
    assert np.all(kept[missing[m]])  # sound: a certified loss never flips the prediction
    np.testing.assert_array_equal(
        missing[m], np.asarray(cert.correct) & (np.asarray(cert.per_modality[m]) > distances[m]))
  assert missing["m0"].sum() > 10 and not missing["m2"].any()
  np.testing.assert_array_equal(missing["any"], missing["m0"] & missing["m1"] & missing["m2"])
  # A fill other than zeros moves the distance.
  fills = {"m0": np.full(x["m0"].shape[1:], 0.5)}
  np.testing.assert_allclose(threats.fill_distances(x, fills)["m0"],
                             np.linalg.norm(x["m0"] - 0.5, axis=1), rtol=1e-6)
  with pytest.raises(ValueError, match=r"inputs: expected modalities \['m0', 'm1', 'm2'\]"):
    threats.missing_certified(cert, {"m0": x["m0"]})


def test_a_certificate_of_another_threat_model_is_refused_naming_it():
  ones = np.ones(2)
  votes = ablation.AblationCertificate(
      prediction=np.zeros(2, np.int32), per_modality={"a": ones}, total=ones, gap=ones,
      p_lower=ones, p_upper=ones, per_class=np.zeros(2, bool), correct=np.ones(2, bool),
      keep={"a": 1}, sizes={"a": 3}, num_samples=10, alpha=0.001)
  for call in (lambda: threats.threat_radii(votes),
               lambda: threats.missing_certified(votes, {"a": np.zeros((2, 3))})):
    with pytest.raises(TypeError, match="cert: expected one of .*'Certificate'.* got "
                                        "AblationCertificate; an ablation certificate counts"):
      call()


def test_missing_modality_is_certified_from_a_smoothed_certificate_too():
  x = {"a": np.array([[3.0, 4.0], [0.3, 0.4]]), "b": np.zeros((2, 2))}  # ||x_a|| = 5, 0.5
  radius = np.array([6.0, 0.4])
  smoothed = smoothing.SmoothedCertificate(
      prediction=np.zeros(2, np.int32), radius=radius, per_modality={"a": radius, "b": radius},
      normalized_radius=radius, p_lower=np.ones(2), correct=np.array([True, True]),
      sigma={"a": 1.0, "b": 1.0}, num_samples=10, alpha=0.001)
  missing = threats.missing_certified(smoothed, x)
  # 6 > 5 certifies losing a on the first example; 0.4 < 0.5 does not on the second.
  np.testing.assert_array_equal(missing["a"], [True, False])
  np.testing.assert_array_equal(missing["b"], [True, True])  # b is already at its fill
  np.testing.assert_array_equal(missing["any"], [True, False])
