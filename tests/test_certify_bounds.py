"""Certified radii (Thm 3.3, Thm 3.5, Prop 3.4) against brute-force computations:
exact radii of linear models, per-(sample, class) gradient loops, hand-made cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import certify, models
from mmsafe.models.outputs import HeadParams, ModelOutput
from tests.test_certify_lipschitz import random_variables

K = 4


# ---------------------------------------------------------------------------
# Linear encoders phi^(m)(x) = A_m x: every quantity has a closed form.


def _linear_problem(num_modalities, head, seed=0, batch=6, negative_a=False):
  rng = np.random.default_rng(seed)
  dims_in = [5, 3, 4][:num_modalities]
  dims_feat = [6, 5, 7][:num_modalities]
  names = [f"m{i}" for i in range(num_modalities)]
  A = {m: rng.normal(size=(f, d)) for m, f, d in zip(names, dims_feat, dims_in)}
  x = {m: rng.normal(size=(batch, d)) for m, d in zip(names, dims_in)}
  if head == "concat":
    kernels = {m: rng.normal(size=(f, K)) for m, f in zip(names, dims_feat)}
    weights = {}
  else:
    kernels = {m: np.linalg.qr(rng.normal(size=(f, K)))[0] for m, f in zip(names, dims_feat)}
    low = -1.0 if negative_a else 0.2
    weights = {m: rng.uniform(low, 1.5, size=K) for m in names}
  bias = 0.3 * rng.normal(size=K)
  return A, x, kernels, weights, bias


def _linear_output(A, x, kernels, weights, bias, head):
  features = {m: x[m] @ A[m].T for m in A}
  scores = {m: features[m] @ kernels[m] for m in A}
  if head == "concat":
    logits = sum(scores.values()) + bias
  else:
    logits = sum(weights[m] * scores[m] for m in A) + bias
  f32 = lambda d: {m: jnp.asarray(v, jnp.float32) for m, v in d.items()}
  return ModelOutput(features=f32(features), scores=f32(scores),
                     logits=jnp.asarray(logits, jnp.float32),
                     head=HeadParams(kind=head, bias=jnp.asarray(bias, jnp.float32),
                                     kernels=f32(kernels), weights=f32(weights)))


def _gradients(A, kernels, weights, head, y, k):
  """Per-modality gradient of h_y - h_k (a linear function): A_m^T (v_y - v_k)."""
  if head == "concat":
    return {m: A[m].T @ (kernels[m][:, y] - kernels[m][:, k]) for m in A}
  return {m: A[m].T @ (weights[m][y] * kernels[m][:, y] - weights[m][k] * kernels[m][:, k])
          for m in A}


def _exact_radii(A, x, kernels, weights, bias, head, labels):
  """Brute force: distance to the nearest tie for a linear model, multi-modal and per modality."""
  out = _linear_output(A, x, kernels, weights, bias, head)
  logits = np.asarray(out.logits, np.float64)
  batch = len(labels)
  multi, uni = np.zeros(batch), {m: np.zeros(batch) for m in A}
  for b in range(batch):
    y = labels[b]
    if np.argmax(logits[b]) != y:
      continue
    r, r_uni = np.inf, {m: np.inf for m in A}
    for k in range(K):
      if k == y:
        continue
      grads = _gradients(A, kernels, weights, head, y, k)
      margin = logits[b, y] - logits[b, k]
      r = min(r, margin / np.sqrt(sum(np.sum(g**2) for g in grads.values())))
      for m in A:
        r_uni[m] = min(r_uni[m], margin / np.linalg.norm(grads[m]))
    multi[b] = r
    for m in A:
      uni[m][b] = r_uni[m]
  return multi, uni


def _exact_local_tau(A, kernels, head, labels):
  """The exact Lipschitz constants of the linear model's scores / margins."""
  tau = {}
  for m in A:
    if head == "orthogonal":  # ||grad u_k|| = ||A^T W~_k||
      tau[m] = np.linalg.norm(A[m].T @ kernels[m], axis=0)[None]
    else:  # ||A^T (W_y - W_k)|| / ||W_y - W_k||
      rows = []
      for y in labels:
        diff = kernels[m][:, [y]] - kernels[m]
        c = np.linalg.norm(diff, axis=0)
        rows.append(np.where(c > 0, np.linalg.norm(A[m].T @ diff, axis=0) / np.where(c > 0, c, 1),
                             0.0))
      tau[m] = np.stack(rows)
  return {m: jnp.asarray(t, jnp.float32) for m, t in tau.items()}


