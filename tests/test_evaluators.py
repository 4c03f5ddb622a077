"""Evaluators built from config dicts (`mmsafe.eval.registry`) on a tiny model:
validation at build time (the constructors' keys), agreement with direct
computations, one compilation across runs, and the scalar metrics the training
loop logs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import evals as evals_config
from mmsafe import certify as certify_lib
from mmsafe import data as data_lib
from mmsafe import models
from mmsafe.attacks import PGDProtocol
from mmsafe.eval import certification
from mmsafe.eval import registry

SHAPES = {"a": (6,), "b": (5,)}
K = 3
N = 40  # with batch_size 16: three batches, the last one padded


class Counting:
  """A model whose `apply` counts its calls: one per trace inside `jax.jit`."""

  def __init__(self, model):
    self.model, self.traces = model, 0

  def apply(self, *args, **kwargs):
    self.traces += 1
    return self.model.apply(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.model, name)


@pytest.fixture(scope="module")
def toy():
  """(model, variables, splits): labels are the model's predictions with 20% flipped."""
  encoders = {m: {"name": "mlp", "widths": (8,)} for m in SHAPES}
  model = models.build({"head": "orthogonal", "encoders": encoders}, num_classes=K,
                       input_shapes=SHAPES)
  rng = np.random.default_rng(0)
  example = {m: np.zeros((2, *s), np.float32) for m, s in SHAPES.items()}
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), example)
  splits = {}
  for index, split in enumerate(("train", "validation", "test")):
    inputs = {m: rng.normal(size=(N, *s)).astype(np.float32) for m, s in SHAPES.items()}
    labels = np.array(jnp.argmax(model.apply(variables, inputs).logits, -1), np.int32)
    labels[index::5] = (labels[index::5] + 1) % K
    stats = {m: data_lib.Standardization(np.zeros(s, np.float32),  # input units: x / 2
                                         np.full(s, 0.5, np.float32)) for m, s in SHAPES.items()}
    splits[split] = data_lib.Dataset(name="toy", split=split, inputs=inputs, labels=labels,
                                     num_classes=K, stats=stats)
  return model, variables, splits


def _build(toy, evals, model=None):
  return registry.build_evaluators(evals, model=model or toy[0], splits=toy[2])


FAST = dict(protocol=PGDProtocol(name="test", steps=5, restarts=2, relative_step_size=None,
                                 random_start=False), batch_size=16)


@pytest.mark.slow
@pytest.mark.parametrize("evals, message", [
    ({"x": {"type": "cw"}}, r"evals\.x\.type: expected one of \[.*'pgd'.*\], got 'cw'"),
    ({"x": {"eps": 0.5}}, r"evals\.x\.type: expected one of .* got None"),
    ({"p": {"type": "pgd", "epss": [0.5]}},
     r"evals\.p\.epss: unknown key for type 'pgd'; expected one of \[.*'eps'.*\], got \['epss'\]"),
    ({"p": {"type": "pgd", "scope": "z"}}, r"evals\.p\.scope: expected 'multi', 'uni' or one of"),
    ({"p": {"type": "pgd", "protocol": "strongest"}}, r"evals\.p\.protocol: expected one of"),
    ({"p": {"type": "fgm", "eps": "big"}}, r"evals\.p\.eps: expected a number or a list"),
    ({"c": {"type": "clean", "split": "dev"}},
     r"evals\.c\.split: expected one of \['test', 'train', 'validation'\], got 'dev'"),
    ({"c": {"type": "clean", "every_steps": -1}},
     r"evals\.c\.every_steps: expected an integer >= 0, got -1"),
    ({"c": {"type": "certify", "kinds": ["exact"]}}, r"evals\.c\.kinds: expected a subset"),
    ({"m": {"type": "missing", "fills": ["median"]}}, r"evals\.m\.fills: expected values in"),
    ({"r": {"type": "robustness", "multi_eps": [-1.0]}},
     r"evals\.r\.multi_eps: expected finite values >= 0, got -1.0"),
    ({"r": {"type": "robustness", "uni_modalities": ["z"]}},
     r"evals\.r\.uni_modalities: unknown modality 'z'"),
    ({"d": {"type": "decoupling", "scopes": ["all"]}},
     r"evals\.d\.scopes: expected 'multi' or one of"),
    ({"s": {"type": "sweep", "steps": [0]}}, r"evals\.s\.steps/restarts: expected non-empty"),
    ({"p": {"type": "pgd", "skip_certified": "yes"}},
     r"evals\.p\.skip_certified: expected True or False, got 'yes'"),
    ({"r": {"type": "robustness", "skip_certified": 1}},
     r"evals\.r\.skip_certified: expected True or False, got 1"),
])
def test_build_rejects_bad_configs_naming_the_key(toy, evals, message):
  with pytest.raises(ValueError, match=message):
    _build(toy, evals)


