"""CRMT: the L1 regulariser, step 2, CRMT-Mix, and the two-step schedule."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmsafe import data as data_lib
from mmsafe import methods
from mmsafe.methods import compose, crmt
from mmsafe.models import HeadParams, ModelOutput
from mmsafe.train import TrainState, distributed, loop, make_optimizer, make_train_step
from mmsafe.train import per_stage, restore
from tests.conftest import mfeat_config, rewind


def _direct_l1(scores, labels, floor):
  """Eq. 12 evaluated literally, in float64: log(sum_m sum_{k!=y} e^{u_k} / e^{u_y} + floor)."""
  total = np.zeros(len(labels))
  for u in scores.values():
    u = np.asarray(u, np.float64)
    e = np.exp(u)
    total += e.sum(1) / e[np.arange(len(labels)), labels] - 1.0
  return np.log(total + floor)


@pytest.mark.parametrize("floor", [0.0, 1e-5])
def test_l1_equals_the_direct_formula_on_moderate_scores(floor):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  scores = {m: 3.0 * jax.random.normal(k, (16, 7)) for m, k in zip("abc", keys)}
  labels = jnp.arange(16) % 7
  np.testing.assert_allclose(crmt.margin_regularizer(scores, labels, floor),
                             _direct_l1(scores, labels, floor), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_l1_stays_finite_on_huge_scores():
  scores = {"a": jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5.0]]),
            "b": jnp.array([[-1e4, 1e4, 0.0], [1e4, -1e4, 1e4]])}
  labels = jnp.array([0, 1])
  for floor in (0.0, 1e-5):
    value, grads = jax.value_and_grad(
        lambda s: crmt.margin_regularizer(s, labels, floor).sum())(scores)
    assert np.all(np.isfinite(value))
    assert all(np.all(np.isfinite(g)) for g in grads.values())
  # Margins all +1e4: L1 is bounded below by log(floor) with a floor, and the
  # smooth max of the negative margins (about -1e4) without.
  big = {"a": jnp.array([[1e4, 0.0, 0.0]]), "b": jnp.array([[1e4, 0.0, 0.0]])}
  np.testing.assert_allclose(crmt.margin_regularizer(big, jnp.array([0]), 1e-5),
                             np.log(1e-5), rtol=1e-6)
  np.testing.assert_allclose(crmt.margin_regularizer(big, jnp.array([0]), 0.0),
                             -1e4 + np.log(4.0), rtol=1e-6)


def _output(seed=0, batch=12, classes=5):
  """An orthogonal-head ModelOutput with random scores, weights 0.3/0.7."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  scores = {m: jax.random.normal(k, (batch, classes)) for m, k in zip("ab", keys[:2])}
  weights = {"a": jnp.full((classes,), 0.3), "b": jnp.full((classes,), 0.7)}
  bias = jax.random.normal(keys[2], (classes,))
  logits = sum(weights[m] * scores[m] for m in "ab") + bias
  head = HeadParams(kind="orthogonal", bias=bias, weights=weights,
                    kernels={m: jnp.eye(8, classes) for m in "ab"})
  out = ModelOutput(features={m: jnp.zeros((batch, 8)) for m in "ab"}, scores=scores,
                    logits=logits, head=head)
  return out, jax.random.randint(keys[3], (batch,), 0, classes)


@pytest.mark.slow
def test_mixup_with_lambda_one_reduces_to_step1():
  out, labels = _output()
  permutation = jnp.roll(jnp.arange(labels.shape[0]), 3)
  step1 = lambda output, y: crmt.step1_loss(output, y, 2.0, 1e-5)
  mixed, mixed_parts = compose.mixed_loss(step1, out, labels, 1.0, permutation)
  plain, plain_parts = crmt.step1_loss(out, labels, 2.0, 1e-5)
  np.testing.assert_allclose(mixed, plain, rtol=1e-6)
  np.testing.assert_allclose(mixed_parts["l1"], plain_parts["l1"], rtol=1e-6)
  inputs = {"a": jnp.arange(12.0).reshape(4, 3)}
  mixed = methods.common.mix_inputs(inputs, 1.0, jnp.array([3, 2, 1, 0]))
  np.testing.assert_array_equal(mixed["a"], inputs["a"])
  # ... and lambda = 0 trains on the permuted labels only.
  zero, _ = compose.mixed_loss(step1, out, labels, 0.0, permutation)
  np.testing.assert_allclose(zero, crmt.step1_loss(out, labels[permutation], 2.0, 1e-5)[0],
                             rtol=1e-6)