def _labels_mostly_correct(A, x, kernels, weights, bias, head):
  logits = np.asarray(_linear_output(A, x, kernels, weights, bias, head).logits)
  labels = np.argmax(logits, -1)
  labels[0] = (labels[0] + 1) % K  # one misclassified sample
  return labels


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_jt_radius_equals_the_exact_radius_of_a_linear_model(num_modalities):
  A, x, kernels, weights, bias = _linear_problem(num_modalities, "concat", seed=num_modalities)
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, "concat")
  out = _linear_output(A, x, kernels, weights, bias, "concat")
  cert = certify.certified_radius(out, jnp.asarray(labels), _exact_local_tau(A, kernels, "concat",
                                                                              labels))
  exact, exact_uni = _exact_radii(A, x, kernels, weights, bias, "concat", labels)
  np.testing.assert_allclose(cert.radius, exact, rtol=1e-4, atol=1e-6)
  for m in A:  # Prop. 3.4 is exact for one modality of a linear model, too
    np.testing.assert_allclose(cert.per_modality[m], exact_uni[m], rtol=1e-4, atol=1e-6)
  assert cert.radius[0] == 0 and not cert.correct[0]
  # The exact radius is tight: stepping (1 + 1e-3) r along the worst direction flips.
  b = 1
  y = labels[b]
  k = int(np.argmin(np.where(np.arange(K) == y, np.inf, np.asarray(cert.per_class[b]))))
  grads = _gradients(A, kernels, weights, "concat", y, k)
  norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
  moved = {m: x[m].copy() for m in A}
  for m in A:
    moved[m][b] -= grads[m] / norm * exact[b] * (1 + 1e-3)
  moved_logits = np.asarray(_linear_output(A, moved, kernels, weights, bias, "concat").logits)
  assert np.argmax(moved_logits[b]) != y


def test_radius_from_scores_equals_the_exact_radius_of_a_linear_model():
  """A user's model given only as per-modality scores: with eta = the exact
  gradient norms of s_y - s_k it is the closed-form radius, like the JT head."""
  A, x, kernels, weights, bias = _linear_problem(3, "concat", seed=5)
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, "concat")
  out = _linear_output(A, x, kernels, weights, bias, "concat")
  eta = {m: np.stack([[np.linalg.norm(_gradients(A, kernels, weights, "concat", y, k)[m])
                       for k in range(K)] for y in labels]) for m in A}
  cert = certify.radius_from_scores(out.scores, jnp.asarray(labels), eta, bias=out.head.bias,
                                    kind="local")
  exact, exact_uni = _exact_radii(A, x, kernels, weights, bias, "concat", labels)
  np.testing.assert_allclose(cert.radius, exact, rtol=1e-4, atol=1e-6)
  for m in A:
    np.testing.assert_allclose(cert.per_modality[m], exact_uni[m], rtol=1e-4, atol=1e-6)
  assert cert.kind == "local" and not cert.correct[0] and cert.radius[0] == 0
  jitted = jax.jit(lambda s, e: certify.radius_from_scores(s, jnp.asarray(labels), e,
                                                            bias=out.head.bias).radius)
  np.testing.assert_allclose(jitted(out.scores, eta), cert.radius, rtol=1e-6)
  with pytest.raises(ValueError, match=r"eta: expected the modalities of scores"):
    certify.radius_from_scores(out.scores, jnp.asarray(labels), {"m0": eta["m0"]})
  with pytest.raises(ValueError, match=r"eta\['m1'\]: expected non-negative"):
    certify.radius_from_scores(out.scores, jnp.asarray(labels), {**eta, "m1": -eta["m1"]})
  with pytest.raises(ValueError, match=r"scores: expected one \[B, K\] shape"):
    certify.radius_from_scores({**out.scores, "m2": out.scores["m2"][:3]}, jnp.asarray(labels),
                               eta)