def test_build_reads_the_config_file_and_common_keys(toy):
  assert _build(toy, None) == {}
  config = evals_config.get_config("robustness,certify,sweep").to_dict()
  built = _build(toy, config)
  assert {name: ev.type for name, ev in built.items()} == {
      "robustness": "robustness", "certify": "certify", "sweep": "sweep"}
  assert all(ev.every_steps == 0 and ev.split == "test" for ev in built.values())
  assert built["certify"].batch_size == 100 and built["robustness"].batch_size == 256
  paper = _build(toy, evals_config.get_config("paper").to_dict())["robustness"]
  assert paper.multi_eps == () and paper.decoupling_fractions == ()
  assert paper.attack_evaluators["pgd"].grids == {"multi": (0.5,), "a": (1.0,), "b": (1.0,)}
  pgd = _build(toy, {"pgd_val": {"type": "pgd", "every_steps": 100, "eps": [0.5]}})["pgd_val"]
  assert (pgd.name, pgd.every_steps, pgd.split, pgd.seed) == ("pgd_val", 100, "validation", 0)
  with pytest.raises(ValueError, match=r"evals config: expected names among"):
    evals_config.get_config("robustnes")


def test_clean_accuracy_equals_a_direct_count(toy):
  model, variables, splits = toy
  ev = _build(toy, {"clean": {"type": "clean", "split": "test", "batch_size": 16}})["clean"]
  metrics = ev.run(variables)
  test = splits["test"]
  predicted = np.asarray(jnp.argmax(model.apply(variables, test.inputs).logits, -1))
  assert metrics == {"num_examples": N,
                     "clean_accuracy": pytest.approx(np.mean(predicted == test.labels))}
  assert metrics["clean_accuracy"] == pytest.approx(0.8)


@pytest.mark.slow
def test_attack_grids_headline_and_mean_fill(toy):
  """The PGD grids gain the protocol's budgets and expand "uni"; the suite's
  headline reads them; the "mean" fill is the training split's mean example."""
  model, variables, splits = toy
  test = splits["test"]
  evals = {
      "suite": {"type": "robustness", "split": "test", "multi_eps": [0.25, 2.0],
                "uni_eps": [2.0], "missing_fills": ["mean"], "decoupling_fractions": [],
                **FAST},
      "pgd": {"type": "pgd", "split": "test", "scope": ["multi", "uni"], "eps": [0.25, 2.0],
              "uni_eps": [2.0], **FAST},
      "missing": {"type": "missing", "split": "test", "fills": "mean", "batch_size": 16}}
  metrics = {name: ev.run(variables) for name, ev in _build(toy, evals).items()}
  clean = metrics["suite"]["clean_accuracy"]
  pgd = metrics["pgd"]["accuracy"]
  assert set(pgd) == {"multi@0.25", "multi@0.5", "multi@2", "a@1", "a@2", "b@1", "b@2"}
  assert all(v <= clean for v in pgd.values()) and pgd["multi@2"] < clean
  assert pgd["multi@0.5"] == metrics["suite"]["headline"]["pgd/multi@0.5"]
  means = {m: x.mean(0) for m, x in splits["train"].inputs.items()}
  for m in SHAPES:
    filled = dict(test.inputs, **{m: np.broadcast_to(means[m], test.inputs[m].shape)})
    predicted = np.asarray(jnp.argmax(model.apply(variables, filled).logits, -1))
    expected = np.mean(predicted == test.labels)
    assert metrics["missing"]["accuracy"][m]["mean"] == pytest.approx(expected)
    assert metrics["suite"]["missing"][m]["mean"] == pytest.approx(expected)


@pytest.mark.slow
def test_skipping_certified_examples_changes_no_number(toy):
  """PGD skips the examples whose sound certified radius exceeds eps (they
  cannot be broken there); every number equals the run that attacks them."""
  model, variables, splits = toy
  base = {"type": "pgd", "split": "test", "scope": ["multi", "uni"], "eps": [0.02, 0.25, 2.0],
          "uni_eps": [0.05, 2.0], **FAST}
  built = _build(toy, {"skip": base, "all": {**base, "skip_certified": False}})
  skipping, attacking = built["skip"].run(variables), built["all"].run(variables)
  radii = built["skip"].sound_radii(variables)
  assert built["all"].sound_radii(variables) is None
  cert = certify_lib.certify(model, variables, splits["test"].inputs, splits["test"].labels,
                             kind="sound")
  np.testing.assert_allclose(radii["multi"], cert.radius, rtol=1e-6)
  np.testing.assert_allclose(radii["a"], cert.per_modality["a"], rtol=1e-6)
  assert skipping["accuracy"] == attacking["accuracy"]
  certified = {scope: curve["num_certified"] for scope, curve in skipping["curves"].items()}
  assert certified["multi"][0] > 0 and certified["multi"][-1] == 0  # tiny radii skip some rows
  assert all(curve["num_certified"] is None for curve in attacking["curves"].values())


