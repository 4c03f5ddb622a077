"""Multi-modal transformer (CRMT Sec. 4.3): outputs, head formulas, cross-modal
mixing, jit, a CRMT step-1 update, the build/config path, clear errors.

Tiny dimensions throughout. XLA compilation dominates on a 2-core CPU, so most
tests fill the parameters from numpy (shapes from `jax.eval_shape(model.init)`)
instead of compiling `model.init` (its tracing is covered by `jax.eval_shape`),
and programs are kept identical across tests (same shapes) so that the
session's persistent compilation cache (conftest.py) compiles each once.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import mmt
from mmsafe import certify, methods, models
from mmsafe.models import transformer
from mmsafe.models.heads import is_stiefel_leaf
from mmsafe.train import TrainState, make_optimizer, make_train_step
from mmsafe.train import experiment

SHAPES = {"image": (8, 6, 1), "vector": (20,), "clip": (2, 8, 8, 2)}
PATCHES = {"image": (4, 3), "vector": 8, "clip": 4}
NUM_CLASSES = 5
WIDTH = 16


def _model(head, modalities, depth_crossmodal=1):
  shapes = {m: SHAPES[m] for m in modalities}
  return models.build(
      {"head": head, "architecture": "transformer",
       "transformer": {"width": WIDTH, "depth_unimodal": 1, "depth_crossmodal": depth_crossmodal,
                       "heads": 2, "mlp_dim": 32,
                       "patch_sizes": {m: PATCHES[m] for m in modalities}}},
      num_classes=NUM_CLASSES, input_shapes=shapes)


def _inputs(modalities, batch=3, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(modalities))
  return {m: jax.random.normal(k, (batch, *SHAPES[m])) for k, m in zip(keys, sorted(modalities))}


def _numpy_variables(model, inputs, seed=0):
  """Random parameters of the right shapes without compiling `model.init`:
  W~ with orthonormal rows, LayerNorm scales near 1, the rest N(0, 0.3^2)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), inputs)

  def fill(path, leaf):
    if is_stiefel_leaf(path, leaf):
      q, _ = np.linalg.qr(rng.normal(size=leaf.shape[::-1]))
      return jnp.asarray(q.T, jnp.float32)
    if getattr(path[-1], "key", None) == "scale":
      return jnp.asarray(1.0 + 0.1 * rng.normal(size=leaf.shape), jnp.float32)
    return jnp.asarray(0.3 * rng.normal(size=leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def _cached_setup(head, modalities, depth_crossmodal):
  model = _model(head, modalities, depth_crossmodal)
  x = _inputs(modalities)
  return model, _numpy_variables(model, x), x


def _setup(head, modalities, depth_crossmodal=1):
  return _cached_setup(head, tuple(modalities), depth_crossmodal)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
@pytest.mark.parametrize("modalities", [("image", "vector"), ("clip", "image", "vector")])
def test_output_shapes_and_head_formula_on_class_tokens(head, modalities):
  model, variables, x = _setup(head, modalities)
  out = jax.jit(model.apply)(variables, x)
  assert isinstance(out, models.ModelOutput)
  assert out.modalities == tuple(sorted(modalities)) and out.logits.shape == (3, NUM_CLASSES)
  assert out.head.kind == head
  for m in modalities:
    assert out.features[m].shape == (3, WIDTH) and out.features[m].dtype == jnp.float32
    assert out.scores[m].shape == (3, NUM_CLASSES)
    assert out.head.kernels[m].shape == (WIDTH, NUM_CLASSES)
    np.testing.assert_allclose(out.scores[m], out.features[m] @ out.head.kernels[m],
                               rtol=1e-5, atol=1e-5)
  order = sorted(modalities)
  if head == "concat":
    # Concatenate the class tokens, project linearly: one [sum d_m, K] matrix.
    stacked = jnp.concatenate([out.features[m] for m in order], axis=-1)
    kernel = jnp.concatenate([out.head.kernels[m] for m in order], axis=0)
    expected = stacked @ kernel + out.head.bias
    assert out.head.weights == {}
  else:
    expected = sum(out.head.weights[m] * (out.features[m] @ out.head.kernels[m])
                   for m in order) + out.head.bias
  np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-5)
  # Every modality's tokenizer has a class token and one embedding per patch token.
  for m in modalities:
    params = variables["params"][f"tokenizer_{m}"]
    patch = transformer.normalize_patch_size(SHAPES[m], PATCHES[m])
    assert params["cls"].shape == (1, 1, WIDTH)
    assert params["pos_embedding"].shape == (
        transformer.num_tokens(SHAPES[m][-3:] if m == "clip" else SHAPES[m], patch), WIDTH)
  assert variables["params"]["tokenizer_image"]["pos_embedding"].shape[0] == 4  # 2 x 2 patches.
  assert variables["params"]["tokenizer_vector"]["pos_embedding"].shape[0] == 3  # 20 -> 24.
  if "clip" in modalities:
    assert variables["params"]["tokenizer_clip"]["time_embedding"].shape == (2, WIDTH)


@pytest.mark.parametrize("depth_crossmodal", [1, 0])
def test_cross_modal_attention_mixes_modalities(depth_crossmodal):
  model, variables, x = _setup("concat", ("image", "vector"), depth_crossmodal)
  # Row 1 equals row 0 except for its image (batch 3 like the other tests).
  pair = {"image": x["image"], "vector": x["vector"].at[1].set(x["vector"][0])}
  out = jax.jit(model.apply)(variables, pair)
  assert float(jnp.abs(out.features["image"][0] - out.features["image"][1]).max()) > 1e-3
  vector_change = float(jnp.abs(out.features["vector"][0] - out.features["vector"][1]).max())
  if depth_crossmodal:
    assert vector_change > 1e-3  # phi^(vector) depends on the image.
  else:
    assert vector_change < 1e-6  # Independent uni-modal streams.


def test_jit_and_no_per_modality_encoder():
  model, variables, x = _setup("orthogonal", ("image", "vector"))
  apply = jax.jit(model.apply)
  out = apply(variables, x)
  assert np.isfinite(np.asarray(out.logits)).all()
  np.testing.assert_array_equal(apply(variables, x).logits, out.logits)  # Cached program.
  # Inputs are checked at trace time, naming the modality.
  with pytest.raises(ValueError, match=r"inputs\['image'\]: expected shape \[B, 8, 6, 1\]"):
    apply(variables, {**x, "image": jnp.zeros((3, 8, 7, 1))})
  # phi^(m) depends on every modality: no `encode`, no sound per-modality bound.
  assert not hasattr(model, "encode") and not hasattr(model, "encoders")
  with pytest.raises(NotImplementedError, match="cross-modal attention blocks"):
    certify.sound_constants(model, variables)
  with pytest.raises(NotImplementedError, match="cross-modal attention blocks"):
    certify.certify(model, variables, x, jnp.zeros(3, jnp.int32), kind="sound")


@pytest.mark.slow
def test_crmt_step1_gradient_step_keeps_w_tilde_orthonormal():
  modalities = ("image", "vector")
  model, variables, x = _setup("orthogonal", modalities)
  method = methods.get("crmt_step1")
  objective = method(model, {"rho": 2.0, "l1_floor": 1e-5})
  optimizer = make_optimizer({"learning_rate": 0.01, "momentum": 0.9}, 10)
  state = TrainState.create(variables, optimizer, jax.random.PRNGKey(2),
                            method.init_state(model, variables) if method.init_state else None)
  step = jax.jit(make_train_step(objective, optimizer))
  batch = {"inputs": x, "label": jnp.array([0, 1, 4], jnp.int32)}
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert int(new_state.step) == 1
  for m, w in new_state.params["head"]["w_tilde"].items():
    assert float(jnp.abs(w - state.params["head"]["w_tilde"][m]).max()) > 0, m
    np.testing.assert_allclose(w @ w.T, np.eye(NUM_CLASSES), atol=1e-5, err_msg=m)
  # Encoder-side parameters (tokenizers, attention blocks) got gradients too.
  for name in ("tokenizer_image", "unimodal_vector_0", "crossmodal_0"):
    before = jax.tree_util.tree_leaves(state.params[name])
    after = jax.tree_util.tree_leaves(new_state.params[name])
    assert any(float(jnp.abs(a - b).max()) > 0 for a, b in zip(after, before)), name


def test_config_builds_the_transformer_through_the_training_loop():
  config = mmt.get_config("crmt_step1,runlocal")
  assert config.method == "crmt_step1" and config.dataset == "av_digits"
  assert config.model.architecture == "transformer"
  assert mmt.get_config("jt").method == "jt"
  shapes = {"audio": (100, 40, 1), "visual": (16, 15, 1)}
  train = types.SimpleNamespace(inputs=dict.fromkeys(shapes), num_classes=10,
                                modality_shapes=shapes)
  model = experiment.build_model(config, methods.get(config.method), train)
  assert isinstance(model, models.MultiModalTransformer)
  assert (model.width, model.depth_unimodal, model.depth_crossmodal, model.heads) == (64, 2, 2, 4)
  x = {m: jnp.zeros((2, *s)) for m, s in shapes.items()}
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)  # Traces, no compile.
  params = variables["params"]
  assert params["tokenizer_audio"]["pos_embedding"].shape == (50, 64)
  assert params["tokenizer_visual"]["pos_embedding"].shape == (12, 64)
  assert set(params["head"]["w_tilde"]) == {"audio", "visual"}
  out = jax.eval_shape(model.apply, variables, x)
  assert out.features["audio"].shape == (2, 64) and out.logits.shape == (2, 10)
  with pytest.raises(ValueError, match="config arg"):
    mmt.get_config("crmt")