@pytest.mark.parametrize("num_modalities", [2, 3])
@pytest.mark.parametrize("negative_a", [False, True])
def test_orthogonal_radius_is_below_the_exact_radius_of_a_linear_model(num_modalities, negative_a):
  A, x, kernels, weights, bias = _linear_problem(num_modalities, "orthogonal", seed=10,
                                                 negative_a=negative_a)
  if negative_a:
    assert any(np.any(w < 0) for w in weights.values())
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, "orthogonal")
  out = _linear_output(A, x, kernels, weights, bias, "orthogonal")
  tau = _exact_local_tau(A, kernels, "orthogonal", labels)
  cert = certify.certified_radius(out, jnp.asarray(labels), tau)
  exact, exact_uni = _exact_radii(A, x, kernels, weights, bias, "orthogonal", labels)
  assert np.all(np.asarray(cert.radius) <= exact * (1 + 1e-5) + 1e-7)
  for m in A:
    assert np.all(np.asarray(cert.per_modality[m]) <= exact_uni[m] * (1 + 1e-5) + 1e-7)
  assert np.asarray(cert.radius)[1:].min() > 0
  # Brute-force Thm 3.5 denominator with |a|.
  for b in range(1, len(labels)):
    y = labels[b]
    for k in range(K):
      if k == y:
        continue
      eta = {m: abs(weights[m][y]) * tau[m][0, y] + abs(weights[m][k]) * tau[m][0, k] for m in A}
      margin = out.logits[b, y] - out.logits[b, k]
      expected = margin / np.sqrt(sum(float(e)**2 for e in eta.values()))
      np.testing.assert_allclose(cert.per_class[b, k], expected, rtol=1e-5)
      for m in A:
        np.testing.assert_allclose(cert.eta[m][b, k], eta[m], rtol=1e-6)


def _isometric_orthogonal_problem(seed, negative_a, batch=8):
  """Linear encoders `phi^(m)(x) = A_m x` with orthonormal rows (`A A^T = I`,
  so `L^(m) = 1` and `||A^T v|| = ||v||`) under an orthogonal head."""
  rng = np.random.default_rng(seed)
  names, dims_in, dims_feat = ["m0", "m1", "m2"], [8, 9, 7], [6, 5, 7]
  A = {m: np.linalg.qr(rng.normal(size=(d, f)))[0].T for m, d, f in zip(names, dims_in, dims_feat)}
  kernels = {m: np.linalg.qr(rng.normal(size=(f, K)))[0] for m, f in zip(names, dims_feat)}
  low = -1.0 if negative_a else 0.2
  weights = {m: rng.uniform(low, 1.5, size=K) for m in names}
  x = {m: rng.normal(size=(batch, d)) for m, d in zip(names, dims_in)}
  return A, x, kernels, weights, 0.3 * rng.normal(size=K)


