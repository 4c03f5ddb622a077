"""Tests for mmsafe.manifold.stiefel (Stiefel manifold of row-orthonormal matrices)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmsafe.manifold import (orthogonality_error, project_tangent, random_stiefel,
                             retract_cayley, retract_polar, retract_qr, stiefel_transform)

RETRACT_FNS = {
    "qr": lambda w, xi: retract_qr(w + xi),
    "polar": lambda w, xi: retract_polar(w + xi),
    "cayley": retract_cayley,
}


def _key(i: int) -> jax.Array:
  return jax.random.PRNGKey(i)


def _tangent(w: jax.Array, key: jax.Array) -> jax.Array:
  """A random unit-norm tangent vector at w."""
  xi = project_tangent(w, jax.random.normal(key, w.shape, w.dtype))
  return xi / jnp.linalg.norm(xi)


def _ortho_err_np(w) -> float:
  w = np.asarray(w, np.float64)
  return float(np.max(np.abs(w @ w.T - np.eye(w.shape[0]))))


# ---------------------------------------------------------------------------
# random_stiefel
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("k,d", [(1, 7), (4, 16), (10, 10), (31, 512)])
def test_random_stiefel_orthonormal_rows(k, d):
  w = jax.jit(random_stiefel, static_argnums=(1, 2))(_key(k + d), k, d)
  assert w.shape == (k, d)
  assert w.dtype == jnp.float32
  assert _ortho_err_np(w) < 1e-5
  assert float(orthogonality_error(w)) < 1e-5


def test_random_stiefel_dtype_and_haar_mean():
  w = random_stiefel(_key(0), 3, 5, dtype=jnp.bfloat16)
  assert w.dtype == jnp.bfloat16
  # Haar measure is invariant under W -> -W row by row, so E[W] = 0. Without
  # the sign fix, QR of a Gaussian gives a biased diagonal (about -0.35 here).
  ws = jax.vmap(lambda k: random_stiefel(k, 3, 5))(jax.random.split(_key(1), 4000))
  assert float(jnp.max(jnp.abs(ws.mean(0)))) < 0.05
  # Different keys give different points; the same key the same point.
  np.testing.assert_array_equal(random_stiefel(_key(2), 3, 5), random_stiefel(_key(2), 3, 5))
  assert not np.allclose(random_stiefel(_key(2), 3, 5), random_stiefel(_key(3), 3, 5))


def test_random_stiefel_rejects_k_greater_than_d():
  with pytest.raises(ValueError, match=r"k=5.*d=3"):
    random_stiefel(_key(0), 5, 3)


# ---------------------------------------------------------------------------
# project_tangent
# ---------------------------------------------------------------------------


def test_project_tangent_condition_idempotence_and_normal_part():
  w = random_stiefel(_key(0), 5, 12)
  g = jax.random.normal(_key(1), w.shape)
  xi = jax.jit(project_tangent)(w, g)
  # Tangent condition xi w^T + w xi^T = 0.
  cond = np.asarray(xi @ w.T + w @ xi.T)
  assert np.max(np.abs(cond)) < 1e-5
  # Idempotent.
  np.testing.assert_allclose(project_tangent(w, xi), xi, atol=1e-5)
  # The removed part g - xi = S w with S symmetric (the normal space), so the
  # projection is orthogonal: <g - xi, eta> = 0 for every tangent eta.
  s = np.asarray((g - xi) @ w.T)
  np.testing.assert_allclose(s, s.T, atol=1e-5)
  np.testing.assert_allclose(np.asarray(s @ w), np.asarray(g - xi), atol=1e-5)
  eta = _tangent(w, _key(2))
  assert abs(float(jnp.vdot(g - xi, eta))) < 1e-5
  # Not the identity (a random g is not tangent).
  assert float(jnp.max(jnp.abs(g - xi))) > 1e-2


def test_riemannian_gradient_of_linear_cost_closed_form():
  k, d = 4, 9
  w = random_stiefel(_key(3), k, d)
  c = jax.random.normal(_key(4), (k, d))
  f = lambda w: jnp.vdot(c, w)
  rgrad = project_tangent(w, jax.grad(f)(w))
  wn, cn = np.asarray(w, np.float64), np.asarray(c, np.float64)
  closed = cn - 0.5 * (cn @ wn.T + wn @ cn.T) @ wn
  np.testing.assert_allclose(np.asarray(rgrad), closed, atol=1e-5)
  # Defining property of the Riemannian gradient: it is tangent and
  # <grad f, eta> = Df(w)[eta] for every tangent eta.
  for i in range(3):
    eta = _tangent(w, _key(10 + i))
    _, df = jax.jvp(f, (w,), (eta,))
    np.testing.assert_allclose(float(jnp.vdot(rgrad, eta)), float(df), atol=1e-5)


def _equations(jaxpr):
  """Every equation of a jaxpr, those of nested jaxprs (jit, cond, ...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_matmuls_run_at_highest_precision():
  # On a CPU every precision computes the same numbers, so the program itself
  # is inspected: each matrix product carries Precision.HIGHEST for both operands.
  w = random_stiefel(_key(0), 3, 6)
  for fn in (lambda w: project_tangent(w, w), retract_polar, lambda w: retract_cayley(w, w),
             orthogonality_error):
    products = [e for e in _equations(jax.make_jaxpr(fn)(w).jaxpr)
                if e.primitive.name == "dot_general"]
    assert products, fn
    for eqn in products:
      assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2, eqn


# ---------------------------------------------------------------------------
# Retractions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["qr", "polar", "cayley"])
@pytest.mark.parametrize("scale", [1e-3, 0.1, 1.0, 5.0])
def test_retractions_land_on_manifold(name, scale):
  retract = jax.jit(RETRACT_FNS[name])
  for i in range(3):
    w = random_stiefel(_key(i), 6, 20)
    if name == "cayley":
      xi = scale * _tangent(w, _key(100 + i))
    else:  # QR and polar accept any ambient perturbation.
      xi = scale * jax.random.normal(_key(100 + i), w.shape)
    y = retract(w, xi)
    assert y.shape == w.shape and y.dtype == w.dtype
    assert float(orthogonality_error(y)) < 2e-6, (name, scale, i)


@pytest.mark.parametrize("name", ["qr", "polar", "cayley"])
def test_retraction_at_zero_is_identity(name):
  w = random_stiefel(_key(7), 5, 11)
  np.testing.assert_allclose(RETRACT_FNS[name](w, jnp.zeros_like(w)), w, atol=2e-6)
  if name == "qr":  # The sign fix keeps QR continuous: no flipped rows.
    np.testing.assert_allclose(retract_qr(w), w, atol=2e-6)
  if name == "polar":
    np.testing.assert_allclose(retract_polar(w), w, atol=2e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qr", "polar", "cayley"])
def test_retraction_first_order(name):
  """(R_w(t xi) - w)/t -> xi, with error O(t) (float64 finite differences)."""
  with jax.enable_x64(True):
    w = random_stiefel(_key(8), 4, 10, dtype=jnp.float64)
    xi = _tangent(w, _key(9))
    errs = []
    for t in (1e-2, 1e-3, 1e-4):
      fd = (RETRACT_FNS[name](w, t * xi) - w) / t
      errs.append(float(jnp.linalg.norm(fd - xi)))
  assert errs[-1] < 1e-3
  # Linear convergence of the finite difference: ~10x smaller per decade.
  assert errs[1] < 0.2 * errs[0] and errs[2] < 0.2 * errs[1], errs


def test_qr_and_polar_agree_to_first_order():
  with jax.enable_x64(True):
    w = random_stiefel(_key(11), 5, 9, dtype=jnp.float64)
    xi = _tangent(w, _key(12))
    diffs = [float(jnp.linalg.norm(retract_qr(w + t * xi) - retract_polar(w + t * xi)))
             for t in (1e-1, 1e-2, 1e-3)]
  # O(t^2): ~100x smaller per decade, but they are different retractions.
  assert diffs[0] > 1e-4
  assert diffs[1] < 0.03 * diffs[0] and diffs[2] < 0.03 * diffs[1], diffs


def test_polar_is_nearest_orthonormal_matrix():
  y = jax.random.normal(_key(13), (3, 7))
  p = retract_polar(y)
  best = float(jnp.linalg.norm(y - p))
  for i in range(20):
    other = random_stiefel(_key(200 + i), 3, 7)
    assert best <= float(jnp.linalg.norm(y - other)) + 1e-5
  # And polar(Y) = (Y Y^T)^{-1/2} Y.
  yn = np.asarray(y, np.float64)
  evals, evecs = np.linalg.eigh(yn @ yn.T)
  ref = evecs @ np.diag(evals ** -0.5) @ evecs.T @ yn
  np.testing.assert_allclose(np.asarray(p), ref, atol=1e-5)


def test_retraction_shape_errors():
  with pytest.raises(ValueError, match="2-D"):
    retract_qr(jnp.ones((2, 3, 4)))
  with pytest.raises(ValueError, match=r"k=5.*d=3"):
    retract_polar(jnp.ones((5, 3)))


# ---------------------------------------------------------------------------
# stiefel_transform
# ---------------------------------------------------------------------------


def _is_w(path, leaf) -> bool:
  return jax.tree_util.keystr(path).endswith("['W']")


def _run(tx, loss, params, steps):
  state = tx.init(params)

  def step(carry, _):
    p, s = carry
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = tx.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), value

  run = jax.jit(lambda carry: jax.lax.scan(step, carry, None, length=steps))
  (params, _), losses = run((params, state))
  return params, np.asarray(losses), float(loss(params))


@pytest.mark.slow
@pytest.mark.parametrize("inner,retraction", [
    (optax.sgd(0.05, momentum=0.9), "qr"),
    (optax.adam(1e-2), "polar"),
    (optax.sgd(0.05, momentum=0.9, nesterov=True), "cayley"),
], ids=["sgd-momentum-qr", "adam-polar", "nesterov-cayley"])
def test_brockett_cost_reaches_known_optimum(inner, retraction):
  """min tr(W A W^T N) over W W^T = I, N = diag(mu_1 > ... > mu_k > 0).

  The optimum is sum_i mu_i lambda_i (lambda ascending), attained when the
  rows of W are (up to sign) the eigenvectors of the k smallest eigenvalues,
  in order (Brockett 1991).
  """
  k, d = 5, 24
  q = np.asarray(random_stiefel(_key(20), d, d), np.float64)
  lam = np.linspace(0.5, 2.5, d)
  a = (q.T * lam) @ q
  a = jnp.asarray(0.5 * (a + a.T), jnp.float32)
  mu = jnp.arange(k, 0, -1, dtype=jnp.float32)
  optimum = float(np.sum(np.arange(k, 0, -1) * lam[:k]))

  def loss(p):
    w = p["W"]
    return jnp.trace((w @ a @ w.T) * mu[:, None]) + jnp.sum((p["b"] - 1.0) ** 2)

  params = {"W": random_stiefel(_key(21), k, d), "b": jnp.zeros(3)}
  tx = stiefel_transform(inner, _is_w, retraction=retraction)
  params, losses, final = _run(tx, loss, params, 2000)

  assert float(orthogonality_error(params["W"])) < 1e-5
  assert losses[0] > optimum + 3.0  # a real descent, not a lucky start
  assert abs(final - optimum) < 1e-3 * optimum, (final, optimum)
  # Rows are the eigenvectors of the k smallest eigenvalues, in order.
  overlap = np.abs(np.asarray(params["W"], np.float64) @ q.T[:, :k])
  np.testing.assert_allclose(overlap, np.eye(k), atol=2e-2)
  # The Euclidean leaf was optimised too.
  np.testing.assert_allclose(params["b"], np.ones(3), atol=1e-3)


def test_procrustes_with_adam_reaches_nuclear_norm():
  """max <C, W> over W W^T = I equals ||C||_* at W = polar(C)."""
  k, d = 6, 15
  c = jax.random.normal(_key(30), (k, d))
  nuclear = float(np.sum(np.linalg.svd(np.asarray(c, np.float64), compute_uv=False)))
  target = np.asarray(retract_polar(c))

  def loss(p):
    return -jnp.vdot(c, p["head"]["W"]) + 0.5 * jnp.sum(p["head"]["bias"] ** 2)

  params = {"head": {"W": random_stiefel(_key(31), k, d), "bias": jnp.ones(k)}}
  tx = stiefel_transform(optax.adam(3e-3), _is_w, retraction="qr")
  params, losses, final = _run(tx, loss, params, 2000)
  assert float(orthogonality_error(params["head"]["W"])) < 1e-5
  assert losses[0] > -0.5 * nuclear
  assert abs(final + nuclear) < 1e-4 * nuclear, (final, -nuclear)
  np.testing.assert_allclose(params["head"]["W"], target, atol=1e-2)


def test_plain_optimizer_without_wrapper_leaves_the_manifold():
  """Sanity check that the orthogonality assertions above are not vacuous."""
  k, d = 5, 24
  c = jax.random.normal(_key(40), (k, d))
  loss = lambda p: -jnp.vdot(c, p["W"])
  params = {"W": random_stiefel(_key(41), k, d)}
  params, _, _ = _run(optax.sgd(0.05, momentum=0.9), loss, params, 50)
  assert float(orthogonality_error(params["W"])) > 1e-2


@pytest.mark.slow
def test_update_formula_and_passthrough_leaves():
  """Manifold leaf: R_w(P_w(inner(P_w g))) - w; others: exactly inner's update."""
  inner = optax.adam(0.1)
  w = random_stiefel(_key(50), 3, 8)
  params = {"W": w, "enc": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)},
            "s": jnp.float32(2.0)}
  grads = {
      "W": jax.random.normal(_key(51), w.shape),
      "enc": {"kernel": jax.random.normal(_key(52), (3, 4))},
      "s": jnp.float32(-0.5),
  }
  tx = stiefel_transform(inner, _is_w, retraction="qr")
  state = tx.init(params)
  ref_state = inner.init(params)
  for _ in range(3):  # several steps so the inner state matters
    jit_updates, _ = jax.jit(tx.update)(grads, state, params)
    updates, state = tx.update(grads, state, params)  # eager: same ops as below
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    jax.tree_util.tree_map(close, jit_updates, updates)
    pgrads = dict(grads, W=project_tangent(params["W"], grads["W"]))
    ref_updates, ref_state = inner.update(pgrads, ref_state, params)
    np.testing.assert_array_equal(updates["enc"]["kernel"], ref_updates["enc"]["kernel"])
    np.testing.assert_array_equal(updates["s"], ref_updates["s"])
    expected_w = retract_qr(params["W"] + project_tangent(params["W"], ref_updates["W"]))
    new_params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new_params["W"], expected_w, atol=2e-6)
    assert float(orthogonality_error(new_params["W"])) < 1e-6
    params = new_params


