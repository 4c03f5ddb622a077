"""Attacks: l2-PGD against closed forms on linear models and an independent numpy
PGD, projection / untouched modalities, FGM = one PGD step, restarts, the l0
budget of the decoupling attack, missing-modality fills and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks
from mmsafe.attacks import common

B = 64
# Jitted attacks shared by the tests: a call with the same model, static options
# and shapes reuses one compilation (compiling dominates these tests' time).
_COMMON = ("modalities", "loss", "return_info")
PGD = jax.jit(attacks.pgd, static_argnums=0, static_argnames=_COMMON + (
    "steps", "restarts", "random_start", "keep_best"))
FGM = jax.jit(attacks.fgm, static_argnums=0, static_argnames=("modalities", "loss"))
DECOUPLING = jax.jit(attacks.decoupling, static_argnums=0, static_argnames=_COMMON + (
    "fraction", "max_count", "rounds", "steps_per_round", "random_start"))


# ----------------------------------------------------------------------------
# Models: a linear one (closed forms) and a small nonlinear one, 3 modalities.

SHAPES = {"a": (3, 2), "b": (5,), "c": (2, 2, 2)}


def _inputs(seed=0, batch=B, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(rng.normal(size=(batch, *s)), jnp.float32) for m, s in shapes.items()}


def _linear(num_classes, seed=0, shapes=SHAPES):
  rng = np.random.default_rng(100 + seed)
  weights = {m: rng.normal(size=(int(np.prod(s)), num_classes)).astype(np.float32)
             for m, s in shapes.items()}
  bias = rng.normal(size=num_classes).astype(np.float32)

  def logits_fn(inputs):
    return sum(inputs[m].reshape(inputs[m].shape[0], -1) @ weights[m] for m in weights) + bias

  return logits_fn, weights


def _nonlinear(num_classes=4, seed=1, shapes=SHAPES):
  rng = np.random.default_rng(200 + seed)
  hidden = {m: rng.normal(size=(int(np.prod(s)), 8)).astype(np.float32) for m, s in shapes.items()}
  out = {m: rng.normal(size=(8, num_classes)).astype(np.float32) for m in shapes}

  def logits_fn(inputs):
    return sum(jnp.tanh(inputs[m].reshape(inputs[m].shape[0], -1) @ hidden[m]) @ out[m]
               for m in shapes)

  return logits_fn


def _predict(logits_fn, inputs):
  return np.asarray(jnp.argmax(logits_fn(inputs), -1))


def _linear_distance(weights, logits, labels, scope):
  """l2 distance to the decision boundary of a linear classifier when only the
  modalities `scope` move: min_j (z_y - z_j) / ||w_y - w_j||_scope."""
  n, k = logits.shape
  dist = np.full(n, np.inf)
  for j in range(k):
    diff = np.sqrt(sum(((weights[m][:, labels] - weights[m][:, [j]]) ** 2).sum(0)
                       for m in scope))
    margin = logits[np.arange(n), labels] - logits[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
      dist = np.where(labels == j, dist, np.minimum(dist, margin / diff))
  return dist


LINEAR2, W2 = _linear(2)
LINEAR5, W5 = _linear(5)
NONLINEAR = _nonlinear()


# ----------------------------------------------------------------------------
# PGD against closed forms.


@pytest.mark.parametrize("scope,loss", [(None, "ce"), ("a", "margin")])
def test_pgd_binary_linear_reaches_the_analytic_optimum(scope, loss):
  """For K = 2 the optimal l2 perturbation is -eps (w_y - w_o)/||w_y - w_o||
  over the attacked modalities: the margin drops by exactly eps ||w_y - w_o||.
  (CE's float32 gradient direction is slightly off on very confident examples,
  hence the 1e-3 relative slack on the movement.)"""
  x = _inputs()
  labels = jnp.asarray(_predict(LINEAR2, x))
  eps = jnp.linspace(0.1, 3.0, B)  # one radius per example
  adv, info = PGD(LINEAR2, x, labels, jax.random.PRNGKey(0), eps=eps, steps=10,
                  modalities=scope, random_start=False, loss=loss, return_info=True)
  attacked = common.resolve_modalities(x, scope)
  z0, z1 = np.asarray(LINEAR2(x)), np.asarray(LINEAR2(adv))
  y = np.asarray(labels)
  rows = np.arange(B)
  margin0 = z0[rows, y] - z0[rows, 1 - y]
  margin1 = z1[rows, y] - z1[rows, 1 - y]
  w_norm = np.sqrt(sum(((W2[m][:, 0] - W2[m][:, 1]) ** 2).sum() for m in attacked))
  movement = np.asarray(eps) * w_norm
  np.testing.assert_array_less(np.abs(margin1 - (margin0 - movement)), 1e-3 * movement + 1e-4)
  # Flipped exactly when eps exceeds the distance to the boundary.
  distance = margin0 / w_norm
  np.testing.assert_array_equal(np.asarray(info["misclassified"]), np.asarray(eps) > distance)
  np.testing.assert_allclose(np.asarray(info["norm"]), np.asarray(eps), rtol=1e-4)
  for m in x:
    if m not in attacked:
      np.testing.assert_array_equal(np.asarray(adv[m]), np.asarray(x[m]))


def test_targeted_pgd_matches_the_multiclass_closed_form():
  """K = 5 linear model: an example is misclassifiable within eps iff eps > the
  distance to the nearest boundary, min_j (z_y - z_j) / ||w_y - w_j||.
  Multi-targeted PGD over all K - 1 classes flips every example at 1.05x that
  distance and none at 0.95x."""
  x = _inputs()
  z = np.asarray(LINEAR5(x))
  labels = z.argmax(1)
  distance = _linear_distance(W5, z, labels, sorted(x))
  for factor, flipped in ((1.05, True), (0.95, False)):
    _, info = PGD(LINEAR5, x, jnp.asarray(labels), jax.random.PRNGKey(0),
                  eps=jnp.asarray(distance * factor), steps=30, restarts=4, random_start=False,
                  loss="targeted", return_info=True)
    assert np.all(np.asarray(info["misclassified"]) == flipped), factor


def _numpy_pgd(weights, bias, x, labels, eps, steps, step_size):
  """Independent l2-PGD (CE, no random start, last iterate) on a linear softmax
  model with the analytic input gradient, in float64 numpy."""
  names = sorted(x)
  flat = np.concatenate([np.asarray(x[m], np.float64).reshape(len(labels), -1) for m in names], 1)
  w = np.concatenate([weights[m] for m in names], 0).astype(np.float64)
  delta = np.zeros_like(flat)
  onehot = np.eye(w.shape[1])[labels]
  for _ in range(steps):
    z = (flat + delta) @ w + bias
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    grad = (p - onehot) @ w.T
    grad /= np.linalg.norm(grad, axis=1, keepdims=True)
    delta = delta + step_size * grad
    norm = np.linalg.norm(delta, axis=1, keepdims=True)
    delta = delta * np.minimum(1.0, eps / norm)
  return flat + delta


def test_pgd_agrees_with_an_independent_numpy_implementation():
  bias = np.asarray(LINEAR5({m: jnp.zeros((1, *s)) for m, s in SHAPES.items()}))[0]
  x = _inputs(1)
  labels = _predict(LINEAR5, x)
  adv = PGD(LINEAR5, x, jnp.asarray(labels), jax.random.PRNGKey(0), eps=1.5, steps=7,
            step_size=0.4, random_start=False, keep_best=False)
  expected = _numpy_pgd(W5, bias, x, labels, 1.5, 7, 0.4)
  got = np.concatenate([np.asarray(adv[m]).reshape(B, -1) for m in sorted(adv)], 1)
  np.testing.assert_allclose(got, expected, atol=2e-4)


# ----------------------------------------------------------------------------
# Geometry, FGM, restarts.


@pytest.mark.slow
@pytest.mark.parametrize("scope", [None, ("a", "c")])
def test_projection_keeps_the_joint_budget_and_untouched_modalities(scope):
  x = _inputs(3)
  labels = jnp.asarray(_predict(NONLINEAR, x))
  eps = jnp.asarray(np.random.default_rng(0).uniform(0.0, 2.0, B), jnp.float32)
  adv, _ = PGD(NONLINEAR, x, labels, jax.random.PRNGKey(1), eps=eps, steps=6, modalities=scope,
               restarts=2, return_info=True)
  attacked = common.resolve_modalities(x, scope)
  norm = np.sqrt(sum(((np.asarray(adv[m]) - np.asarray(x[m])) ** 2).reshape(B, -1).sum(1)
                     for m in attacked))
  assert np.all(norm <= np.asarray(eps) * (1 + 1e-5) + 1e-6)
  assert np.mean(norm > 0.9 * np.asarray(eps)) > 0.8  # the attack does use its budget
  for m in x:
    assert adv[m].shape == x[m].shape and adv[m].dtype == x[m].dtype
    if m not in attacked:
      np.testing.assert_array_equal(np.asarray(adv[m]), np.asarray(x[m]))


@pytest.mark.slow
def test_box_constraints_hold_with_the_l2_budget():
  x = {m: jnp.clip(v, -0.5, 0.5) for m, v in _inputs(4).items()}
  labels = jnp.asarray(_predict(NONLINEAR, x))
  low, high = common.normalized_bounds(0.0, 6.0, 3.0, 6.0)  # raw [0, 6] -> [-0.5, 0.5]
  bounds = {"a": (low, high), "c": (jnp.full((2, 2, 2), -0.6), 0.6)}
  adv = PGD(NONLINEAR, x, labels, jax.random.PRNGKey(0), eps=1.0, steps=6, restarts=2,
            bounds=bounds)
  assert float(jnp.min(adv["a"])) >= -0.5 and float(jnp.max(adv["a"])) <= 0.5
  assert float(jnp.min(adv["c"])) >= -0.6 - 1e-7 and float(jnp.max(adv["c"])) <= 0.6 + 1e-7
  assert float(jnp.max(attacks.joint_norm({m: adv[m] - x[m] for m in x}))) <= 1.0 + 1e-5
  assert float(jnp.max(jnp.abs(adv["a"]))) == 0.5  # the box is active
  fgm_adv = FGM(NONLINEAR, x, labels, eps=5.0, bounds=bounds)
  assert float(jnp.max(jnp.abs(fgm_adv["a"]))) <= 0.5


def test_fgm_equals_one_pgd_step_of_size_eps():
  x = _inputs(5)
  labels = jnp.asarray(_predict(NONLINEAR, x))
  scope = ("a", "c")
  eps = 0.7
  by_fgm = FGM(NONLINEAR, x, labels, eps=eps, modalities=scope)
  by_pgd = PGD(NONLINEAR, x, labels, jax.random.PRNGKey(0), eps=eps, steps=1, step_size=eps,
               modalities=scope, random_start=False, keep_best=False)
  for m in x:
    np.testing.assert_allclose(np.asarray(by_fgm[m]), np.asarray(by_pgd[m]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(by_fgm["b"]), np.asarray(x["b"]))
  moved = attacks.joint_norm({m: by_fgm[m] - x[m] for m in scope})
  np.testing.assert_allclose(np.asarray(moved), eps, rtol=1e-5)


@pytest.mark.slow
def test_restarts_are_never_weaker_than_one_run_and_pgd_beats_fgm():
  x = _inputs(6)
  labels = jnp.asarray(_predict(NONLINEAR, x))
  key = jax.random.PRNGKey(7)
  eps = jnp.full((B,), 0.8)
  # (the same static arguments as the projection test: one compilation for both)
  _, one = PGD(NONLINEAR, x, labels, key, eps=eps, steps=6, modalities=None, restarts=1,
               return_info=True)
  _, many = PGD(NONLINEAR, x, labels, key, eps=eps, steps=6, modalities=None, restarts=2,
                return_info=True)
  one_mis, many_mis = np.asarray(one["misclassified"]), np.asarray(many["misclassified"])
  assert np.all(many_mis >= one_mis)
  same = many_mis == one_mis
  assert np.all(np.asarray(many["loss"])[same] >= np.asarray(one["loss"])[same] - 1e-5)
  assert np.any(np.asarray(many["loss"]) > np.asarray(one["loss"]) + 1e-3)  # restarts help
  fgm_wrong = _predict(NONLINEAR, FGM(NONLINEAR, x, labels, eps=eps)) != np.asarray(labels)
  assert many_mis.sum() >= fgm_wrong.sum() > 0
  # Restart by restart (`restart_offset`): the same worst case.
  parts = [PGD(NONLINEAR, x, labels, key, eps=eps, steps=6, modalities=None, restarts=1,
               restart_offset=r, return_info=True)[1] for r in range(2)]
  np.testing.assert_array_equal(many_mis, parts[0]["misclassified"] | parts[1]["misclassified"])
  np.testing.assert_array_equal(one_mis, parts[0]["misclassified"])
  never = ~many_mis
  np.testing.assert_allclose(np.asarray(many["loss"])[never], np.maximum(
      parts[0]["loss"], parts[1]["loss"])[never], rtol=1e-5)
  # eps = 0 leaves every input unchanged.
  still, _ = PGD(NONLINEAR, x, labels, key, eps=jnp.zeros((B,)), steps=6, modalities=None,
                 restarts=2, return_info=True)
  for m in x:
    np.testing.assert_array_equal(np.asarray(still[m]), np.asarray(x[m]))


# ----------------------------------------------------------------------------
# Decoupling (l0) attack.


@pytest.mark.parametrize("scope,fraction", [(None, 0.1), ("b", 0.4)])
def test_decoupling_changes_at_most_the_allowed_entries(scope, fraction):
  x = _inputs(9)
  labels = jnp.asarray(_predict(NONLINEAR, x))
  attacked = common.resolve_modalities(x, scope)
  k, n = attacks.decoupling_budget(x, fraction, scope)
  assert n == sum(int(np.prod(SHAPES[m])) for m in attacked) and k == int(fraction * n)
  adv, info = DECOUPLING(NONLINEAR, x, labels, jax.random.PRNGKey(0), fraction=fraction,
                         modalities=scope, rounds=3, steps_per_round=4, max_change=1.5,
                         random_start=True, return_info=True)
  changed = sum((np.asarray(adv[m]) != np.asarray(x[m])).reshape(B, -1).sum(1) for m in attacked)
  assert changed.max() <= k and changed.max() > 0
  np.testing.assert_array_equal(changed, np.asarray(info["changed"]))
  for m in x:
    change = np.abs(np.asarray(adv[m]) - np.asarray(x[m]))
    assert change.max() <= 1.5 + 1e-6
    if m not in attacked:
      np.testing.assert_array_equal(np.asarray(adv[m]), np.asarray(x[m]))
  np.testing.assert_array_equal(np.asarray(info["misclassified"]),
                                _predict(NONLINEAR, adv) != np.asarray(labels))
  assert np.asarray(info["misclassified"]).mean() > 0.05  # it does attack


def test_decoupling_traced_budget_and_linear_success():
  """One compilation for several budgets (count traced, max_count static); on a
  linear model a larger l0 budget succeeds on more examples."""
  x = _inputs(10)
  labels = jnp.asarray(_predict(LINEAR5, x))
  rates, changed = [], []
  for count in (0, 2, 8, 20):  # 20 is clipped to max_count
    _, info = DECOUPLING(LINEAR5, x, labels, jax.random.PRNGKey(0), count=jnp.int32(count),
                         max_count=8, rounds=4, steps_per_round=5, max_change=1.0,
                         return_info=True)
    rates.append(float(np.mean(info["misclassified"])))
    changed.append(int(np.max(info["changed"])))
  assert changed[0] == 0 and changed[1] <= 2 and changed[2] <= 8 and changed[3] <= 8
  assert rates[0] == 0.0 and rates[1] <= rates[2] and rates[2] > 0.2


# ----------------------------------------------------------------------------
# Missing modality.


def test_drop_modality_fills():
  x = _inputs(11, batch=4000)
  zeros = attacks.drop_modality(x, "a")
  assert set(zeros) == set(x) and not np.any(np.asarray(zeros["a"]))
  np.testing.assert_array_equal(np.asarray(zeros["b"]), np.asarray(x["b"]))
  mean = np.arange(6, dtype=np.float32).reshape(3, 2)
  filled = attacks.drop_modality(x, "a", "mean", mean=mean)
  np.testing.assert_array_equal(np.asarray(filled["a"]), np.broadcast_to(mean, (4000, 3, 2)))
  noisy = np.asarray(attacks.drop_modality(x, "a", "noise", mean=mean, key=jax.random.PRNGKey(0),
                                           noise_std=0.5)["a"])
  np.testing.assert_allclose(noisy.mean(0), mean, atol=0.05)
  np.testing.assert_allclose(noisy.std(0), 0.5, atol=0.05)
  per_channel = attacks.drop_modality(x, "c", "mean", mean=np.array([1.0, -1.0]))
  np.testing.assert_array_equal(np.asarray(per_channel["c"])[..., 1], -1.0)


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_input_gives_clear_errors():
  logits_fn = _nonlinear()
  x = _inputs(12, batch=4)
  y = jnp.zeros(4, jnp.int32)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"eps: expected finite values >= 0, got -0.1"):
    attacks.pgd(logits_fn, x, y, key, eps=-0.1, steps=3)
  with pytest.raises(ValueError, match=r"eps: expected finite values >= 0"):
    attacks.fgm(logits_fn, x, y, eps=np.array([0.1, -1.0, 0.2, 0.3]))
  with pytest.raises(ValueError, match=r"eps: expected a scalar or shape \[4\]"):
    attacks.pgd(logits_fn, x, y, key, eps=np.ones(3), steps=3)
  with pytest.raises(ValueError, match=r"steps: expected an integer >= 1, got 0"):
    attacks.pgd(logits_fn, x, y, key, eps=0.5, steps=0)
  with pytest.raises(ValueError, match=r"restarts: expected an integer >= 1, got 0"):
    attacks.pgd(logits_fn, x, y, key, eps=0.5, steps=2, restarts=0)
  with pytest.raises(ValueError, match=r"modalities: unknown modality 'audio'; expected one of"):
    attacks.pgd(logits_fn, x, y, key, eps=0.5, steps=2, modalities="audio")
  with pytest.raises(ValueError, match=r"modalities: unknown modality 'video'"):
    attacks.fgm(logits_fn, x, y, eps=0.5, modalities=("a", "video"))
  with pytest.raises(ValueError, match=r"loss: expected one of"):
    attacks.pgd(logits_fn, x, y, key, eps=0.5, steps=2, loss="hinge")
  with pytest.raises(ValueError, match=r"labels: expected shape \[4\]"):
    attacks.pgd(logits_fn, x, jnp.zeros(3, jnp.int32), key, eps=0.5, steps=2)
  with pytest.raises(ValueError, match=r"bounds\['a'\].low: expected a shape broadcastable"):
    attacks.pgd(logits_fn, x, y, key, eps=0.5, steps=2, bounds={"a": (np.zeros(5), 1.0)})
  with pytest.raises(ValueError, match=r"bounds\['b'\]: expected low <= high"):
    attacks.fgm(logits_fn, x, y, eps=0.5, bounds={"b": (1.0, 0.0)})
  with pytest.raises(ValueError, match=r"fraction: expected a value in \[0, 1\], got 1.5"):
    attacks.decoupling(logits_fn, x, y, key, fraction=1.5)
  with pytest.raises(ValueError, match=r"fraction/count: expected exactly one"):
    attacks.decoupling(logits_fn, x, y, key, fraction=0.1, count=3)
  with pytest.raises(ValueError, match=r"max_change: expected values > 0"):
    attacks.decoupling(logits_fn, x, y, key, fraction=0.1, max_change=0.0)
  with pytest.raises(ValueError, match=r"modalities: unknown modality 'z'"):
    attacks.drop_modality(x, "z")
  with pytest.raises(ValueError, match=r"fill: expected one of \['zeros', 'mean', 'noise'\]"):
    attacks.drop_modality(x, "a", "median")
  with pytest.raises(ValueError, match=r"mean: expected an array broadcastable"):
    attacks.drop_modality(x, "a", "mean")
  with pytest.raises(ValueError, match=r"key: expected a PRNG key for fill='noise'"):
    attacks.drop_modality(x, "a", "noise")
  with pytest.raises(ValueError, match=r"protocol: expected one of"):
    attacks.get_protocol("strongest")