@pytest.mark.parametrize("negative_a", [False, True])
def test_tight_orthogonal_radius_is_exact_for_isometric_linear_encoders(negative_a):
  A, x, kernels, weights, bias = _isometric_orthogonal_problem(20, negative_a)
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, "orthogonal")
  out = _linear_output(A, x, kernels, weights, bias, "orthogonal")
  tau = {m: jnp.ones((1, K), jnp.float32) for m in A}  # sound: ||W~_k|| L^(m) = 1
  ones = {m: 1.0 for m in A}
  tight = certify.certified_radius(out, jnp.asarray(labels), tau, feature_lipschitz=ones)
  triangle = certify.certified_radius(out, jnp.asarray(labels), tau)
  exact, exact_uni = _exact_radii(A, x, kernels, weights, bias, "orthogonal", labels)
  # For orthonormal rows of W~ and of A_m the tight form is the closed form...
  np.testing.assert_allclose(tight.radius, exact, rtol=1e-4, atol=1e-6)
  for m in A:
    np.testing.assert_allclose(tight.per_modality[m], exact_uni[m], rtol=1e-4, atol=1e-6)
    for b in range(1, len(labels)):  # eta = sqrt(a_y^2 + a_k^2)
      y = labels[b]
      expected = np.sqrt(weights[m][y] ** 2 + weights[m] ** 2)
      mask = np.arange(K) != y
      np.testing.assert_allclose(np.asarray(tight.eta[m][b])[mask], expected[mask], rtol=1e-5)
  # ...while the paper's triangle form (|a_y| + |a_k|) is strictly looser.
  correct = exact > 0
  assert np.all(np.asarray(triangle.radius)[correct] < exact[correct] * (1 - 1e-3))
  assert np.all(np.asarray(triangle.radius) <= np.asarray(tight.radius) * (1 + 1e-6))


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_sound_concat_radius_is_exact_for_isometric_linear_encoders(num_modalities):
  """The concat head's sound radius `margin / sqrt(sum_m ||W_y - W_k||^2 L_m^2)`
  (jt_cert's certificate) equals the exact minimal flipping perturbation of
  a linear model whose encoders have orthonormal rows (`L_m = 1`)."""
  A, x, _, _, bias = _isometric_orthogonal_problem(21 + num_modalities, False)
  A = dict(list(A.items())[:num_modalities])
  x = {m: x[m] for m in A}
  rng = np.random.default_rng(num_modalities)
  kernels = {m: rng.normal(size=(a.shape[0], K)) for m, a in A.items()}
  labels = _labels_mostly_correct(A, x, kernels, {}, bias, "concat")
  out = _linear_output(A, x, kernels, {}, bias, "concat")
  # tau = 2 (looser than the one-constant form) so the radius comes from L_m.
  tau = {m: jnp.full((1, K), 2.0) for m in A}
  cert = certify.certified_radius(out, jnp.asarray(labels), tau,
                                  feature_lipschitz={m: 1.0 for m in A}, kind="sound")
  exact, exact_uni = _exact_radii(A, x, kernels, {}, bias, "concat", labels)
  np.testing.assert_allclose(cert.radius, exact, rtol=1e-4, atol=1e-6)
  for m in A:
    np.testing.assert_allclose(cert.per_modality[m], exact_uni[m], rtol=1e-4, atol=1e-6)
  assert np.asarray(cert.radius)[1:].min() > 0


def test_tight_orthogonal_radius_never_exceeds_the_exact_radius():
  # General linear encoders (L^(m) = ||A_m||_2, not isometries): still sound,
  # and never looser than the triangle form; jit-able with traced constants.
  A, x, kernels, weights, bias = _linear_problem(3, "orthogonal", seed=11, negative_a=True)
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, "orthogonal")
  out = _linear_output(A, x, kernels, weights, bias, "orthogonal")
  lipschitz = {m: float(np.linalg.norm(A[m], 2)) for m in A}
  tau = {m: jnp.asarray(np.linalg.norm(kernels[m], axis=0)[None] * lipschitz[m], jnp.float32)
         for m in A}
  tight = jax.jit(lambda o, t, f: certify.certified_radius(o, jnp.asarray(labels), t,
                                                           feature_lipschitz=f))(
      out, tau, lipschitz)
  triangle = certify.certified_radius(out, jnp.asarray(labels), tau)
  exact, _ = _exact_radii(A, x, kernels, weights, bias, "orthogonal", labels)
  assert np.all(np.asarray(tight.radius) <= exact * (1 + 1e-5) + 1e-7)
  assert np.all(np.asarray(tight.radius) >= np.asarray(triangle.radius) * (1 - 1e-6))
  assert np.asarray(tight.radius)[1:].min() > 0
  with pytest.raises(ValueError, match=r"feature_lipschitz: expected modalities"):
    certify.certified_radius(out, jnp.asarray(labels), tau, feature_lipschitz={"m0": 1.0})
  with pytest.raises(ValueError, match=r"feature_lipschitz\['m1'\]: expected a non-negative"):
    certify.certified_radius(out, jnp.asarray(labels), tau,
                             feature_lipschitz={**lipschitz, "m1": -1.0})


