"""CRMT step 2's objectives on a constructed case: the paper's mean radius (L2)
switches a class off, the radius hinge keeps every class; the choice's config."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import embedded
from mmsafe import certify
from mmsafe import methods
from mmsafe.methods import crmt
from mmsafe.models import HeadParams, ModelOutput
from mmsafe.models.heads import OrthogonalHead
from mmsafe.train import TrainState, make_train_step

K = 4
WEAK = K - 1  # The class that competes with every other one and scores weakly on its own.
MODALITIES = ("audio", "visual")
STEPS = 300


class _Linear(nn.Module):
  """Identity encoders (`L^(m) = 1`) and an orthogonal head: `u^(m) = W~^(m) x^(m)`."""

  @nn.compact
  def __call__(self, inputs, train: bool = False) -> ModelOutput:
    del train
    scores, logits, head = OrthogonalHead(K, name="head")(inputs)
    return ModelOutput(features=dict(inputs), scores=scores, logits=logits, head=head)


def _case(per_class: int = 12, seed: int = 0):
  """Inputs (= uni-modal scores, `W~ = I`) and labels: in each modality an example
  of class `y != WEAK` scores 2 on `y` and 1 on `WEAK`, one of class `WEAK`
  scores 1.5 on it; plus Gaussian noise of std 0.3."""
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(K), per_class)
  mean = np.where(np.arange(K) == labels[:, None], 2.0, 0.0)
  mean[labels != WEAK, WEAK] = 1.0
  mean[labels == WEAK, WEAK] = 1.5
  inputs = {m: jnp.asarray(mean + 0.3 * rng.normal(size=mean.shape), jnp.float32)
            for m in MODALITIES}
  return {"inputs": inputs, "label": jnp.asarray(labels)}


def _variables() -> dict:
  """`_Linear`'s variables: `W~ = I`, `a^(m)_k = 0.5`, `b~ = 0`."""
  return {"params": {"head": {"w_tilde": {m: jnp.eye(K) for m in MODALITIES},
                              "a": {m: jnp.full((K,), 0.5) for m in MODALITIES},
                              "bias": jnp.zeros((K,))}}}


def _constants() -> dict:
  """Step 2's method state: `tau~ = L = 1`, exact for `u_k = e_k . x`."""
  return {crmt.STATE_KEY: {"tau": {m: jnp.ones((1, K)) for m in MODALITIES},
                           "feature_lipschitz": {m: jnp.float32(1.0) for m in MODALITIES}}}


@functools.cache
def _train(objective: str, lipschitz: str) -> dict:
  """`STEPS` Adam steps of step 2 on the case from `a = 0.5`, `b~ = 0`: `_measure`
  "before" and "after", and the last step's "metrics"."""
  model, batch = _Linear(), _case()
  config = crmt.Step2Settings(step2_objective=objective, step2_lipschitz=lipschitz,
                              cert_eps=1.0, cert_temperature=4.0)
  optimizer = optax.adam(0.01)
  state = TrainState.create(_variables(), optimizer, jax.random.PRNGKey(0), _constants())
  step = jax.jit(make_train_step(crmt.step2_objective(model, config), optimizer))
  before = _measure(model, state, batch, lipschitz == "sound")
  for _ in range(STEPS):
    state, metrics = step(state, batch)
  return {"before": before, "after": _measure(model, state, batch, lipschitz == "sound"),
          "metrics": jax.device_get(metrics)}


def _measure(model, state, batch, sound: bool) -> dict:
  """Per-class accuracy, `a`, and the mean certified radius (clipped at 0)."""
  out = model.apply(state.variables, batch["inputs"])
  labels = np.asarray(batch["label"])
  predicted = np.argmax(np.asarray(out.logits), -1)
  constants = state.state[crmt.STATE_KEY]
  certificate = certify.certified_radius(
      out, batch["label"], constants["tau"],
      feature_lipschitz=constants["feature_lipschitz"] if sound else None)
  return {"accuracy": np.array([np.mean(predicted[labels == k] == k) for k in range(K)]),
          "a": np.stack([np.asarray(state.params["head"]["a"][m]) for m in MODALITIES]),
          "certified": float(jnp.mean(certificate.radius)),
          "bound": float(jnp.mean(crmt.closest_class_bound(
              out, batch["label"], constants["tau"],
              constants["feature_lipschitz"] if sound else None)))}


@pytest.mark.slow
@pytest.mark.parametrize("lipschitz", ["empirical", "sound"])
def test_mean_radius_switches_the_weak_class_off(lipschitz):
  # The paper's L2 rises while it zeroes class 3's weights and loses its examples.
  run = _train("mean_radius", lipschitz)
  before, after = run["before"], run["after"]
  np.testing.assert_array_equal(before["accuracy"], 1.0)
  assert after["accuracy"][WEAK] <= 0.25, after["accuracy"]
  np.testing.assert_array_equal(after["accuracy"][:WEAK], 1.0)
  assert np.abs(after["a"][:, WEAK]).max() < 0.1, after["a"]
  assert np.abs(after["a"][:, :WEAK]).min() > 0.4, after["a"]
  assert after["bound"] > before["bound"] + 0.2, (before["bound"], after["bound"])
  assert "radius_ce" not in run["metrics"]


