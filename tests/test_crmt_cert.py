"""CRMT trained on its sound certificate: the radius hinge against the tight
Thm 3.5 certificate, its scale invariance, step 2 on sound constants, and the
exact modality-weight paths that step 2 trains."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmsafe import certify, methods, models
from mmsafe.certify import threats
from mmsafe.methods import crmt, crmt_cert
from mmsafe.models import HeadParams, ModelOutput, is_modality_weight
from mmsafe.train import TrainState, make_optimizer, make_train_step, per_stage

K = 5


def _output(seed=0, batch=64, scale=1.0):
  """An orthogonal-head output with orthonormal W~ columns, weights of both signs."""
  rng = np.random.default_rng(seed)
  kernels = {m: jnp.asarray(np.linalg.qr(rng.normal(size=(8, K)))[0], jnp.float32) for m in "ab"}
  weights = {m: jnp.asarray(scale * rng.uniform(-0.3, 1.2, size=K), jnp.float32) for m in "ab"}
  bias = jnp.asarray(scale * 0.2 * rng.normal(size=K), jnp.float32)
  scores = {m: jnp.asarray(rng.normal(size=(batch, K)), jnp.float32) for m in "ab"}
  logits = sum(weights[m] * scores[m] for m in "ab") + bias
  head = HeadParams(kind="orthogonal", bias=bias, kernels=kernels, weights=weights)
  out = ModelOutput(features={m: jnp.zeros((batch, 8)) for m in "ab"}, scores=scores,
                    logits=logits, head=head)
  labels = jnp.asarray(np.argmax(np.asarray(logits), -1))
  return out, labels.at[:4].set((labels[:4] + 1) % K)  # a few misclassified


def test_radius_logits_certify_exactly_the_tight_radius_above_eps():
  out, labels = _output()
  lipschitz = {"a": 1.3, "b": 0.7}
  tau = {m: jnp.linalg.norm(out.head.kernels[m], axis=0)[None] * lipschitz[m] for m in "ab"}
  cert = certify.certified_radius(out, labels, tau, feature_lipschitz=lipschitz)
  radii = np.asarray(cert.radius)
  for eps in (0.05, 0.2, 0.5):
    logits = crmt_cert.radius_logits(out, labels, lipschitz, eps=eps, temperature=3.0)
    certified = np.asarray(jnp.argmax(logits, -1) == labels)
    np.testing.assert_array_equal(certified, radii > eps)
    assert 0 < certified.sum() < len(radii)  # both outcomes occur
  # The logits are t (eps - r_k) with r_k the per-class tight radius.
  logits = crmt_cert.radius_logits(out, labels, lipschitz, eps=0.3, temperature=2.0)
  is_label = np.asarray(jax.nn.one_hot(labels, K, dtype=bool))
  np.testing.assert_allclose(np.asarray(logits)[~is_label],
                             2.0 * (0.3 - np.asarray(cert.per_class)[~is_label]), rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.asarray(logits)[is_label] == 0)


@pytest.mark.slow
def test_radius_hinge_is_invariant_to_the_head_scale_and_differentiable():
  # Scaling a and b~ together leaves every radius unchanged, so the loss cannot
  # fall by shrinking the head (the plain Lipschitz-margin loss can).
  out, labels = _output(scale=1.0)
  small, _ = _output(scale=0.01)
  lipschitz = {"a": 1.0, "b": 1.0}
  loss = lambda o: crmt_cert.step1_loss(
      o, labels, lipschitz, crmt_cert.CertifiedLoss(eps=0.5, temperature=4.0, floor=1e-5))[0]
  np.testing.assert_allclose(loss(out), loss(small), rtol=1e-4)
  grads = jax.grad(lambda head: loss(out.replace(head=head)))(out.head)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads.weights["a"]).max()) > 0
  # The normalised L1 adds a finite, positive-gradient term when enabled.
  value, parts = crmt_cert.step1_loss(
      out, labels, lipschitz, crmt_cert.CertifiedLoss(eps=0.5, temperature=4.0, rho=0.5,
                                                      floor=1e-5))
  np.testing.assert_allclose(value, parts["radius_ce"] + 0.5 * parts["l1"], rtol=1e-6)


def test_normalized_scores_are_unimodal_margins_over_their_constants():
  out, labels = _output(seed=3, batch=8)
  lipschitz = {"a": 2.0, "b": 0.5}
  scores = crmt_cert.normalized_scores(out, labels, lipschitz)
  for m in "ab":
    kernel = np.asarray(out.head.kernels[m])
    u = np.asarray(out.scores[m])
    for i, y in enumerate(np.asarray(labels)):
      for k in range(K):
        constant = np.linalg.norm(kernel[:, y] - kernel[:, k]) * lipschitz[m]
        expected = 0.0 if k == y else (u[i, k] - u[i, y]) / constant
        np.testing.assert_allclose(scores[m][i, k], expected, rtol=1e-5, atol=1e-6)


def _lipschitz_model(modalities=("a", "b")):
  encoders = {"a": {"name": "lip_mlp", "widths": (12, 10)},
              "b": {"name": "lip_cnn", "channels": (4,), "features": 10}}
  shapes = {"a": (6,), "b": (6, 4, 1)}
  model = models.build({"head": "orthogonal", "encoders": {m: encoders[m] for m in modalities}},
                       num_classes=K, input_shapes={m: shapes[m] for m in modalities})
  x = {m: jax.random.normal(jax.random.PRNGKey(i), (32, *shapes[m]))
       for i, m in enumerate(modalities)}
  return model, x


@pytest.mark.slow
def test_step2_on_sound_constants_moves_only_a_and_raises_the_tight_bound():
  model, x = _lipschitz_model()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  labels = jnp.argmax(model.apply(variables, x).logits, -1)
  method = methods.get("crmt_cert")
  (prepare,) = method.callbacks
  prepared = prepare.on_stage_start("step2", methods.CallbackContext(
      model=model, variables=variables, state={}, split_names=("train",),
      config=method.make_settings({}),
      reduce_over_split=None))  # Sound constants read no data.
  sound = jax.jit(lambda v: certify.sound_constants(model, v))(variables)
  for m in "ab":
    np.testing.assert_allclose(prepared["crmt"]["tau"][m], sound.values[m], rtol=1e-6)
    np.testing.assert_allclose(prepared["crmt"]["feature_lipschitz"][m], sound.encoder[m],
                               rtol=1e-6)
    assert float(sound.encoder[m]) <= 1.0 + 1e-5
  step2 = method.stage("step2")
  optimizers = per_stage({"step1": optax.sgd(0.0), "step2": make_optimizer(
      {"learning_rate": 0.05, "momentum": 0.9, "trainable": step2.trainable}, 4)})
  state = TrainState.create(variables, optimizers["step1"], jax.random.PRNGKey(1),
                            crmt.init_state(model, variables))
  state = state.replace(state={**state.state, **prepared})
  # crmt_cert's step 2 minimises the radius hinge at cert_eps (not the paper's mean radius).
  objective = step2.make_objective(model, method.make_settings({"cert_eps": 2.0}))
  step = jax.jit(make_train_step(objective, optimizers["step2"]))
  batch = {"inputs": x, "label": labels}

  def tight_bound(variables):
    out = model.apply(variables, x)
    return float(jnp.mean(crmt.closest_class_bound(
        out, labels, prepared["crmt"]["tau"], prepared["crmt"]["feature_lipschitz"])))

  before = tight_bound(state.variables)
  start = state.variables["params"]
  for _ in range(10):
    state, metrics = step(state, batch)
  assert tight_bound(state.variables) > before and "radius_ce" in metrics
  np.testing.assert_allclose(float(metrics["bound"]), tight_bound(state.variables), rtol=0.1)
  moved = jax.tree_util.tree_map_with_path(
      lambda path, new, old: (is_modality_weight(path, new), bool(jnp.any(new != old))),
      state.variables["params"], start)
  for is_a, changed in jax.tree_util.tree_leaves(moved, is_leaf=lambda v: isinstance(v, tuple)):
    assert changed == is_a


def test_modality_weights_match_exact_paths_even_for_a_modality_named_a():
  model, x = _lipschitz_model()
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  matched = [jax.tree_util.keystr(path) for path, leaf in
             jax.tree_util.tree_flatten_with_path(params)[0] if is_modality_weight(path, leaf)]
  assert matched == ["['head']['a']['a']", "['head']['a']['b']"]


def _concat_output(seed=0, batch=64, scale=1.0):
  """A concat-head output with random kernels (jt_cert's head)."""
  rng = np.random.default_rng(seed)
  kernels = {m: jnp.asarray(scale * rng.normal(size=(8, K)), jnp.float32) for m in "ab"}
  bias = jnp.asarray(scale * 0.2 * rng.normal(size=K), jnp.float32)
  features = {m: jnp.asarray(rng.normal(size=(batch, 8)), jnp.float32) for m in "ab"}
  scores = {m: features[m] @ kernels[m] for m in "ab"}
  logits = sum(scores.values()) + bias
  head = HeadParams(kind="concat", bias=bias, kernels=kernels, weights={})
  out = ModelOutput(features=features, scores=scores, logits=logits, head=head)
  labels = jnp.asarray(np.argmax(np.asarray(logits), -1))
  return out, labels.at[:4].set((labels[:4] + 1) % K)


def test_concat_radius_logits_certify_the_sound_concat_radius_and_ignore_the_scale():
  out, labels = _concat_output()
  lipschitz = {"a": 0.8, "b": 1.1}
  tau = {m: jnp.full((1, K), 10.0) for m in "ab"}  # looser: the radius comes from L^(m)
  cert = certify.certified_radius(out, labels, tau, feature_lipschitz=lipschitz)
  logits = crmt_cert.radius_logits(out, labels, lipschitz, eps=0.4, temperature=2.0)
  is_label = np.asarray(jax.nn.one_hot(labels, K, dtype=bool))
  np.testing.assert_allclose(np.asarray(logits)[~is_label],
                             2.0 * (0.4 - np.asarray(cert.per_class)[~is_label]), rtol=1e-5,
                             atol=1e-5)
  certified = np.asarray(jnp.argmax(logits, -1) == labels)
  np.testing.assert_array_equal(certified, np.asarray(cert.radius) > 0.4)
  assert 0 < certified.sum() < len(labels)
  small, _ = _concat_output(scale=0.01)
  loss = lambda o: crmt_cert.step1_loss(o, labels, lipschitz, crmt_cert.CertifiedLoss(
      eps=0.4, temperature=2.0))[0]
  np.testing.assert_allclose(loss(out), loss(small), rtol=1e-4)


def _sound_certificate(output, seed, lipschitz):
  """An output of either head, its labels, and its certificate with one
  constant `L^(m)` per modality (`tau` looser, so the radii come from `L`)."""
  out, labels = output(seed=seed)
  tau = {m: jnp.full((1, K), 10.0) for m in "ab"}
  return out, labels, certify.certified_radius(out, labels, tau, feature_lipschitz=lipschitz)


def test_worst_modality_logits_certify_the_smallest_unimodal_radius():
  for output in (_output, _concat_output):
    lipschitz = {"a": 1.3, "b": 0.6}
    out, labels, cert = _sound_certificate(output, 2, lipschitz)
    worst = np.minimum(*(np.asarray(cert.per_modality[m]) for m in "ab"))
    assert np.all(worst >= np.asarray(cert.radius) - 1e-6)  # one modality is a joint move
    for eps in (0.3, 1.0):
      logits = crmt_cert.worst_modality_logits(out, labels, lipschitz, eps=eps, temperature=2.0)
      np.testing.assert_array_equal(np.asarray(jnp.argmax(logits, -1) == labels), worst > eps)
    value, parts = crmt_cert.step1_loss(out, labels, lipschitz, crmt_cert.CertifiedLoss(
        eps=0.3, temperature=2.0, uni_weight=0.5, uni_eps=1.0))
    np.testing.assert_allclose(value, parts["radius_ce"] + 0.5 * parts["worst_modality_ce"],
                               rtol=1e-6)


@pytest.mark.slow
def test_certified_controls_train_their_heads_and_refuse_bad_settings():
  model_of = {"jt_cert": "concat", "ojt_cert": "orthogonal", "crmt_cert": "orthogonal"}
  config = {"cert_eps": 0.5, "cert_temperature": 4.0, "cert_rho": 0.0, "l1_floor": 1e-5,
            "cert_uni_weight": 0.5, "cert_uni_eps": 1.0, "cert_missing_weight": 0.5}
  for name, head in model_of.items():
    method = methods.get(name)
    assert method.head == head
    model = models.build({"head": head, "encoders": {"a": {"name": "lip_mlp", "widths": (12,)}}},
                         num_classes=K, input_shapes={"a": (6,)})
    x = {"a": jax.random.normal(jax.random.PRNGKey(0), (16, 6))}
    variables = model.init(jax.random.PRNGKey(1), x)
    loss_fn = method(model, config)
    batch = {"inputs": x, "label": jnp.arange(16) % K}
    (value, (_, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        variables["params"], {}, batch, None)
    assert np.isfinite(float(value)) and {"worst_modality_ce", "missing_ce"} <= set(metrics)
    assert float(optax.tree.norm(grads)) > 0
  with pytest.raises(ValueError, match=r"method_kwargs.cert_uni_eps: expected a finite number "
                                       r"> 0 with cert_uni_weight 0.5, got None \(method "
                                       r"'jt_cert'"):
    methods.get("jt_cert")(model, {**config, "cert_uni_eps": None})
  with pytest.raises(ValueError, match=r"method_kwargs.cert_temperature: expected a finite "
                                       r"number > 0"):
    methods.get("jt_cert")(model, {**config, "cert_temperature": 0.0})
  concat = models.build({"head": "concat", "encoders": {"a": {"name": "lip_mlp",
                                                                "widths": (12,)}}},
                        num_classes=K, input_shapes={"a": (6,)})
  loss_fn = methods.get("jt_cert")(concat, {**config, "cert_rho": 0.5})
  with pytest.raises(ValueError, match=r"method_kwargs.cert_rho: the normalised L1 needs"):
    loss_fn(concat.init(jax.random.PRNGKey(1), x)["params"], {}, batch, None)


def test_missing_modality_logits_certify_exactly_the_missing_modality_certificate():
  for output in (_output, _concat_output):
    lipschitz = {"a": 0.9, "b": 0.4}
    out, labels, cert = _sound_certificate(output, 5, lipschitz)
    rng = np.random.default_rng(0)
    distances = {m: jnp.asarray(rng.uniform(0.05, 2.0, size=labels.shape[0]), jnp.float32)
                 for m in "ab"}
    inputs = {m: np.pad(np.asarray(d)[:, None], ((0, 0), (0, 2))) for m, d in distances.items()}
    np.testing.assert_allclose(crmt_cert.fill_distances(inputs)["a"], distances["a"], rtol=1e-6)
    expected = threats.missing_certified(cert, inputs)
    logits = crmt_cert.missing_modality_logits(out, labels, lipschitz, distances, eps=0.5,
                                               temperature=2.0)
    for m in "ab":
      certified = np.asarray(jnp.argmax(logits[m], -1) == labels)
      np.testing.assert_array_equal(certified, expected[m])
      assert 0 < certified.sum() < len(certified)
    value, parts = crmt_cert.step1_loss(out, labels, lipschitz, crmt_cert.CertifiedLoss(
        eps=0.5, temperature=2.0, missing_weight=2.0), distances)
    np.testing.assert_allclose(value, parts["radius_ce"] + 2.0 * parts["missing_ce"], rtol=1e-6)