def test_orthogonal_radius_is_exact_when_class_gradients_are_opposite():
  # A_m = (W~_0 - W~_1)^T v_m^T: u_0 = v.x, u_1 = -v.x, u_k = 0 else -- the
  # triangle inequality in Thm 3.5's denominator is then an equality.
  rng = np.random.default_rng(3)
  names = ["m0", "m1", "m2"]
  kernels = {m: np.linalg.qr(rng.normal(size=(6, K)))[0] for m in names}
  A = {m: np.outer(kernels[m][:, 0] - kernels[m][:, 1], rng.normal(size=4)) for m in names}
  weights = {m: rng.uniform(0.2, 1.5, size=K) for m in names}
  bias = 0.1 * rng.normal(size=K)
  x = {m: rng.normal(size=(8, 4)) for m in names}
  logits = np.asarray(_linear_output(A, x, kernels, weights, bias, "orthogonal").logits)
  labels = np.argmax(logits, -1)
  out = _linear_output(A, x, kernels, weights, bias, "orthogonal")
  cert = certify.certified_radius(out, jnp.asarray(labels),
                                  _exact_local_tau(A, kernels, "orthogonal", labels))
  exact, _ = _exact_radii(A, x, kernels, weights, bias, "orthogonal", labels)
  np.testing.assert_allclose(cert.radius, exact, rtol=1e-4)


@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_sound_bound_is_below_the_exact_radius_of_a_linear_model(head):
  A, x, kernels, weights, bias = _linear_problem(3, head, seed=5, negative_a=True)
  labels = _labels_mostly_correct(A, x, kernels, weights, bias, head)
  out = _linear_output(A, x, kernels, weights, bias, head)
  # Sound constants with Lip(phi^(m)) = ||A_m|| computed by the library's operator norm.
  lip = {m: float(certify.operator_norm(lambda v, a=jnp.asarray(a, jnp.float32): a @ v,
                                        (a.shape[1],), method="power", iterations=50))
         for m, a in A.items()}
  for m in A:
    assert lip[m] >= np.linalg.svd(A[m], compute_uv=False)[0]
  if head == "concat":
    tau = {m: jnp.full((1, K), lip[m]) for m in A}
  else:
    tau = {m: jnp.asarray(np.linalg.norm(kernels[m], axis=0)[None] * lip[m], jnp.float32)
           for m in A}
  cert = certify.certified_radius(out, jnp.asarray(labels), tau, kind="sound")
  exact, exact_uni = _exact_radii(A, x, kernels, weights, bias, head, labels)
  assert cert.kind == "sound"
  assert np.all(np.asarray(cert.radius) <= exact + 1e-7)
  assert np.asarray(cert.radius)[1:].min() > 0
  for m in A:
    assert np.all(np.asarray(cert.per_modality[m]) <= exact_uni[m] + 1e-7)


# ---------------------------------------------------------------------------
# Hand-made outputs: minimum over all classes, misclassification, masking.


def _manual_output(logits, head="orthogonal", weights=None, kernels=None):
  logits = jnp.asarray(logits, jnp.float32)
  k = logits.shape[-1]
  if kernels is None:
    kernels = {"a": jnp.eye(k + 1, k), "b": jnp.eye(k + 2, k)}
  if weights is None and head == "orthogonal":
    weights = {m: jnp.ones((k,)) for m in kernels}
  zeros = {m: jnp.zeros((logits.shape[0], k)) for m in kernels}
  return ModelOutput(features={m: jnp.zeros((logits.shape[0], kernels[m].shape[0]))
                               for m in kernels},
                     scores=zeros, logits=logits,
                     head=HeadParams(kind=head, bias=jnp.zeros((k,)), kernels=kernels,
                                     weights=weights or {}))