@pytest.mark.parametrize("field, value, message", [
    ("architecture", "rnn", r"model.architecture: expected one of \['encoders', 'transformer'\]"),
    ("transformer", {"depth": 2}, r"unknown field\(s\) \['depth'\]"),
    ("transformer", {"width": 10, "heads": 4}, "heads=4 must divide width=10"),
    ("transformer", {"depth_crossmodal": -1}, "depth_crossmodal: expected an int >= 0"),
    ("transformer", {"patch_sizes": {"audio": 4}}, r"unknown modality \['audio'\]"),
    ("transformer", {"patch_sizes": {"image": (4, 0)}}, r"patch_sizes\['image'\]"),
    ("transformer", {"patch_sizes": {"vector": (4, 4)}}, r"patch_sizes\['vector'\]"),
])
def test_bad_transformer_configs_fail_fast(field, value, message):
  config = {"head": "concat", "architecture": "transformer", field: value}
  with pytest.raises(ValueError, match=message):
    models.build(config, num_classes=NUM_CLASSES,
                 input_shapes={"image": SHAPES["image"], "vector": SHAPES["vector"]})


@pytest.mark.slow
def test_default_architecture_is_unchanged():
  # No `architecture` key builds the per-modality encoders: the same parameters
  # and the same logits as `architecture="encoders"`, no tokenizer.
  config = {"head": "concat", "encoders": {"vector": {"name": "mlp", "widths": (8,)},
                                           "image": {"name": "mlp", "widths": (8,)}}}
  shapes = {"image": SHAPES["image"], "vector": SHAPES["vector"]}
  default, explicit = (models.build(c, num_classes=NUM_CLASSES, input_shapes=shapes)
                       for c in (config, {**config, "architecture": "encoders"}))
  x = _inputs(("image", "vector"))
  variables = default.init(jax.random.PRNGKey(0), x)
  assert sorted(variables["params"]) == ["encoders_image", "encoders_vector", "head"]
  assert (jax.tree_util.tree_structure(variables) ==
          jax.tree_util.tree_structure(explicit.init(jax.random.PRNGKey(0), x)))
  np.testing.assert_array_equal(default.apply(variables, x).logits,
                                explicit.apply(variables, x).logits)