def test_passthrough_leaves_follow_inner_trajectory():
  """On a separable loss the Euclidean leaves move exactly as without the wrapper."""
  k, d = 4, 10
  c = jax.random.normal(_key(60), (k, d))
  target = jnp.arange(6.0)

  def loss(p):
    return -jnp.vdot(c, p["W"]) + jnp.sum((p["b"] - target) ** 2) ** 1.5

  inner = optax.sgd(1e-2, momentum=0.9)
  params = {"W": random_stiefel(_key(61), k, d), "b": jnp.zeros(6)}
  wrapped, _, _ = _run(stiefel_transform(inner, _is_w), loss, params, 200)
  plain, _, _ = _run(inner, lambda p: loss(dict(params, b=p["b"])), {"b": params["b"]}, 200)
  np.testing.assert_allclose(wrapped["b"], plain["b"], rtol=1e-6, atol=1e-6)
  assert not np.allclose(wrapped["b"], params["b"])


def test_update_requires_params():
  params = {"W": random_stiefel(_key(0), 2, 4)}
  tx = stiefel_transform(optax.sgd(0.1), _is_w)
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, None)


def test_selected_leaf_shape_errors_name_the_leaf():
  tx = stiefel_transform(optax.sgd(0.1), _is_w)
  bad_ndim = {"head": {"W": jnp.zeros((2, 3, 4))}}
  with pytest.raises(ValueError, match=r"\['head'\]\['W'\].*2-D"):
    tx.init(bad_ndim)
  with pytest.raises(ValueError, match=r"\['head'\]\['W'\].*2-D"):
    tx.update(bad_ndim, None, bad_ndim)
  tall = {"head": {"W": jnp.zeros((5, 3))}}
  with pytest.raises(ValueError, match=r"\['head'\]\['W'\].*k=5.*d=3"):
    tx.init(tall)
  # Unselected leaves of any shape are fine.
  stiefel_transform(optax.sgd(0.1), _is_w).init({"other": jnp.zeros((2, 3, 4))})


def test_unknown_retraction_rejected():
  with pytest.raises(ValueError, match="retraction"):
    stiefel_transform(optax.sgd(0.1), _is_w, retraction="newton-schulz")