def test_radius_is_the_minimum_over_all_wrong_classes_not_the_runner_up():
  out = _manual_output([[5.0, 4.0, 3.0]])
  # Class 1 is the runner-up, but class 2 is far more vulnerable.
  tau = {"a": jnp.array([[0.1, 0.1, 10.0]]), "b": jnp.zeros((1, 3))}
  cert = certify.certified_radius(out, jnp.array([0]), tau)
  r1 = 1.0 / 0.2
  r2 = 2.0 / 10.1
  np.testing.assert_allclose(cert.per_class[0], [np.inf, r1, r2], rtol=1e-6)
  np.testing.assert_allclose(cert.radius, [r2], rtol=1e-6)
  np.testing.assert_allclose(cert.per_modality["a"], [r2], rtol=1e-6)
  assert float(cert.per_modality["b"][0]) == np.inf  # modality b cannot move anything
  np.testing.assert_allclose(cert.eta["a"][0], [0.0, 0.2, 10.1], rtol=1e-6)


def test_misclassified_samples_get_radius_zero_and_the_label_entry_is_masked():
  out = _manual_output([[3.0, 5.0, 1.0], [3.0, 1.0, 2.0]])
  tau = {"a": jnp.ones((1, 3)), "b": jnp.ones((1, 3))}
  cert = certify.certified_radius(out, jnp.array([0, 0]), tau)
  assert not bool(cert.correct[0]) and bool(cert.correct[1])
  assert float(cert.radius[0]) == 0.0 and float(cert.radius[1]) > 0
  for m in ("a", "b"):
    assert float(cert.per_modality[m][0]) == 0.0
    assert float(cert.eta[m][0, 0]) == 0.0
  assert float(cert.per_class[0, 1]) < 0  # class 1 already wins
  assert np.all(np.isinf(np.asarray(cert.per_class)[:, 0]))
  np.testing.assert_allclose(cert.margin[1], [0.0, 2.0, 1.0])


def test_zero_vulnerability_gives_an_infinite_radius_only_for_positive_margins():
  out = _manual_output([[2.0, 1.0], [1.0, 1.0]])
  tau = {"a": jnp.zeros((1, 2)), "b": jnp.zeros((1, 2))}
  cert = certify.certified_radius(out, jnp.array([0, 0]), tau)
  assert float(cert.radius[0]) == np.inf
  assert float(cert.radius[1]) == 0.0  # a tie is never certified


def test_certified_radius_is_jittable():
  out = _manual_output([[5.0, 4.0, 3.0], [1.0, 2.0, 0.0]])
  tau = {"a": jnp.full((2, 3), 0.5), "b": jnp.full((1, 3), 0.25)}
  labels = jnp.array([0, 1])
  eager = certify.certified_radius(out, labels, tau, kind="local")
  jitted = jax.jit(lambda o, y, t: certify.certified_radius(o, y, t, kind="local"))(
      out, labels, tau)
  assert jitted.kind == "local"
  np.testing.assert_allclose(jitted.radius, eager.radius)


# ---------------------------------------------------------------------------
# Errors.


def test_head_dimension_below_k_is_a_clear_error():
  out = _manual_output([[1.0, 0.0, 0.0]], kernels={"a": jnp.ones((2, 3)), "b": jnp.eye(4, 3)})
  tau = {"a": jnp.ones((1, 3)), "b": jnp.ones((1, 3))}
  with pytest.raises(ValueError, match=r"kernels\['a'\].*d = 2 < K = 3"):
    certify.certified_radius(out, jnp.array([0]), tau)
  out = _manual_output([[1.0, 0.0, 0.0]], head="concat",
                       kernels={"a": jnp.ones((4, 2)), "b": jnp.ones((4, 3))})
  with pytest.raises(ValueError, match=r"kernels\['a'\].*K=3"):
    certify.certified_radius(out, jnp.array([0]), tau)


