"""The baselines of CRMT's Tables 1-2 (GB, OGM-GE, PMR, MSEFM, MMAT, Mixup):
one test per method for its defining behaviour, on tiny models, and a short
training run of each through the loop."""

import json
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import evaluate
from mmsafe import data as data_lib
from mmsafe import attacks, methods, models
from mmsafe.methods import common, compose, gb, msefm, ogm, pmr
from mmsafe.train import distributed, experiment, loop
from tests.conftest import mfeat_config

SHAPES = {"a": (6,), "b": (5,)}
CLASSES = 3


def _model(width=16):
  encoders = {m: {"name": "mlp", "widths": (width,)} for m in SHAPES}
  return models.build({"head": "concat", "encoders": encoders}, num_classes=CLASSES,
                      input_shapes=SHAPES)


def _batch(seed=0, size=24, informative="a"):
  """Modality `informative` carries the label (a one-hot code plus noise); the
  other modality is noise."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  labels = jnp.arange(size) % CLASSES
  inputs = {m: 0.3 * jax.random.normal(k, (size, *SHAPES[m])) for m, k in zip(SHAPES, keys)}
  code = 2.0 * jax.nn.one_hot(labels, SHAPES[informative][0])
  inputs[informative] = inputs[informative] + code
  return {"inputs": inputs, "label": labels.astype(jnp.int32)}


def _ce(model, params, batch):
  return common.cross_entropy(model.apply({"params": params}, batch["inputs"]).logits,
                              batch["label"])


@pytest.fixture(scope="module")
def dominant():
  """A tiny concat model trained jointly until modality "a" dominates, its
  batch, and the plain CE gradients there."""
  model, batch = _model(), _batch()
  params = model.init(jax.random.PRNGKey(1), batch["inputs"])["params"]
  step = jax.jit(lambda p: jax.tree_util.tree_map(
      lambda w, g: w - 0.5 * g, p, jax.grad(lambda q: _ce(model, q, batch))(p)))
  for _ in range(15):
    params = step(params)
  ce, plain = jax.jit(jax.value_and_grad(lambda p: _ce(model, p, batch)))(params)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
  return types.SimpleNamespace(model=model, params=params, batch=batch, plain=plain, ce=ce,
                               apply=apply)


def _tree_allclose(a, b, **kwargs):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **kwargs), a, b)


# ---------------------------------------------------------------- OGM-GE


OGM_CONFIG = {"ogm_alpha": 2.0, "ogm_ge": False, "ogm_start_epoch": 0, "ogm_end_epoch": None}


def _ogm_grads(model, params, batch, config, seed=0):
  objective = methods.get("ogm")(model, config)
  state = {"model": {}, **ogm.init_state(model, {"params": params})}
  (loss, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      params, state, batch, jax.random.PRNGKey(seed))
  return loss, grads, new_state, metrics


@pytest.mark.slow
def test_ogm_scales_only_the_dominant_encoder_by_the_formula(dominant):
  model, params, batch, plain = dominant.model, dominant.params, dominant.batch, dominant.plain
  loss, grads, new_state, metrics = _ogm_grads(model, params, batch, OGM_CONFIG)

  # The coefficient by hand: o^(m) = s^(m) + b/2, summed true-class softmax.
  out = dominant.apply(params, batch["inputs"])
  labels = np.asarray(batch["label"])
  score = {}
  for m in SHAPES:
    o = np.asarray(out.scores[m], np.float64) + np.asarray(out.head.bias) / 2
    p = np.exp(o - o.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    score[m] = p[np.arange(len(labels)), labels].sum()
  ratio = score["a"] / score["b"]
  assert ratio > 1.2, ratio  # "a" dominates
  coefficient = 1.0 - math.tanh(2.0 * (ratio - 1.0))
  assert coefficient < 0.9
  np.testing.assert_allclose(metrics["coefficient_a"], coefficient, rtol=1e-5)
  np.testing.assert_allclose(metrics["coefficient_b"], 1.0)

  np.testing.assert_allclose(loss, dominant.ce, rtol=1e-6)
  _tree_allclose(grads["encoders_a"],
                 jax.tree_util.tree_map(lambda g: coefficient * g, plain["encoders_a"]),
                 rtol=1e-4, atol=1e-7)
  _tree_allclose(grads["encoders_b"], plain["encoders_b"], rtol=1e-5, atol=1e-7)
  _tree_allclose(grads["head"], plain["head"], rtol=1e-5, atol=1e-7)
  assert int(new_state["ogm"]["step"]) == 1

  # Outside the modulation window (epoch 0 < start epoch 1) the step is plain JT.
  late = {**OGM_CONFIG, "ogm_start_epoch": 1, "steps_per_epoch": 5}
  _, outside, _, _ = _ogm_grads(model, params, batch, late)
  _tree_allclose(outside, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_ogm_ge_adds_noise_with_the_gradients_own_std_to_the_encoders_only(dominant):
  model, params, batch, plain = dominant.model, dominant.params, dominant.batch, dominant.plain
  base_config = {**OGM_CONFIG, "ogm_ge": False}
  _, modulated, _, metrics = _ogm_grads(model, params, batch, base_config)
  _, enhanced, _, _ = _ogm_grads(model, params, batch, {**base_config, "ogm_ge": True})
  _, again, _, _ = _ogm_grads(model, params, batch, {**base_config, "ogm_ge": True})
  _, other, _, _ = _ogm_grads(model, params, batch, {**base_config, "ogm_ge": True}, seed=1)
  _tree_allclose(enhanced["head"], plain["head"], rtol=1e-5, atol=1e-7)
  _tree_allclose(enhanced, again, rtol=0, atol=0)  # deterministic in the step's rng
  for m in SHAPES:
    g = np.asarray(plain[f"encoders_{m}"]["Dense_0"]["kernel"])  # 6x16 / 5x16 entries
    noise = (np.asarray(enhanced[f"encoders_{m}"]["Dense_0"]["kernel"])
             - np.asarray(modulated[f"encoders_{m}"]["Dense_0"]["kernel"]))
    assert 0.6 < noise.std() / g.std(ddof=1) < 1.4, (m, noise.std(), g.std())
    assert abs(noise.mean()) < 0.5 * g.std(ddof=1)
    assert not np.allclose(noise, np.asarray(other[f"encoders_{m}"]["Dense_0"]["kernel"])
                           - np.asarray(modulated[f"encoders_{m}"]["Dense_0"]["kernel"]))


def test_ogm_window_needs_steps_per_epoch():
  with pytest.raises(ValueError, match="steps_per_epoch"):
    methods.get("ogm")(_model(), {**OGM_CONFIG, "ogm_end_epoch": 3})


# ------------------------------------------------------------------- PMR


def test_pmr_prototypes_are_an_ema_of_class_means():
  features = {"a": jnp.array([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])}
  labels = jnp.array([0, 0, 2])
  prototypes = {"a": jnp.array([[10.0, 10.0], [7.0, 7.0], [-1.0, -1.0]])}
  seen = jnp.array([1, 1, 0], jnp.int32)
  new, new_seen = pmr.update_prototypes(prototypes, seen, features, labels, momentum=0.9)
  np.testing.assert_allclose(new["a"][0], 0.9 * np.array([10.0, 10.0]) + 0.1 * np.array([2.0, 1.0]),
                             rtol=1e-6)
  np.testing.assert_allclose(new["a"][1], [7.0, 7.0])  # class 1 absent: unchanged
  np.testing.assert_allclose(new["a"][2], [5.0, 5.0])  # first prototype: the class mean
  np.testing.assert_array_equal(new_seen, [1, 1, 1])


PMR_CONFIG = {"pmr_alpha": 0.7, "pmr_momentum": 0.5, "pmr_start_epoch": 0, "pmr_end_epoch": None,
              "pmr_entropy_end_epoch": None}


def _pmr_setup(dominant, step=0):
  """(labels, prototypes = the class means of the current features, PMR state)."""
  out = dominant.apply(dominant.params, dominant.batch["inputs"])
  labels = dominant.batch["label"]
  onehot = jax.nn.one_hot(labels, CLASSES)
  means = {m: (onehot.T @ out.features[m]) / onehot.sum(0)[:, None] for m in SHAPES}
  state = {"model": {}, "pmr": {"prototypes": means, "seen": jnp.ones((CLASSES,), jnp.int32),
                                "step": jnp.asarray(step, jnp.int32)}}
  return labels, means, state


def _prototype_term(model, batch, means, modality, kind):
  """By hand: PCE or the entropy of the prototype classifier of `modality`."""
  labels = batch["label"]

  def term(p):
    features = model.apply({"params": p}, batch["inputs"]).features[modality]
    dist = jnp.sqrt(jnp.sum((features[:, None] - means[modality][None]) ** 2, -1))
    if kind == "pce":
      return common.cross_entropy(-dist, labels)
    prob = jax.nn.softmax(-dist, axis=-1)
    return -jnp.mean(jnp.sum(prob * jnp.log(prob), axis=-1))

  return term


@pytest.mark.slow
def test_pmr_adds_prototypical_ce_on_the_weaker_modality_only(dominant):
  model, params, batch, plain = dominant.model, dominant.params, dominant.batch, dominant.plain
  labels, means, state = _pmr_setup(dominant)
  config = {**PMR_CONFIG, "pmr_entropy_weight": 0.0}
  objective = methods.get("pmr")(model, config)
  (loss, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(
      params, state, batch, jax.random.PRNGKey(0))
  assert float(metrics["ratio_a"]) > 1.0 > float(metrics["ratio_b"])
  assert float(metrics["coefficient_a"]) == 0.0
  np.testing.assert_allclose(metrics["coefficient_b"], 0.7, rtol=1e-6)

  pce_b = _prototype_term(model, batch, means, "b", "pce")
  np.testing.assert_allclose(loss, dominant.ce + 0.7 * jax.jit(pce_b)(params), rtol=1e-5)
  extra = jax.jit(jax.grad(pce_b))(params)
  _tree_allclose(grads["encoders_a"], plain["encoders_a"], rtol=1e-5, atol=1e-7)
  _tree_allclose(grads["head"], plain["head"], rtol=1e-5, atol=1e-7)
  _tree_allclose(grads["encoders_b"], jax.tree_util.tree_map(
      lambda g, e: g + 0.7 * e, plain["encoders_b"], extra["encoders_b"]), rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(extra["encoders_b"]["Dense_0"]["kernel"])).max() > 1e-4
  # ... and the prototypes moved toward this batch's means (here: equal to them).
  _tree_allclose(new_state["pmr"]["prototypes"], means, rtol=1e-5, atol=1e-6)
  assert int(new_state["pmr"]["step"]) == 1


def test_pmr_entropy_of_the_prototype_classifier_by_hand():
  logits = jnp.array([[0.0, 0.0, 0.0], [0.0, -1.0, -2.0]])
  p = np.exp([0.0, -1.0, -2.0]) / np.exp([0.0, -1.0, -2.0]).sum()
  expected = (math.log(3.0) - np.sum(p * np.log(p))) / 2
  np.testing.assert_allclose(pmr.prototype_entropy(logits), expected, rtol=1e-6)


@pytest.mark.slow
def test_pmr_entropy_regulariser_raises_the_dominant_modalitys_entropy_early(dominant):
  """`L = CE + beta_b PCE_b - mu_a H_a` while epoch <= pmr_entropy_end_epoch
  (here 0, one step per epoch), `CE + beta_b PCE_b` after it."""
  model, params, batch, plain = dominant.model, dominant.params, dominant.batch, dominant.plain
  config = {**PMR_CONFIG, "pmr_entropy_weight": 0.3, "pmr_entropy_end_epoch": 0,
            "steps_per_epoch": 1}
  objective = jax.jit(jax.value_and_grad(methods.get("pmr")(model, config), has_aux=True))
  labels, means, state = _pmr_setup(dominant, step=0)
  (loss, (_, metrics)), grads = objective(params, state, batch, jax.random.PRNGKey(0))
  entropy_a = _prototype_term(model, batch, means, "a", "entropy")
  pce_b = _prototype_term(model, batch, means, "b", "pce")
  np.testing.assert_allclose(metrics["entropy_coefficient_a"], 0.3, rtol=1e-6)
  assert float(metrics["entropy_coefficient_b"]) == 0.0  # b is the slower modality
  # The entropy of the dominant modality, in float64 numpy from its features.
  features = np.asarray(dominant.apply(params, batch["inputs"]).features["a"], np.float64)
  dist = np.linalg.norm(features[:, None] - np.asarray(means["a"], np.float64)[None], axis=-1)
  prob = np.exp(-dist) / np.exp(-dist).sum(-1, keepdims=True)
  np.testing.assert_allclose(metrics["entropy_a"], -np.mean(np.sum(prob * np.log(prob), -1)),
                             rtol=1e-5)
  np.testing.assert_allclose(loss, dominant.ce + 0.7 * pce_b(params) - 0.3 * entropy_a(params),
                             rtol=1e-5)
  extra = jax.jit(jax.grad(entropy_a))(params)
  _tree_allclose(grads["encoders_a"], jax.tree_util.tree_map(
      lambda g, e: g - 0.3 * e, plain["encoders_a"], extra["encoders_a"]), rtol=1e-4, atol=1e-6)
  _tree_allclose(grads["head"], plain["head"], rtol=1e-5, atol=1e-7)
  # Descending the regulariser's part of the gradient raises H_a.
  step = jax.tree_util.tree_map(lambda g, p0: -0.05 * (g - p0), grads, plain)
  moved = jax.tree_util.tree_map(jnp.add, params, step)
  assert float(entropy_a(moved)) > float(entropy_a(params)) + 1e-4
  # Epoch 1 > pmr_entropy_end_epoch: the term is off, PCE stays on.
  _, _, late_state = _pmr_setup(dominant, step=1)
  (late, (_, late_metrics)), _ = objective(params, late_state, batch, jax.random.PRNGKey(0))
  assert float(late_metrics["entropy_coefficient_a"]) == 0.0
  np.testing.assert_allclose(late, dominant.ce + 0.7 * pce_b(params), rtol=1e-5)


def test_pmr_entropy_weight_is_checked():
  with pytest.raises(ValueError, match=r"method_kwargs\.pmr_entropy_weight: expected a finite "
                                       r"number >= 0, got -1"):
    methods.get("pmr")(_model(), {**PMR_CONFIG, "pmr_entropy_weight": -1.0})


# ----------------------------------------------------------------- MSEFM


def _numpy_ista(d, x, lasso, steps):
  d, x = np.asarray(d, np.float64), np.asarray(x, np.float64)
  step = 1.0 / np.linalg.eigvalsh(d.T @ d).max()
  h = np.zeros((x.shape[0], d.shape[0]))
  for _ in range(steps):
    h = h - step * (h @ d - x) @ d.T
    h = np.sign(h) * np.maximum(np.abs(h) - step * lasso, 0.0)
  return h


def test_msefm_memory_is_a_ring_buffer_of_the_latest_features():
  memory = {"a": jnp.zeros((5, 2))}
  pointer, count = jnp.array(0), jnp.array(0)
  for start in (0, 3, 6):
    features = {"a": jnp.arange(start, start + 3, dtype=jnp.float32)[:, None].repeat(2, 1)}
    memory, pointer, count = msefm.write_memory(memory, pointer, count, features)
  # Rows written in order 0..8 into 5 slots: slot i holds the last write i (mod 5).
  np.testing.assert_array_equal(memory["a"][:, 0], [5, 6, 7, 8, 4])
  assert int(pointer) == 4 and int(count) == 5


@pytest.mark.slow
def test_msefm_loss_is_ce_on_memory_blended_features_plus_similarity(dominant):
  model, params, batch = dominant.model, dominant.params, dominant.batch
  config = {"msefm_sim_weight": 0.8, "msefm_memory_size": 24, "msefm_lasso": 0.05,
            "msefm_blend": 0.6, "msefm_ista_steps": 30}
  settings = msefm.MSEFMSettings(**config)
  objective = jax.jit(methods.get("msefm")(model, config))
  state = {"model": {}, **msefm.init_state(model, {"params": params}, settings)}
  out = dominant.apply(params, batch["inputs"])
  bank = {m: out.features[m] + 0.1 for m in SHAPES}  # a full memory, not the batch itself
  full = {"model": {}, "msefm": {"memory": bank, "pointer": jnp.array(0),
                                 "count": jnp.array(24)}}

  def by_hand(blended):
    f = {m: np.asarray(v, np.float64) for m, v in blended.items()}
    logits = sum(f[m] @ np.asarray(out.head.kernels[m]) for m in SHAPES) + np.asarray(
        out.head.bias)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    ce = -logp[np.arange(24), np.asarray(batch["label"])].mean()
    cos = (f["a"] * f["b"]).sum(1) / np.linalg.norm(f["a"], axis=1) / np.linalg.norm(f["b"], axis=1)
    return ce + 0.8 * cos.mean()

  # An empty memory leaves the features as they are.
  loss, (new_state, _) = objective(params, state, batch, None)
  np.testing.assert_allclose(loss, by_hand(out.features), rtol=1e-5)
  np.testing.assert_allclose(new_state["msefm"]["memory"]["a"], out.features["a"], rtol=1e-6)
  assert int(new_state["msefm"]["count"]) == 24

  # A full memory: phi~ = 0.6 * (ISTA codes @ D) + 0.4 * phi.
  blended = {m: 0.6 * _numpy_ista(bank[m], out.features[m], 0.05, 30) @ np.asarray(bank[m])
             + 0.4 * np.asarray(out.features[m]) for m in SHAPES}
  loss, (_, metrics) = objective(params, full, batch, None)
  np.testing.assert_allclose(loss, by_hand(blended), rtol=1e-4)
  codes = msefm.ista(bank["a"], out.features["a"], lasso=0.05, steps=30)
  np.testing.assert_allclose(codes, _numpy_ista(bank["a"], out.features["a"], 0.05, 30),
                             rtol=1e-3, atol=1e-5)
  # The similarity term's gradient reaches both encoders through the blend.
  similarity = lambda p: msefm.cross_modal_similarity(msefm.defended_features(
      model.apply({"params": p}, batch["inputs"]).features, full["msefm"], settings))
  np.testing.assert_allclose(metrics["similarity"], similarity(params), rtol=1e-5)
  grads = jax.jit(jax.grad(similarity))(params)
  for m in SHAPES:
    assert np.abs(np.asarray(grads[f"encoders_{m}"]["Dense_0"]["kernel"])).max() > 1e-5


# ------------------------------------------------------------------ MMAT


@pytest.mark.slow
def test_mmat_trains_on_pgd_inputs_inside_the_joint_eps_ball(dominant):
  model, params, batch = dominant.model, dominant.params, dominant.batch
  config = {"attack_eps": 0.5, "attack_steps": 4, "attack_step_size": 0.25,
            "attack_random_start": True}
  objective = methods.get("mmat")(model, config)
  rng = jax.random.PRNGKey(3)
  state = {"model": {}}

  @jax.jit
  def run(params):
    adversarial = common.adversarial_inputs(model, params, state, batch, rng, eps=0.5, steps=4,
                                            step_size=0.25, random_start=True)
    return objective(params, state, batch, rng), adversarial, _ce_on(model, params, adversarial,
                                                                        batch["label"])

  (loss, (_, metrics)), adversarial, adversarial_ce = run(params)
  norms = np.sqrt(sum(np.sum(np.square(np.asarray(adversarial[m]) - np.asarray(x)).reshape(
      len(x), -1), axis=1) for m, x in batch["inputs"].items()))
  assert np.all(norms <= 0.5 * (1 + 1e-5)) and norms.mean() > 0.25, norms
  np.testing.assert_allclose(loss, adversarial_ce, rtol=1e-6)
  np.testing.assert_allclose(metrics["max_perturbation_norm"], norms.max(), rtol=1e-6)
  assert float(loss) > float(dominant.ce) + 0.05  # harder than clean


def test_decoupling_at_trains_on_decoupling_inputs_within_the_l0_budget(dominant):
  model, params, batch = dominant.model, dominant.params, dominant.batch
  config = {"decoupling_fraction": 0.2, "decoupling_max_change": 1.5, "decoupling_rounds": 2,
            "decoupling_steps": 3}
  objective = methods.get("decoupling_at")(model, config)
  rng = jax.random.PRNGKey(4)
  state = {"model": {}}

  @jax.jit
  def run(params):
    logits_fn = lambda x: model.apply({"params": params}, x).logits
    adversarial = attacks.decoupling(logits_fn, batch["inputs"], batch["label"], rng,
                                     fraction=0.2, rounds=2, steps_per_round=3, max_change=1.5)
    return objective(params, state, batch, rng), adversarial, _ce_on(model, params, adversarial,
                                                                        batch["label"])

  (loss, (_, metrics)), adversarial, adversarial_ce = run(params)
  delta = np.concatenate([np.asarray(adversarial[m] - x).reshape(len(x), -1)
                          for m, x in sorted(batch["inputs"].items())], axis=1)
  changed = np.sum(delta != 0, axis=1)
  # 20% of the 11 entries: at most 2 change, each by at most 1.5.
  assert changed.max() <= 2 and changed.mean() > 1 and np.abs(delta).max() <= 1.5 + 1e-6
  np.testing.assert_allclose(loss, adversarial_ce, rtol=1e-6)
  np.testing.assert_allclose(metrics["changed_entries"], changed.mean(), rtol=1e-6)
  assert float(loss) > float(dominant.ce) + 0.05  # harder than clean


def _ce_on(model, params, inputs, labels):
  return common.cross_entropy(model.apply({"params": params}, inputs).logits, labels)


# ----------------------------------------------------------------- Mixup


@pytest.mark.slow
def test_mixup_with_lambda_one_is_plain_ce_and_zero_is_permuted_ce(dominant):
  model, params, batch, plain = dominant.model, dominant.params, dominant.batch, dominant.plain
  state = {"model": {}}
  permutation = jnp.roll(jnp.arange(24), 5)
  ce = compose.ce_loss(compose.MixupSettings())

  def mixup_loss(p, lam):  # the mixup objective at a given lambda and permutation
    mixed = common.mix_inputs(batch["inputs"], lam, permutation)
    out, _ = common.apply_model(model, p, state, mixed, train=True)
    return compose.mixed_loss(ce, out, batch["label"], lam, permutation)[0]

  loss_fn = jax.jit(mixup_loss)
  np.testing.assert_allclose(loss_fn(params, 1.0), dominant.ce, rtol=1e-6)
  _tree_allclose(jax.jit(jax.grad(loss_fn))(params, 1.0),
                 plain, rtol=1e-5, atol=1e-8)
  permuted = {"inputs": {m: x[permutation] for m, x in batch["inputs"].items()},
              "label": batch["label"][permutation]}
  permuted_ce = common.cross_entropy(dominant.apply(params, permuted["inputs"]).logits,
                                    permuted["label"])
  np.testing.assert_allclose(loss_fn(params, 0.0), permuted_ce, rtol=1e-6)
  # The registered objective mixes with lambda ~ Beta(alpha, alpha).
  _, (_, metrics) = jax.jit(methods.get("mixup")(model, {"mixup_alpha": 1.0}))(
      params, state, batch, jax.random.PRNGKey(0))
  assert 0.0 < float(metrics["lambda"]) < 1.0


# -------------------------------------------------------------------- GB


def test_gb_weights_follow_the_ogr_formula():
  reference = {"train": jnp.array([1.0, 1.2, 2.0]), "heldout": jnp.array([1.5, 1.4, 2.1])}
  current = {"train": jnp.array([0.5, 1.0, 1.0]), "heldout": jnp.array([1.2, 1.3, 2.3])}
  weights = gb.update_blending_weights(jnp.full(3, 1 / 3), reference, current)
  delta_g = np.array([0.3, 0.1, -0.2])
  delta_o = np.array([(1.2 - 0.5) - (1.5 - 1.0), (1.3 - 1.0) - (1.4 - 1.2), (2.3 - 1.0) - 0.1])
  raw = np.maximum(delta_g, 0) / delta_o ** 2
  np.testing.assert_allclose(weights, raw / raw.sum(), rtol=1e-5)
  assert float(weights[2]) == 0.0  # held-out loss went up: no weight
  # No head generalised: the weights in use are kept.
  worse = {"train": current["train"], "heldout": reference["heldout"] + 0.1}
  kept = gb.update_blending_weights(jnp.array([0.2, 0.3, 0.5]), reference, worse)
  np.testing.assert_allclose(kept, [0.2, 0.3, 0.5])


@pytest.mark.slow
def test_gb_loss_blends_the_heads_and_the_epoch_hook_reestimates_weights(dominant):
  model, params, batch, plain = dominant.model, dominant.params, dominant.batch, dominant.plain
  weights = jnp.array([0.5, 0.3, 0.2])
  state = {"model": {}, **gb.init_state(model, {"params": params})}
  np.testing.assert_allclose(state["gb"]["weights"], np.full(3, 1 / 3))
  state["gb"] = {**state["gb"], "weights": weights}
  loss, _ = jax.jit(methods.get("gb")(model, {}))(params, state, batch, None)
  out = dominant.apply(params, batch["inputs"])
  heads = [out.logits, out.scores["a"] + out.head.bias, out.scores["b"] + out.head.bias]
  expected = sum(w * common.cross_entropy(z, batch["label"]) for w, z in zip(weights, heads))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)

  # The hook: a measurement every 2 epochs; weights from two measurements.
  def split(name, b):
    return data_lib.Dataset(name="toy", split=name, inputs=b["inputs"],
                            labels=np.asarray(b["label"]), num_classes=CLASSES, stats={})

  train, heldout = split("train", batch), split("heldout", _batch(seed=7, size=15))
  splits = {"train": train, "heldout": heldout}
  config = gb.GBSettings(gb_super_epoch=2)
  reduce_over_split = distributed.split_reducer(splits, batch_size=10)
  hook = lambda p, s, epoch: gb.measure_and_blend(model, config, {"params": p}, s, tuple(splits),
                                                  reduce_over_split, epoch=epoch)

  def measured(p):
    result = {}
    for split, data in (("train", train), ("heldout", heldout)):
      o = dominant.apply(p, data.inputs)
      zs = [o.logits, o.scores["a"] + o.head.bias, o.scores["b"] + o.head.bias]
      result[split] = np.array([float(common.cross_entropy(z, jnp.asarray(data.labels)))
                                for z in zs])
    return result

  first = hook(params, state, 0)
  np.testing.assert_allclose(first["gb"]["weights"], weights)  # no reference yet
  _tree_allclose(first["gb"]["reference"], measured(params), rtol=1e-5)
  state = {**state, **first}
  assert hook(params, state, 1) == {}
  # "Train" further: perturb the parameters, then re-estimate at epoch 2.
  later = jax.tree_util.tree_map(
      lambda w, g: w - 0.3 * g, params, plain)
  second = hook(later, state, 2)
  ref, cur = measured(params), measured(later)
  delta_g = ref["heldout"] - cur["heldout"]
  delta_o = (cur["heldout"] - cur["train"]) - (ref["heldout"] - ref["train"])
  raw = np.maximum(delta_g, 0) / delta_o ** 2
  assert raw.sum() > 0
  np.testing.assert_allclose(second["gb"]["weights"], raw / raw.sum(), rtol=1e-3, atol=1e-6)
  _tree_allclose(second["gb"]["reference"], cur, rtol=1e-5)


def test_gb_holds_out_a_slice_of_the_training_split():
  config = mfeat_config("gb", num_epochs=1)
  whole = experiment.load_splits(config)["train"]
  splits = experiment.build_experiment(config).splits
  train, heldout = splits["train"], splits["heldout"]
  assert (len(train), len(heldout)) == (1260, 140) and len(whole) == 1400
  assert len(splits["validation"]) == len(experiment.load_splits(config)["validation"])
  # Disjoint, together the whole training split (mfeat's meta: the UCI row).
  rows = np.concatenate([train.meta["index"], heldout.meta["index"]])
  np.testing.assert_array_equal(np.sort(rows), np.sort(whole.meta["index"]))
  for m, x in heldout.inputs.items():
    np.testing.assert_array_equal(x, whole.inputs[m][np.isin(whole.meta["index"],
                                                             heldout.meta["index"])])
  # The same slice for the same seed, another for another seed; none for other methods.
  np.testing.assert_array_equal(
      experiment.build_experiment(config).splits["heldout"].meta["index"], heldout.meta["index"])
  config.seed = 1
  assert set(experiment.build_experiment(config).splits["heldout"].meta["index"]) != set(
      heldout.meta["index"])
  config.method = "jt"
  assert "heldout" not in experiment.build_experiment(config).splits
  config.method = "gb"
  for bad in (0.0, 1.0, 1.5, 0.0001):
    config.method_kwargs.gb_heldout_fraction = bad
    with pytest.raises(ValueError, match="method_kwargs.gb_heldout_fraction"):
      experiment.build_experiment(config)


# ---------------------------------------------------- training on mfeat


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gb", "ogm", "pmr", "msefm", "mmat", "mixup"])
def test_baseline_trains_on_mfeat(tmp_path, method):
  config = mfeat_config(method, num_epochs=1)
  config.optimizer.decay_epochs = ()
  config.data.modalities = ("fou", "kar")  # MLP encoders: cheap to compile
  config.method_kwargs.msefm_memory_size = 256  # not the default: the loop must pass it on
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert results["test_accuracy"] > 0.3, results  # chance: 0.1
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    losses = [json.loads(line)["train/loss"] for line in f if "train/loss" in line]
  assert losses and all(math.isfinite(v) for v in losses)
  if method == "msefm":  # its test-time defence, through experiments.evaluate
    evals = {"defended": {"type": "clean", "split": "test", "defence": "msefm",
                          "max_examples": 100}}
    done = evaluate.evaluate_run(str(tmp_path), evals, out=str(tmp_path / "defended"))
    with open(done["defended"]["files"][0]) as f:
      written = json.load(f)
    assert written["meta"]["defence"] == "msefm" and written["num_examples"] == 100
    assert written["clean_accuracy"] > 0.3, written  # chance: 0.1
