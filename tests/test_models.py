"""Models: ModelOutput shapes/formulas for 2 and 3 modalities, encoders, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import models

SHAPES3 = {"image": (16, 15, 1), "vector": (76,), "clip": (2, 8, 8, 3)}
ENCODERS3 = {"image": {"name": "cnn", "channels": (4, 8), "features": 16},
             "vector": {"name": "mlp", "widths": (32, 16)},
             "clip": {"name": "resnet18", "widths": (4, 8, 8, 16)}}


def _inputs(shapes, batch=3, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {m: jax.random.normal(k, (batch, *s)) for k, (m, s) in zip(keys, sorted(shapes.items()))}


def _model(head, modalities, num_classes=10):
  shapes = {m: SHAPES3[m] for m in modalities}
  return models.build({"head": head, "encoders": {m: ENCODERS3[m] for m in modalities}},
                      num_classes=num_classes, input_shapes=shapes), shapes


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
@pytest.mark.parametrize("modalities", [("image", "vector"), ("image", "vector", "clip")])
def test_output_shapes_and_fusion_formula(head, modalities):
  model, shapes = _model(head, modalities)
  x = _inputs(shapes)
  variables = model.init(jax.random.PRNGKey(1), x)
  out = jax.jit(model.apply)(variables, x)
  assert out.modalities == tuple(sorted(modalities))
  assert out.logits.shape == (3, 10)
  for m in modalities:
    d = out.features[m].shape[-1]
    assert out.features[m].shape == (3, d) and out.scores[m].shape == (3, 10)
    assert out.head.kernels[m].shape == (d, 10)
    # Scores are the features times the head kernel (W phi or W~ phi).
    np.testing.assert_allclose(out.scores[m], out.features[m] @ out.head.kernels[m],
                               rtol=1e-5, atol=1e-5)
  if head == "concat":
    expected = sum(out.scores[m] for m in modalities) + out.head.bias
    assert out.head.weights == {}
  else:
    expected = sum(out.head.weights[m] * out.scores[m] for m in modalities) + out.head.bias
    for m in modalities:
      np.testing.assert_allclose(out.head.weights[m], 0.1)
  np.testing.assert_allclose(out.logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_orthogonal_head_has_orthonormal_rows():
  model, shapes = _model("orthogonal", ("image", "vector", "clip"))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), _inputs(shapes))
  for m, w in variables["params"]["head"]["w_tilde"].items():
    assert w.shape[0] == 10
    np.testing.assert_allclose(w @ w.T, np.eye(10), atol=1e-5, err_msg=m)


def test_orthogonal_head_rejects_too_small_features():
  model = models.build({"head": "orthogonal", "encoders": {
      "a": {"name": "mlp", "widths": (8,)}, "b": {"name": "mlp", "widths": (32,)}}},
      num_classes=10, input_shapes={"a": (5,), "b": (5,)})
  with pytest.raises(ValueError, match=r"'a'.*dimension 8.*K = 10"):
    model.init(jax.random.PRNGKey(0), {"a": jnp.ones((2, 5)), "b": jnp.ones((2, 5))})


@pytest.mark.slow
def test_clip_features_are_the_mean_of_frame_features():
  encoder = models.ResNet18(widths=(4, 8, 8, 16))
  clip = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 16, 16, 3))
  variables = encoder.init(jax.random.PRNGKey(1), clip)
  per_clip = encoder.apply(variables, clip)
  per_frame = jnp.stack([encoder.apply(variables, clip[:, t]) for t in range(3)], 1)
  np.testing.assert_allclose(per_clip, per_frame.mean(1), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_resnet18_accepts_any_channel_count(channels):
  encoder = models.ResNet18(widths=(4, 8, 8, 16))
  x = jnp.ones((2, 32, 32, channels))
  variables = encoder.init(jax.random.PRNGKey(0), x)
  assert encoder.apply(variables, x).shape == (2, 16)
  assert variables["params"]["stem"]["conv"]["kernel"].shape == (7, 7, channels, 4)


def test_bfloat16_encoders_keep_a_float32_head():
  model = models.build({"head": "orthogonal", "dtype": "bfloat16", "encoders": {
      m: ENCODERS3[m] for m in ("image", "vector")}}, num_classes=10,
      input_shapes={m: SHAPES3[m] for m in ("image", "vector")})
  x = _inputs({m: SHAPES3[m] for m in ("image", "vector")})
  out = jax.jit(model.apply)(jax.jit(model.init)(jax.random.PRNGKey(0), x), x)
  assert out.logits.dtype == jnp.float32
  assert all(s.dtype == jnp.float32 for s in out.scores.values())


@pytest.mark.parametrize("bad, message", [
    (lambda x: {"image": x["image"]}, r"missing modality \['vector'\]"),
    (lambda x: {**x, "audio": x["image"]}, r"unexpected modality \['audio'\]"),
    (lambda x: {**x, "vector": x["vector"][:, :70]},
     r"inputs\['vector'\]: expected shape \[B, 76\], got \[3, 70\]"),
    (lambda x: {**x, "vector": x["vector"].astype(jnp.int32)},
     r"inputs\['vector'\]: expected a floating dtype, got int32"),
    (lambda x: {**x, "vector": x["vector"][:2]}, r"disagree on the batch size"),
])
def test_bad_inputs_fail_fast_naming_the_modality(bad, message):
  model, shapes = _model("concat", ("image", "vector"))
  x = _inputs(shapes)
  variables = model.init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match=message):
    model.apply(variables, bad(x))


@pytest.mark.parametrize("config, message", [
    ({"head": "linear"}, r"model.head: expected one of \['concat', 'orthogonal'\], got 'linear'"),
    ({"dtype": "float16"}, r"model.dtype"),
    ({"encoders": {"image": {"name": "vit"}, "vector": {"name": "mlp"}}},
     r"model.encoders\['image'\].name: expected one of .*got 'vit'"),
    ({"encoders": {"image": {"name": "cnn"}}}, r"no encoder configured for modality 'vector'"),
    ({"encoders": {"image": {"name": "cnn"}, "vector": {"name": "mlp"}, "depth": {"name": "mlp"}}},
     r"unknown modality \['depth'\]"),
])
def test_bad_model_configs_fail_fast(config, message):
  base = {"head": "concat", "encoders": {m: ENCODERS3[m] for m in ("image", "vector")}}
  with pytest.raises(ValueError, match=message):
    models.build({**base, **config}, num_classes=10,
                 input_shapes={m: SHAPES3[m] for m in ("image", "vector")})


@pytest.mark.slow
@pytest.mark.parametrize("encoder,shape", [("cnn", (6, 5, 1)), ("mlp", (7,))])
def test_kept_indicator_tells_dropped_entries_from_kept_ones(encoder, shape):
  """With `kept_indicator` the encoder sees `[x, 1{x != 0}]`: its first layer
  has twice the input channels, and an entry moved from 0 (dropped) to a tiny
  value changes the features by the indicator's weight, not by ~the value; it
  states no Lipschitz bound (the indicator jumps)."""
  config = {"encoders": {"v": {"name": encoder, "kept_indicator": True}, "w": {"name": "mlp"}},
            "num_classes": 3, "input_shapes": {"v": shape, "w": (2,)}}
  model = models.build(config)
  x = {"v": jnp.zeros((1,) + shape), "w": jnp.ones((1, 2))}
  variables = model.init(jax.random.PRNGKey(0), x)
  first = variables["params"]["encoders_v"]["Conv_0" if encoder == "cnn" else "Dense_0"]
  assert first["kernel"].shape[-2] == 2 * shape[-1]
  tiny = {"v": x["v"].at[(0,) * (len(shape) + 1)].set(1e-6), "w": x["w"]}
  features = lambda v: np.asarray(model.apply(variables, v).features["v"])
  jump = np.abs(features(tiny) - features(x)).max()
  assert jump > 1e-3, jump  # the indicator flipped; the value alone would move ~1e-6
  with pytest.raises(NotImplementedError, match="KeptIndicator"):
    model.apply(variables, method="feature_lipschitz")