def test_bad_tau_labels_and_logits_are_clear_errors():
  out = _manual_output([[1.0, 0.0, 0.0]])
  good = {"a": jnp.ones((1, 3)), "b": jnp.ones((1, 3))}
  with pytest.raises(ValueError, match=r"tau\['a'\]: expected \[B=1, K=3\]"):
    certify.certified_radius(out, jnp.array([0]), {**good, "a": jnp.ones((1, 2))})
  with pytest.raises(ValueError, match="tau: expected modalities"):
    certify.certified_radius(out, jnp.array([0]), {"a": good["a"]})
  with pytest.raises(ValueError, match="non-negative"):
    certify.certified_radius(out, jnp.array([0]), {**good, "b": -good["b"]})
  with pytest.raises(ValueError, match=r"labels: expected values in \[0, 3\)"):
    certify.certified_radius(out, jnp.array([3]), good)
  with pytest.raises(ValueError, match="labels: expected int"):
    certify.certified_radius(out, jnp.array([0, 1]), good)
  with pytest.raises(ValueError, match="output.logits: expected finite"):
    certify.certified_radius(_manual_output([[np.nan, 0.0, 0.0]]), jnp.array([0]), good)


# ---------------------------------------------------------------------------
# A real (nonlinear) model: `certify` against a per-sample, per-class loop.


