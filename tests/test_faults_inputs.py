"""Input faults in the attacks and the certificates: NaN/Inf inputs, labels out of
range and empty batches fail fast with errors naming the argument; under jit, where
values go unchecked, a non-finite example is never robust, correct or certified."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks, certify, models
from tests.test_attacks import _inputs, _nonlinear
from tests.test_robustness import _data, _model, build

K = 4  # classes of `_nonlinear` and of the tiny model
KEY = jax.random.PRNGKey(0)
EMPTY = r"inputs: expected a non-empty batch \(batch size >= 1\), got batch size 0"

# Each attack as `call(logits_fn, inputs, labels)`, with small budgets.
ATTACKS = {
    "pgd": lambda f, x, y: attacks.pgd(f, x, y, KEY, eps=0.5, steps=2),
    "fgm": lambda f, x, y: attacks.fgm(f, x, y, eps=0.5),
    "decoupling": lambda f, x, y: attacks.decoupling(f, x, y, KEY, fraction=0.2, rounds=2,
                                                     steps_per_round=2),
    "drop_modality": lambda f, x, y: attacks.drop_modality(x, "a"),
}


@pytest.fixture(scope="module")
def tiny_model():
  """(model, variables, inputs [6], labels): a concat-head model of two small MLPs at
  its initialisation, labels its own predictions."""
  shapes = {"u": (6,), "v": (3,)}
  model = models.build({"head": "concat", "encoders": {
      "u": {"name": "mlp", "widths": (8,)}, "v": {"name": "mlp", "widths": (5,)}}},
      num_classes=K, input_shapes=shapes)
  rng = np.random.default_rng(0)
  inputs = {m: jnp.asarray(rng.normal(size=(6, *s)), jnp.float32) for m, s in shapes.items()}
  variables = model.init(jax.random.PRNGKey(1), inputs)
  labels = jnp.argmax(model.apply(variables, inputs).logits, -1).astype(jnp.int32)
  return model, variables, inputs, labels


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_reject_non_finite_inputs_naming_the_modality(attack, value):
  x = _inputs(3, batch=4)
  bad = {**x, "b": x["b"].at[2, 1].set(value)}
  with pytest.raises(ValueError, match=r"inputs\['b'\]: expected finite values, got 1 NaN/Inf "
                                       r"entries of 20 \(first in example 2\)"):
    ATTACKS[attack](_nonlinear(K), bad, jnp.zeros(4, jnp.int32))


@pytest.mark.parametrize("label", [10, -1])
@pytest.mark.parametrize("attack", ["pgd", "fgm", "decoupling"])
def test_attacks_reject_labels_out_of_range(attack, label):
  labels = jnp.asarray([0, 1, label, 2], jnp.int32)
  low, high = min(label, 0), max(label, 2)
  with pytest.raises(ValueError, match=rf"labels: expected values in \[0, {K}\), got range "
                                       rf"\[{low}, {high}\]"):
    ATTACKS[attack](_nonlinear(K), _inputs(4, batch=4), labels)


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_reject_an_empty_batch_eagerly_and_under_jit(attack):
  x = _inputs(5, batch=0)
  y = jnp.zeros(0, jnp.int32)
  with pytest.raises(ValueError, match=EMPTY):
    ATTACKS[attack](_nonlinear(K), x, y)
  with pytest.raises(ValueError, match=EMPTY):  # a static check: also when traced
    jax.jit(lambda x, y: ATTACKS[attack](_nonlinear(K), x, y))(x, y)


@pytest.mark.slow
def test_empty_batch_to_apply_and_certify_names_the_batch(tiny_model):
  model, variables, inputs, _ = tiny_model
  empty = {m: x[:0] for m, x in inputs.items()}
  with pytest.raises(ValueError, match=EMPTY):
    model.apply(variables, empty)
  with pytest.raises(ValueError, match=EMPTY):
    certify.certify(model, variables, empty, jnp.zeros(0, jnp.int32))


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["scan", "fori"])
def test_jitted_attacks_count_a_nan_example_as_not_robust(loop):
  logits_fn = _nonlinear(K)
  x = _inputs(6, batch=8)
  labels = jnp.argmax(logits_fn(x), -1).astype(jnp.int32)
  # An example predicted as 0, the argmax of NaN logits: a plain argmax would keep
  # calling it correct once its input is NaN.
  i = int(np.argmax(np.asarray(labels) == 0))
  assert int(labels[i]) == 0
  bad = {**x, "a": x["a"].at[i].set(jnp.nan)}
  pgd = jax.jit(lambda x, y: attacks.pgd(logits_fn, x, y, KEY, eps=0.01, steps=2,
                                         return_info=True, loop=loop)[1]["misclassified"])
  decoupling = jax.jit(lambda x, y: attacks.decoupling(
      logits_fn, x, y, KEY, count=0, max_count=0, return_info=True, loop=loop
  )[1]["misclassified"])
  for attack in (pgd, decoupling):
    clean = np.asarray(attack(x, labels))
    flags = np.asarray(attack(bad, labels))
    assert flags[i] and not clean[i]
    np.testing.assert_array_equal(np.delete(flags, i), np.delete(clean, i))


def test_jitted_certify_on_nan_is_neither_correct_nor_certified(tiny_model):
  model, variables, inputs, labels = tiny_model
  bad = {**inputs, "v": inputs["v"].at[2, 0].set(jnp.nan)}
  labels = labels.at[2].set(0)  # the argmax of NaN logits
  jitted = jax.jit(lambda v, x, y: certify.certify(model, v, x, y))
  cert = jitted(variables, bad, labels)
  reference = certify.certify(model, variables, inputs, labels)
  assert not bool(cert.correct[2]) and not bool(cert.finite[2])
  assert float(cert.radius[2]) == 0.0
  assert all(float(r[2]) == 0.0 for r in cert.per_modality.values())
  keep = np.arange(6) != 2
  np.testing.assert_array_equal(np.asarray(cert.finite)[keep], True)
  np.testing.assert_array_equal(np.asarray(cert.correct)[keep], np.asarray(reference.correct)[keep])
  np.testing.assert_allclose(np.asarray(cert.radius)[keep], np.asarray(reference.radius)[keep],
                             rtol=1e-5)

  summary = certify.summarize(cert, [0.0, 1e-3])
  assert summary["num_non_finite"] == 1 and summary["num_infinite_radius"] == 0
  num_correct = int(np.asarray(reference.correct)[keep].sum())
  assert summary["clean_accuracy"] == pytest.approx(num_correct / 6)
  assert summary["certified_accuracy"][0] == pytest.approx(num_correct / 6)
  assert np.isfinite(summary["mean_radius"])


def test_summarize_counts_a_nan_radius_as_a_failure():
  """A certificate built without `finite` (e.g. by hand): a NaN radius is a failure."""
  cert = certify.Certificate(
      radius=jnp.asarray([jnp.nan, 0.5, jnp.inf]), per_modality={"a": jnp.asarray([0.1, 0.2, 0.3])},
      per_class=jnp.zeros((3, 2)), eta={"a": jnp.zeros((3, 2))},
      correct=jnp.asarray([True, True, True]), margin=jnp.zeros((3, 2)))
  summary = certify.summarize(cert, [0.0, 0.25])
  assert summary["num_non_finite"] == 1 and summary["num_infinite_radius"] == 1
  assert summary["clean_accuracy"] == pytest.approx(2 / 3)
  assert summary["certified_accuracy"] == pytest.approx([2 / 3, 2 / 3])
  assert summary["mean_radius"] == pytest.approx(0.25)  # (0 + 0.5) / 2; inf left out


@pytest.mark.slow
def test_robustness_suite_counts_non_finite_logits_as_failures():
  apply_fn, variables = _model()
  inputs, labels = _data(apply_fn, variables)
  inputs, labels = {m: x[:8].copy() for m, x in inputs.items()}, labels[:8].copy()
  inputs["b"][3, 0] = 100.0  # finite, but the model below gives NaN logits for it
  labels[3] = 0  # the argmax of NaN logits

  def nan_apply(variables, x):
    return jnp.where(x["b"][:, :1] > 50.0, jnp.nan, apply_fn(variables, x))

  config = dict(type="robustness", protocol="fast", multi_eps=(0.5,), uni_eps=(1.0,),
                uni_modalities=(), decoupling_fractions=(0.1,),
                decoupling=dict(rounds=1, steps_per_round=2), batch_size=8, skip_certified=False)
  results = build(nan_apply, inputs, labels, **config).run(variables)
  clean = np.asarray(jnp.argmax(apply_fn(variables, inputs), -1)) == labels
  clean[3] = False
  assert results["num_non_finite"] == 1
  assert results["clean_accuracy"] == pytest.approx(clean.mean())
  for kind in ("fgm", "pgd"):
    assert results["curves"][kind]["multi"]["accuracy"][0] <= clean.mean()
  assert results["missing"]["a"]["zeros"] <= 7 / 8
  with pytest.raises(ValueError, match=r"inputs\['a'\]: expected finite values"):
    bad = {**inputs, "a": np.where(np.arange(8)[:, None, None] == 5, np.nan, inputs["a"])}
    build(nan_apply, bad, labels, **config).run(variables)


# ---------------------------------------------------------------------------
# Issue 34, item 6: NaN box bounds, empty or integer scores.


@pytest.mark.slow
@pytest.mark.parametrize("bounds, message", [
    ({"a": (np.nan, 1.0)}, r"bounds\['a'\].low: expected numbers \(\+-inf for no bound\), got 1 "
                           r"NaN entries"),
    ({"a": (-1.0, np.full((3, 2), np.nan))}, r"bounds\['a'\].high: expected numbers .*got 6 NaN"),
    ({"a": (-np.inf, np.inf)}, None),  # unbounded: fine
    ({"a": (1.0, -np.inf)}, r"bounds\['a'\]: expected low <= high everywhere, got low > high "
                            r"in 1 entries"),
])
def test_attacks_reject_nan_box_bounds(bounds, message):
  x = _inputs(7, batch=4)
  labels = jnp.zeros(4, jnp.int32)
  for attack in (lambda: attacks.pgd(_nonlinear(K), x, labels, KEY, eps=0.5, steps=2,
                                     bounds=bounds),
                 lambda: attacks.fgm(_nonlinear(K), x, labels, eps=0.5, bounds=bounds)):
    if message is None:
      attack()
    else:
      with pytest.raises(ValueError, match=message):
        attack()


def test_radius_from_scores_rejects_an_empty_batch():
  scores = {"a": jnp.zeros((0, K)), "b": jnp.zeros((0, K))}
  eta = {"a": jnp.ones((1, K)), "b": jnp.ones((1, K))}
  with pytest.raises(ValueError, match=r"scores: expected a non-empty batch \(batch size >= 1\), "
                                       r"got batch size 0"):
    certify.radius_from_scores(scores, jnp.zeros(0, jnp.int32), eta)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.bool_])
def test_radius_from_scores_rejects_integer_scores(dtype):
  scores = {"a": jnp.ones((3, K), dtype), "b": jnp.ones((3, K), jnp.float32)}
  eta = {"a": jnp.ones((1, K)), "b": jnp.ones((1, K))}
  with pytest.raises(ValueError, match=rf"scores\['a'\]: expected a floating dtype \(scores, not "
                                       rf"labels\), got {jnp.dtype(dtype).name}"):
    certify.radius_from_scores(scores, jnp.zeros(3, jnp.int32), eta)