def test_closest_class_bound_matches_theorem_3_5_by_hand():
  out, labels = _output()
  tau = {"a": jnp.full((1, 5), 2.0), "b": jnp.linspace(1.0, 3.0, 5)[None]}
  bound = crmt.closest_class_bound(out, labels, tau)
  logits = np.asarray(out.logits)
  for i, y in enumerate(np.asarray(labels)):
    j = max((k for k in range(5) if k != y), key=lambda k: logits[i, k])
    denominator = np.sqrt(sum(
        (0.3 if m == "a" else 0.7) ** 2 * (float(tau[m][0, y]) + float(tau[m][0, j])) ** 2
        for m in "ab"))
    np.testing.assert_allclose(bound[i], (logits[i, y] - logits[i, j]) / denominator, rtol=1e-5)


@pytest.fixture(scope="module")
def step2_setup(trained_mfeat):
  """An OJT model from the session fixture, with its step-2 objective, optimizer
  and tau estimated on the training split."""
  model, variables, splits, _ = trained_mfeat["ojt"]
  train = splits["train"]
  optimizers = per_stage({"step1": optax.sgd(0.0), "step2": make_optimizer(
      {"learning_rate": 0.05, "momentum": 0.9, "weight_decay": 1e-2,
       "trainable": crmt.STEP2.trainable}, 20)})
  state = TrainState.create(variables, optimizers["step1"], jax.random.PRNGKey(0),
                            crmt.init_state(model, variables))
  reduce_over_split = distributed.split_reducer({"train": train}, batch_size=700)
  state = state.replace(state={**state.state, **crmt.prepare_step2(
      model, variables, reduce_over_split=reduce_over_split)})
  step = jax.jit(make_train_step(crmt.step2_objective(model), optimizers["step2"]))
  return model, state, step, train


def _mean_bound(model, state, dataset):
  out = model.apply(state.variables, dataset.inputs)
  return float(jnp.mean(crmt.closest_class_bound(out, jnp.asarray(dataset.labels),
                                                 state.state["crmt"]["tau"])))


@pytest.mark.slow
def test_step2_changes_only_the_modality_weights_and_raises_the_bound(step2_setup):
  model, state, step, train = step2_setup
  before = _mean_bound(model, state, train)
  new = state
  for s in range(60):
    new, metrics = step(new, data_lib.train_batch(train.inputs, train.labels, batch_size=64,
                                                  seed=0, step=s))
  changed = jax.tree_util.tree_map_with_path(
      lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(np.asarray(a) != np.asarray(b)))),
      state.params, new.params)
  flat = dict(jax.tree_util.tree_leaves(changed, is_leaf=lambda x: isinstance(x, tuple)))
  moved = sorted(path for path, diff in flat.items() if diff)
  assert moved and all("['a']" in path for path in moved), moved
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.state["model"], new.state["model"])
  after = _mean_bound(model, new, train)
  assert after > before * 1.05, (before, after)


@pytest.mark.slow
def test_tau_is_the_maximum_gradient_norm_of_the_uni_modal_scores(step2_setup):
  model, state, _, train = step2_setup
  tau = state.state["crmt"]["tau"]
  variables = state.variables
  subset = data_lib.take(train.inputs, train.labels, np.arange(40))["inputs"]
  full = dict(train.inputs)
  for m, t in tau.items():
    assert t.shape == (1, 10)

    def norms(inputs, m=m):
      """[N, K] per-example gradient norms of the uni-modal scores u^(m)_k."""
      score = lambda x, k: model.apply(variables, {**inputs, m: x}).scores[m][:, k].sum()
      return np.stack([np.sqrt(np.sum(np.asarray(jax.grad(score)(inputs[m], k)) ** 2,
                                      axis=tuple(range(1, inputs[m].ndim))))
                       for k in range(10)], 1)

    assert np.all(norms(subset) <= np.asarray(t) * (1 + 1e-4) + 1e-6)
    # ... and it is attained: the maximum over the whole training split.
    np.testing.assert_allclose(norms(full).max(axis=0), np.asarray(t)[0], rtol=1e-4)


@pytest.mark.slow
def test_two_step_run_resumes_in_step2(tmp_path):
  config = mfeat_config("crmt", num_epochs=1)
  config.optimizer.decay_epochs = ()
  config.step2.num_epochs = 2
  config.checkpoint_every_steps = 21
  config.checkpoint_max_to_keep = 3
  full = loop.train_and_evaluate(config, str(tmp_path / "full"))
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  rewind(str(tmp_path / "resumed"), 2 * 21)  # Killed after one epoch of step 2.
  resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["steps"] == full["steps"] == 3 * 21
  a = restore.restore_run(str(tmp_path / "full"), which="latest")[2]
  b = restore.restore_run(str(tmp_path / "resumed"), which="latest")[2]
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  with open(tmp_path / "full" / "metrics.jsonl") as f:
    stages = [json.loads(line).get("stage") for line in f]
  assert "step1" in stages and "step2" in stages