@pytest.fixture(scope="module")
def small_models():
  out = {}
  shapes = {"img": (5, 4, 1), "u": (6,), "v": (3,)}
  encoders = {"img": {"name": "cnn", "channels": (3,), "features": 8},
              "u": {"name": "mlp", "widths": (9, 7)}, "v": {"name": "mlp", "widths": (8,)}}
  rng = np.random.default_rng(0)
  x = {m: jnp.asarray(rng.normal(size=(5, *s)), jnp.float32) for m, s in shapes.items()}
  for head, modalities in (("concat", ("img", "u")), ("orthogonal", ("img", "u", "v"))):
    model = models.build({"head": head, "encoders": {m: encoders[m] for m in modalities}},
                         num_classes=K, input_shapes={m: shapes[m] for m in modalities})
    inputs = {m: x[m] for m in modalities}
    # Random weights of the model's structure; orthogonal: orthonormal W~ and
    # weights a of both signs.
    variables = random_variables(model.init, jax.random.PRNGKey(0), inputs, seed=4)
    logits = model.apply(variables, inputs).logits
    labels = np.array(jnp.argmax(logits, -1))
    labels[0] = (labels[0] + 1) % K
    out[head] = (model, variables, inputs, jnp.asarray(labels))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_certify_local_matches_a_per_sample_per_class_gradient_loop(small_models, head):
  model, variables, x, labels = small_models[head]
  cert = certify.certify(model, variables, x, labels, kind="local")
  assert cert.kind == "local"
  out = model.apply(variables, x)
  grads = {}  # (m, b, k) -> gradient of the uni-modal score k, one sample at a time
  for m in x:
    fn = jax.jit(jax.grad(lambda xm, others, k, m=m: model.apply(
        variables, {**others, m: xm[None]}).scores[m][0, k]))
    for k in range(K):
      for b in range(len(labels)):
        others = {n: v[b:b + 1] for n, v in x.items() if n != m}
        grads[m, b, k] = np.asarray(fn(x[m][b], others, k), np.float64)
  logits = np.asarray(out.logits, np.float64)
  for b in range(len(labels)):
    y = int(labels[b])
    radii = []
    for k in range(K):
      if k == y:
        continue
      eta = {}
      for m in x:
        if head == "concat":  # eta = c tau = ||grad (s_y - s_k)||
          eta[m] = np.linalg.norm(grads[m, b, y] - grads[m, b, k])
        else:
          a = np.abs(np.asarray(out.head.weights[m], np.float64))
          eta[m] = a[y] * np.linalg.norm(grads[m, b, y]) + a[k] * np.linalg.norm(grads[m, b, k])
        np.testing.assert_allclose(cert.eta[m][b, k], eta[m], rtol=1e-4, atol=1e-7)
      r = (logits[b, y] - logits[b, k]) / np.sqrt(sum(e**2 for e in eta.values()))
      np.testing.assert_allclose(cert.per_class[b, k], r, rtol=1e-4)
      radii.append(r)
    expected = max(min(radii), 0.0) if np.argmax(logits[b]) == y else 0.0
    np.testing.assert_allclose(cert.radius[b], expected, rtol=1e-4)
  assert float(cert.radius[0]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_certify_kinds_are_recorded_and_ordered(small_models, head):
  model, variables, x, labels = small_models[head]
  local = certify.certify(model, variables, x, labels, kind="local")
  empirical = certify.certify(model, variables, x, labels, kind="empirical", batches=[x])
  sound = certify.certify(model, variables, x, labels, kind="sound")
  assert (local.kind, empirical.kind, sound.kind) == ("local", "empirical", "sound")
  # empirical >= local constants at these very points, sound >= both.
  assert np.all(np.asarray(empirical.radius) <= np.asarray(local.radius) * (1 + 1e-5))
  assert np.all(np.asarray(sound.radius) <= np.asarray(empirical.radius) * (1 + 1e-5))
  assert np.asarray(sound.radius)[1:].max() > 0
  # Precomputed constants are used as given; a kind mismatch is an error.
  constants = certify.sound_constants(model, variables)
  again = certify.certify(model, variables, x, labels, kind="sound", constants=constants)
  np.testing.assert_allclose(again.radius, sound.radius, rtol=1e-6)
  with pytest.raises(ValueError, match="kind 'local'"):
    certify.certify(model, variables, x, labels, kind="local", constants=constants)


def test_certify_rejects_nan_inputs_unknown_kinds_and_missing_datasets(small_models):
  model, variables, x, labels = small_models["concat"]
  bad = {**x, "u": x["u"].at[1, 2].set(jnp.nan)}
  with pytest.raises(ValueError, match=r"inputs\['u'\]: expected finite"):
    certify.certify(model, variables, bad, labels)
  with pytest.raises(ValueError, match="kind: expected one of"):
    certify.certify(model, variables, x, labels, kind="global")
  with pytest.raises(ValueError, match="batches"):
    certify.certify(model, variables, x, labels, kind="empirical")


def _traces_and_compiles(fn):
  """The number of jaxpr traces and backend compilations while `fn()` runs."""
  events = []
  listener = lambda event, duration, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return sum(e in ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/backend_compile_duration") for e in events)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_direct_calls_compile_once_per_structure(small_models, head):
  """A second direct call with the same model, options and shapes neither traces
  nor compiles (each entry point keeps its compiled program)."""
  model, variables, x, labels = small_models[head]
  score_fn = lambda inputs: model.apply(variables, inputs).scores
  calls = {
      "certify local": lambda: certify.certify(model, variables, x, labels, kind="local"),
      "certify empirical": lambda: certify.certify(model, variables, x, labels,
                                                   kind="empirical", batches=[x, x]),
      "certify sound": lambda: certify.certify(model, variables, x, labels, kind="sound",
                                               iterations=20),
      "local_lipschitz": lambda: certify.local_lipschitz(score_fn, x, "u", labels=labels),
      "local_constants chunked": lambda: certify.local_constants(model, variables, x,
                                                                 chunk_size=2),
      "empirical_constants": lambda: certify.empirical_constants(model, variables, [x]),
      "sound_constants": lambda: certify.sound_constants(model, variables),
  }
  first = {name: fn() for name, fn in calls.items()}
  for name, fn in calls.items():
    assert _traces_and_compiles(fn) == 0, f"{name}: traced or compiled again"
  # New variables of the same structure reuse the program, and give new radii.
  scaled = jax.tree_util.tree_map(lambda v: 1.5 * v, variables)
  assert _traces_and_compiles(
      lambda: certify.certify(model, scaled, x, labels, kind="local")) == 0
  again = certify.certify(model, variables, x, labels, kind="local")
  np.testing.assert_array_equal(again.radius, first["certify local"].radius)
  # The counter sees compilations: a new batch size compiles the program again.
  fewer = {m: v[:3] for m, v in x.items()}
  assert _traces_and_compiles(
      lambda: certify.certify(model, variables, fewer, labels[:3], kind="local")) > 0