def _timeless(metrics):
  """`metrics` without the certification's wall-clock times."""
  if "kinds" not in metrics:
    return metrics
  return {**metrics, "kinds": {k: {**e, "seconds": 0} for k, e in metrics["kinds"].items()}}


@pytest.mark.slow
def test_run_compiles_once(toy):
  _, variables, _ = toy
  counting = Counting(toy[0])
  evals = {"pgd": {"type": "pgd", "eps": [0.5, 1.0], "scope": ["multi", "a"], **FAST},
           "missing": {"type": "missing", "fills": ["zeros", "noise"], "batch_size": 16},
           "sweep": {"type": "sweep", "steps": [2, 3], "restarts": [1, 2], "scales": [1.0],
                     "batch_size": 16},
           "certify": {"type": "certify", "kinds": ["local", "sound"], "attack_steps": 3,
                       "batch_size": 16, "power_iterations": 10}}
  built = _build(toy, evals, model=counting)
  other = jax.tree_util.tree_map(lambda x: x + 0.3, variables)
  for ev in built.values():
    first = _timeless(ev.run(variables))
    traces = counting.traces
    second = _timeless(ev.run(other))
    # PGD attacks only the undecided examples, in batches of a few sizes: new
    # variables may need one it has not compiled yet, but never twice.
    if ev.name == "pgd":
      traces = counting.traces
      assert _timeless(ev.run(other)) == second
    assert counting.traces == traces, f"{ev.name}: the second run retraced"
    assert _timeless(ev.run(variables)) == first and second != first, ev.name
    assert counting.traces == traces, f"{ev.name}: a rerun retraced"


@pytest.mark.slow
def test_certify_evaluator_sound_radii_are_never_broken(toy):
  _, variables, splits = toy
  ev = _build(toy, {"cert": {"type": "certify", "split": "test", "kinds": ["local", "sound"],
                             "attack_steps": 20, "attack_restarts": 2, "batch_size": 16,
                             "power_iterations": 50}})["cert"]
  metrics = ev.run(variables)
  sound = metrics["kinds"]["sound"]
  assert metrics["num_examples"] == N and sound["summary"]["clean_accuracy"] == pytest.approx(0.8)
  assert sound["attack"]["attacked"] > 0 and sound["attack"]["broken"] == 0
  radius = {k: np.asarray(c.radius) for k, c in ev.certificates.items()}
  assert np.all(radius["sound"] <= radius["local"] * (1 + 1e-5))
  # In input units (stds 0.5): half the normalised radii; none without stats.
  assert metrics["units"] == "input units (a: raw, b: raw)"
  normalised = certification.Certification(ev.model, kinds=["sound"], attack_steps=0,
                                           power_iterations=50, units="normalised")
  _, plain, _ = normalised(variables, splits["test"])
  np.testing.assert_allclose(radius["sound"], 0.5 * np.asarray(plain["sound"].radius),
                             rtol=1e-4)
  bare = dataclasses.replace(splits["test"], stats={})
  with pytest.raises(ValueError, match=r"dataset.stats: expected the standardisation of every "
                                       r"modality for radii in input units, got none for"):
    ev._certification(variables, bare)
  scalars = registry.scalar_metrics(metrics)
  assert scalars["kinds/sound/attack/broken"] == 0.0
  assert "kinds/sound/summary/mean_radius" in scalars


def test_scalar_metrics_flattens_numbers_only():
  metrics = {"a": 1, "b": {"c": 0.5, "d": [1, 2], "e": {"f": np.float32(2.0)}}, "s": "x",
             "flag": True, "none": None, "n": np.int64(3)}
  assert registry.scalar_metrics(metrics) == {"a": 1.0, "b/c": 0.5, "b/e/f": 2.0, "n": 3.0}


# ------------------------------------------------------------ MSEFM defence

MSEFM_RUN = {"method": "msefm", "method_kwargs": {
    "msefm_sim_weight": 1.0, "msefm_memory_size": 12, "msefm_lasso": 0.05, "msefm_blend": 0.6,
    "msefm_ista_steps": 25}}


@pytest.fixture(scope="module")
def concat_toy(toy):
  """(model, variables, splits): a tiny concat-head model (an MSEFM model's head)."""
  encoders = {m: {"name": "mlp", "widths": (8,)} for m in SHAPES}
  model = models.build({"head": "concat", "encoders": encoders}, num_classes=K,
                       input_shapes=SHAPES)
  example = {m: np.zeros((2, *s), np.float32) for m, s in SHAPES.items()}
  return model, jax.jit(model.init)(jax.random.PRNGKey(1), example), toy[2]