@pytest.mark.slow
@pytest.mark.parametrize("lipschitz", ["empirical", "sound"])
def test_radius_hinge_keeps_every_class_and_raises_the_certificate(lipschitz):
  # Misclassifying class 3 would cost its examples more than the others can gain.
  run = _train("radius_hinge", lipschitz)
  before, after = run["before"], run["after"]
  np.testing.assert_array_equal(after["accuracy"], 1.0)
  assert np.abs(after["a"]).min() > 0.15, after["a"]
  assert after["certified"] > before["certified"] + 0.2, (before["certified"],
                                                          after["certified"])
  # ... and certifies more than the paper's L2, which lost class 3.
  assert after["certified"] >= _train("mean_radius", lipschitz)["after"]["certified"]
  assert run["metrics"]["radius_ce"] == pytest.approx(run["metrics"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_radius_hinge_is_the_cross_entropy_of_the_radius_logits_by_hand():
  rng = np.random.default_rng(1)
  batch = _case(per_class=5, seed=1)
  labels = np.asarray(batch["label"])
  weights = {m: rng.uniform(-0.3, 1.2, size=K) for m in MODALITIES}
  bias = 0.2 * rng.normal(size=K)
  scores = {m: np.asarray(batch["inputs"][m], np.float64) for m in MODALITIES}
  logits = sum(weights[m] * scores[m] for m in MODALITIES) + bias
  head = HeadParams(kind="orthogonal", bias=jnp.asarray(bias, jnp.float32),
                    kernels={m: jnp.eye(K) for m in MODALITIES},
                    weights={m: jnp.asarray(w, jnp.float32) for m, w in weights.items()})
  out = ModelOutput(features=dict(batch["inputs"]), scores=dict(batch["inputs"]),
                    logits=jnp.asarray(logits, jnp.float32), head=head)
  tau = _constants()[crmt.STATE_KEY]["tau"]
  loss, metrics = crmt.step2_loss(out, batch["label"], tau, objective="radius_hinge", eps=0.7,
                                  temperature=3.0)
  expected, closest = [], []
  for i, y in enumerate(labels):
    wrong = [k for k in range(K) if k != y]
    radii = {k: (logits[i, y] - logits[i, k]) / np.sqrt(sum(
        (abs(weights[m][y]) + abs(weights[m][k])) ** 2 for m in MODALITIES)) for k in wrong}
    expected.append(np.log1p(sum(np.exp(3.0 * (0.7 - r)) for r in radii.values())))
    closest.append(radii[max(wrong, key=lambda k: logits[i, k])])
  np.testing.assert_allclose(loss, np.mean(expected), rtol=1e-5)
  np.testing.assert_allclose(metrics["radius_ce"], loss)
  np.testing.assert_allclose(metrics["bound"], np.mean(closest), rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], np.mean(np.argmax(logits, -1) == labels))
  mean_loss, _ = crmt.step2_loss(out, batch["label"], tau)
  np.testing.assert_allclose(mean_loss, -np.mean(closest), rtol=1e-5)


def test_objective_choice_defaults_and_errors():
  model, batch = _Linear(), _case(per_class=2)
  state = {"model": {}, **_constants()}
  # step2_objective None, cert_eps and t set.
  settings = methods.get("crmt").make_settings(embedded.get_config().method_kwargs.to_dict())
  metrics = lambda objective: objective(_variables()["params"], state, batch, None)[1][1]
  assert "radius_ce" not in metrics(crmt.step2_objective(model, settings))
  assert "radius_ce" not in metrics(crmt.step2_objective(model))
  assert "radius_ce" in metrics(crmt.step2_objective(model, settings,
                                                     default_objective="radius_hinge"))
  chosen = dataclasses.replace(settings, step2_objective="mean_radius")
  assert "radius_ce" not in metrics(crmt.step2_objective(model, chosen,
                                                         default_objective="radius_hinge"))
  with pytest.raises(ValueError, match=r"method_kwargs\.step2_objective: expected one of "
                                       r"\['mean_radius', 'radius_hinge'\] or None, got 'hinge'"):
    crmt.Step2Settings(step2_objective="hinge")
  with pytest.raises(ValueError, match=r"method_kwargs\.cert_eps: expected a finite number > 0, "
                                       r"got None"):
    crmt.Step2Settings(step2_objective="radius_hinge", cert_eps=None)
  with pytest.raises(ValueError, match=r"method_kwargs\.cert_temperature: .* got 0"):
    crmt.Step2Settings(step2_objective="radius_hinge", cert_eps=1.0, cert_temperature=0)
