"""The attacks' loop strategies (`mmsafe.attacks.engine`): a host loop over compiled
steps and the traced loops give the same attacks on a small conv model, the
steps compile once per model, and "python" refuses to run under a trace."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks
from mmsafe.attacks import engine

PGD_MODULE = importlib.import_module("mmsafe.attacks.pgd")  # (attacks.pgd is the function)

B = 12
SHAPES = {"img": (6, 6, 1), "vec": (5,)}
TRACED = ("scan", "fori")


def _variables(seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])),
                                      jnp.float32)
  return {"conv": normal(3, 3, 1, 4), "img": normal(144, 5), "vec": normal(5, 5)}


def _apply(variables, inputs):
  """A conv layer on "img", a dense one on "vec", summed logits (5 classes)."""
  h = jax.lax.conv_general_dilated(inputs["img"], variables["conv"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jnp.tanh(h).reshape(inputs["img"].shape[0], -1)
  return h @ variables["img"] + jnp.tanh(inputs["vec"]) @ variables["vec"]


def _data(seed=1):
  rng = np.random.default_rng(seed)
  inputs = {m: jnp.asarray(rng.normal(size=(B, *s)), jnp.float32) for m, s in SHAPES.items()}
  labels = jnp.argmax(_apply(_variables(), inputs), -1).astype(jnp.int32)
  return inputs, labels


def _assert_same(result, reference):
  (adversarial, info), (ref_adversarial, ref_info) = result, reference
  for m in ref_adversarial:
    np.testing.assert_allclose(adversarial[m], ref_adversarial[m], atol=2e-5)
  np.testing.assert_array_equal(info["misclassified"], ref_info["misclassified"])
  np.testing.assert_allclose(info["loss"], ref_info["loss"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"restarts": 3, "random_start": True},
    {"restarts": 2, "random_start": False, "loss": "targeted", "modalities": "img"},
    {"restarts": 1, "random_start": False, "keep_best": False},
])
def test_pgd_host_loop_equals_the_traced_loops(options):
  inputs, labels = _data()
  logits_fn = jax.tree_util.Partial(_apply, _variables())
  eps = jnp.linspace(0.2, 1.5, B)
  bounds = {"img": (-1.5, 1.5)}

  def run(loop):
    return attacks.pgd(logits_fn, inputs, labels, jax.random.PRNGKey(3), eps=eps, steps=6,
                       bounds=bounds, return_info=True, loop=loop, **options)

  reference = run("python")
  assert 0 < int(np.sum(reference[1]["misclassified"])) < B  # the attack bites, not always
  for loop in TRACED:
    _assert_same(jax.jit(lambda x, y, loop=loop: run(loop))(inputs, labels), reference)
  _assert_same(run("auto"), reference)  # concrete inputs on this CPU: the host loop


@pytest.mark.slow
def test_decoupling_host_loop_equals_the_traced_loops():
  inputs, labels = _data()
  logits_fn = jax.tree_util.Partial(_apply, _variables())

  def run(loop, count):
    return attacks.decoupling(logits_fn, inputs, labels, jax.random.PRNGKey(4), count=count,
                              max_count=20, rounds=3, steps_per_round=4, max_change=1.5,
                              random_start=True, return_info=True, loop=loop)

  reference = run("python", 12)
  assert int(np.sum(reference[1]["misclassified"])) > 0
  np.testing.assert_array_less(reference[1]["changed"], 13)
  for loop in TRACED:
    result = jax.jit(lambda c, loop=loop: run(loop, c))(jnp.int32(12))
    _assert_same(result, reference)
    np.testing.assert_array_equal(result[1]["changed"], reference[1]["changed"])


def test_host_loop_compiles_its_step_once_per_model():
  inputs, labels = _data()
  step = PGD_MODULE._COMPILED[1]

  def run(variables, eps):
    return attacks.pgd(jax.tree_util.Partial(_apply, variables), inputs, labels,
                       jax.random.PRNGKey(0), eps=jnp.float32(eps), steps=3, loop="python")

  run(_variables(0), 0.5)
  compiled = step._cache_size()
  run(_variables(1), 0.9)  # new variables and eps: arguments, not constants
  assert step._cache_size() == compiled


def test_host_loop_compiles_each_piece_once_with_committed_variables():
  """Committed variables (as restored from a checkpoint) and numpy inputs: the first
  and the later calls of each piece share one compilation (`engine.host_ready`)."""
  inputs, labels = _data()
  inputs = {m: np.asarray(x[:7]) for m, x in inputs.items()}  # a shape no other test uses
  variables = jax.device_put(_variables(), jax.devices()[0])
  _, step, finish = PGD_MODULE._COMPILED
  before = step._cache_size(), finish._cache_size()
  attacks.pgd(jax.tree_util.Partial(_apply, variables), inputs, np.asarray(labels[:7]),
              jax.random.PRNGKey(0), eps=0.5, steps=3, restarts=3, random_start=False,
              loop="python")
  assert (step._cache_size() - before[0], finish._cache_size() - before[1]) == (1, 1)


def test_the_losses_of_one_attack_share_one_compiled_step():
  """`loss` a sequence, `loss_index` an array: every loss runs in one compiled
  step, and each gives bit for bit the attack with that loss alone."""
  inputs, labels = _data()
  inputs, labels = {m: x[:5] for m, x in inputs.items()}, labels[:5]  # a shape of its own
  logits_fn = jax.tree_util.Partial(_apply, _variables())
  step = PGD_MODULE._COMPILED[1]
  losses = ("ce", "margin", "targeted")

  def run(**loss):
    return attacks.pgd(logits_fn, inputs, labels, jax.random.PRNGKey(0), eps=2.0, steps=4,
                       restarts=2, loop="python", return_info=True, **loss)

  before = step._cache_size()
  shared = [run(loss=losses, loss_index=i) for i in range(len(losses))]
  assert step._cache_size() - before == 1
  for name, (adversarial, info) in zip(losses, shared):
    alone, alone_info = run(loss=name)
    for m in inputs:
      np.testing.assert_array_equal(adversarial[m], alone[m], err_msg=name)
    np.testing.assert_array_equal(info["loss"], alone_info["loss"], err_msg=name)
  with pytest.raises(ValueError, match=r"loss_index: expected in \[0, 3\), got 3"):
    run(loss=losses, loss_index=3)


def test_strategy_resolution_and_errors():
  inputs, labels = _data()
  logits_fn = jax.tree_util.Partial(_apply, _variables())
  assert engine.resolve("auto", inputs) == ("python" if jax.default_backend() == "cpu"
                                            else "scan")
  assert engine.resolve("fori", inputs) == "fori"
  with pytest.raises(ValueError, match="loop: expected one of"):
    attacks.pgd(logits_fn, inputs, labels, jax.random.PRNGKey(0), eps=0.5, steps=2,
                loop="while")
  with pytest.raises(ValueError, match="caller is tracing"):
    jax.jit(lambda x: attacks.pgd(logits_fn, x, labels, jax.random.PRNGKey(0), eps=0.5,
                                  steps=2, loop="python"))(inputs)
  traced = jax.jit(lambda x: jnp.asarray(engine.resolve("auto", x) == "scan"))(inputs)
  assert bool(traced)