def _numpy_defended_logits(model, variables, inputs, memory_inputs, lasso, steps, blend):
  """ExFMem by hand in float64: ISTA codes over the memory, blend, concat head."""
  out = model.apply(variables, inputs)
  memory = model.apply(variables, memory_inputs).features
  logits = np.asarray(out.head.bias, np.float64)
  for m in SHAPES:
    d, x = np.asarray(memory[m], np.float64), np.asarray(out.features[m], np.float64)
    step = 1.0 / np.linalg.eigvalsh(d.T @ d).max()
    h = np.zeros((x.shape[0], d.shape[0]))
    for _ in range(steps):
      h = h - step * (h @ d - x) @ d.T
      h = np.sign(h) * np.maximum(np.abs(h) - step * lasso, 0.0)
    logits = logits + (blend * h @ d + (1 - blend) * x) @ np.asarray(out.head.kernels[m])
  return logits


@pytest.mark.slow
def test_msefm_defence_is_the_reconstruction_by_hand(concat_toy):
  model, variables, splits = concat_toy
  evals = {"clean": {"type": "clean", "split": "test", "defence": "msefm", "batch_size": 16,
                     "seed": 3},
           "plain": {"type": "clean", "split": "test", "batch_size": 16}}
  built = registry.build_evaluators(evals, model=model, splits=splits, run_config=MSEFM_RUN)
  ev, test = built["clean"], splits["test"]
  rows = np.sort(np.random.default_rng(3).choice(N, 12, replace=False))
  memory_inputs = {m: x[rows] for m, x in splits["train"].inputs.items()}
  expected = _numpy_defended_logits(model, variables, test.inputs, memory_inputs, 0.05, 25, 0.6)
  defended = ev.defence.prepare(variables)
  logits = np.asarray(jax.jit(ev.apply_fn)(defended, test.inputs))
  np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-4)
  plain = np.asarray(model.apply(variables, test.inputs).logits)
  assert np.abs(logits - plain).max() > 1e-2  # the defence changes the classifier
  metrics = ev.run(variables)
  assert metrics["clean_accuracy"] == pytest.approx(np.mean(expected.argmax(-1) == test.labels))
  assert built["plain"].run(variables)["clean_accuracy"] == pytest.approx(
      np.mean(plain.argmax(-1) == test.labels))
  # White box: the attacks' gradient is the defended classifier's, through the ISTA
  # iterations (a directional derivative against central differences).
  x = {m: v[:4] for m, v in test.inputs.items()}
  loss = jax.jit(lambda inputs: jnp.sum(jax.nn.log_softmax(ev.apply_fn(defended, inputs))[:, 0]))
  grads = jax.jit(jax.grad(loss))(x)
  direction = {m: np.random.default_rng(1).normal(size=v.shape).astype(np.float32)
               for m, v in x.items()}
  h = 1e-2
  shifted = lambda s: loss({m: x[m] + s * h * direction[m] for m in x})
  numeric = (shifted(1.0) - shifted(-1.0)) / (2 * h)
  analytic = sum(jnp.vdot(grads[m], direction[m]) for m in x)
  assert abs(float(numeric)) > 1e-3
  np.testing.assert_allclose(analytic, numeric, rtol=2e-2)


@pytest.mark.parametrize("evals, run_config, message", [
    ({"c": {"type": "clean", "defence": "msefm"}}, {"method": "jt", "method_kwargs": {}},
     r"evals\.c\.defence: 'msefm' applies to a model trained with method 'msefm', got method "
     r"'jt'"),
    ({"c": {"type": "clean", "defence": "msefm"}}, None,
     r"evals\.c\.defence: 'msefm' applies to .* got method None"),
    ({"c": {"type": "pgd", "defence": "ExFMem"}}, MSEFM_RUN,
     r"evals\.c\.defence: expected one of \['none', 'msefm'\], got 'ExFMem'"),
    ({"c": {"type": "certify", "defence": "msefm"}}, MSEFM_RUN,
     r"evals\.c\.defence: the certificates are of the undefended model; expected 'none'"),
    ({"c": {"type": "clean", "defence": "msefm"}},
     {"method": "msefm", "method_kwargs": {**MSEFM_RUN["method_kwargs"],
                                           "msefm_memory_size": 1000}},
     r"msefm_memory_size: the test-time memory needs that many training examples, expected "
     r"<= 40, got 1000"),
])
def test_msefm_defence_fails_fast_naming_the_field(concat_toy, evals, run_config, message):
  model, variables, splits = concat_toy
  with pytest.raises(ValueError, match=message):
    registry.build_evaluators(evals, model=model, splits=splits,
                                run_config=run_config)["c"].run(variables)
