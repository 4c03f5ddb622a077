"""Sound means sound (issue 34, items 4 and 6): every option of a convolution is
in its stated bound; `certify` certifies bfloat16 models in float32; radii in
raw input units hold against attacks in raw input space."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import attacks, certify, models
from mmsafe import data as data_lib
from mmsafe.eval import registry
from mmsafe.models.layers import LIPSCHITZ_COLLECTION, Conv
from mmsafe.models.operator_norms import ROUNDING_MARGIN, BoundOptions

K = 4
SHAPES = {"u": (12,), "v": (7,)}

# ---------------------------------------------------------------------------
# Convolutions: dilations and feature groups are part of the linear map bounded.


def _power_iteration_norm(layer: Conv, kernel, shape, steps: int = 1000) -> float:
  """An independent estimate of the norm of the layer's own linear map (its
  `apply` without the bias), from below: power iteration with `jax.vjp`."""
  conv = layer.clone(use_bias=False)
  linear = lambda x: conv.apply({"params": {"kernel": kernel}}, x[None])[0]

  @jax.jit
  def iterate(v):
    _, adjoint = jax.vjp(linear, jnp.zeros(shape))
    step = lambda _, v: (lambda w: w / jnp.linalg.norm(w))(adjoint(linear(v))[0])
    return jnp.linalg.norm(linear(jax.lax.fori_loop(0, steps, step, v)))

  return float(iterate(jax.random.normal(jax.random.PRNGKey(3), shape)))


@pytest.mark.slow
@pytest.mark.parametrize("options, method", [
    (dict(kernel_dilation=2), "exact"),
    (dict(kernel_dilation=2), "power"),
    (dict(kernel_dilation=(3, 1), padding="VALID"), "exact"),
    (dict(kernel_dilation=2, strides=2), "exact"),
    (dict(input_dilation=2, padding=((1, 1), (1, 1))), "exact"),
    (dict(feature_group_count=2), "exact"),
    (dict(feature_group_count=2), "power"),
], ids=["dilated", "dilated-power", "dilated-valid", "dilated-strided", "input-dilated",
        "grouped", "grouped-power"])
def test_conv_bound_covers_dilations_and_groups(options, method):
  shape = (7, 6, 4)
  layer = Conv(features=4, kernel_size=(3, 3), **options)
  example = jnp.zeros((1, *shape))
  with jax.default_matmul_precision("highest"):
    variables = layer.init(jax.random.PRNGKey(0), example)
    bound, _ = layer.apply(variables, example, BoundOptions(method=method, iterations=500),
                           method="lipschitz_bound", mutable=[LIPSCHITZ_COLLECTION])
    estimate = _power_iteration_norm(layer, variables["params"]["kernel"], shape)
  # Sound (never below the norm) and exact up to the stated margins (power: its
  # probabilistic safety factor, 1.05 here).
  slack = (1 + ROUNDING_MARGIN) * (1.0 if method == "exact" else 1.05) + 1e-4
  assert estimate <= float(bound) <= estimate * slack, (float(bound), estimate)


@pytest.mark.parametrize("options, named", [
    (dict(padding="CIRCULAR"), "padding='CIRCULAR'"),
    (dict(padding="REFLECT"), "padding='REFLECT'"),
    (dict(mask=np.ones((3, 3, 4, 4), np.float32)), "mask"),
])
def test_conv_options_without_a_bound_are_refused_by_name(options, named):
  layer = Conv(features=4, kernel_size=(3, 3), name="conv", **options)
  example = jnp.zeros((1, 6, 6, 4))
  variables = layer.init(jax.random.PRNGKey(0), example)
  with pytest.raises(NotImplementedError, match=rf"layer conv \(Conv\) states no bound with "
                                                rf"{named}"):
    layer.apply(variables, example, BoundOptions(), method="lipschitz_bound",
                mutable=[LIPSCHITZ_COLLECTION])


# ---------------------------------------------------------------------------
# bfloat16 models are certified in float32.


def _tiny_models(head: str):
  """(bfloat16 model, the same model in float32, variables, inputs [32], labels)."""
  config = {"head": head, "encoders": {"u": {"name": "mlp", "widths": (32, 16)},
                                       "v": {"name": "mlp", "widths": (16,)}}}
  build = lambda dtype: models.build({**config, "dtype": dtype}, num_classes=K,
                                     input_shapes=SHAPES)
  half, full = build("bfloat16"), build("float32")
  rng = np.random.default_rng(0)
  inputs = {m: jnp.asarray(rng.normal(size=(32, *s)), jnp.float32) for m, s in SHAPES.items()}
  variables = full.init(jax.random.PRNGKey(1), inputs)
  labels = jnp.argmax(full.apply(variables, inputs).logits, -1).astype(jnp.int32)
  return half, full, variables, inputs, labels


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_sound_certificates_of_bfloat16_models_are_float32_certificates(head):
  half, full, variables, inputs, labels = _tiny_models(head)
  half_logits = half.apply(variables, inputs).logits
  full_logits = full.apply(variables, inputs).logits
  assert half_logits.dtype == jnp.float32  # (the head casts; the encoders ran in bfloat16)
  assert float(jnp.max(jnp.abs(half_logits - full_logits))) > 1e-4  # Two functions.
  cert = certify.certify(half, variables, inputs, labels, kind="sound")
  reference = certify.certify(full, variables, inputs, labels, kind="sound")
  jax.tree_util.tree_map(np.testing.assert_array_equal, cert, reference)
  margin = jnp.take_along_axis(full_logits, labels[:, None], axis=1) - full_logits
  np.testing.assert_allclose(cert.margin, margin, rtol=1e-6, atol=1e-6)
  assert models.as_float32(half) is models.as_float32(half)  # Compiled programs are reused.
  assert models.as_float32(full) is full

  # The certified function, attacked inside every radius, joint and per modality.
  logits_fn = lambda x: full.apply(variables, x).logits
  attacked = np.asarray(cert.correct) & (np.asarray(cert.radius) > 0)
  assert attacked.sum() >= 16
  budgets = {None: cert.radius, **{m: cert.per_modality[m] for m in SHAPES}}
  for modality, radius in budgets.items():
    adversarial = attacks.pgd(logits_fn, inputs, labels, jax.random.PRNGKey(2),
                              eps=0.999 * radius, steps=50, restarts=2, loss="margin",
                              modalities=modality)
    broken = np.asarray(jnp.argmax(logits_fn(adversarial), -1) != labels) & attacked
    assert not broken.any(), (modality, np.flatnonzero(broken))


# ---------------------------------------------------------------------------
# Radii in raw input units.


class _Stats:
  def __init__(self, std):
    self.std = np.asarray(std, np.float32)
    self.mean = np.zeros_like(self.std)


def test_raw_input_scales_are_the_smallest_std_of_each_modality():
  scales = certify.input_scales({"a": _Stats([[[0.5, 2.0, 0.25]]]), "b": _Stats(3.0)})
  assert scales == {"a": 0.25, "b": 3.0}
  for bad in ([0.5, 0.0], [np.nan], [-1.0], None):
    with pytest.raises(ValueError, match=r"stats\['a'\].std: expected finite positive stds"):
      certify.input_scales({"a": _Stats(bad) if bad is not None else object()})


@pytest.mark.slow
def test_raw_radii_of_a_linear_model_on_the_smallest_std_feature_are_exact():
  # The margins move only along each modality's smallest-std feature, where the
  # raw-space rule is an equality: the raw radius is the distance, in raw input
  # space, to the nearest decision boundary (computed here from raw-space
  # gradients of the raw-input model, not from the rule), a step of 1.01 r
  # towards it flips every example, and PGD inside 0.999 r flips none.
  rng = np.random.default_rng(4)
  stds = {"a": rng.uniform(0.2, 3.0, 6).astype(np.float32),
          "b": rng.uniform(0.05, 1.0, 5).astype(np.float32)}
  means = {m: rng.normal(size=s.shape).astype(np.float32) for m, s in stds.items()}
  weights = {}
  for m, std in stds.items():
    w = np.zeros((std.size, K), np.float32)
    w[np.argmin(std)] = rng.normal(size=K)
    weights[m] = jnp.asarray(w)
  scores_fn = lambda x: {m: x[m] @ weights[m] for m in x}
  raw = {m: jnp.asarray(means[m] + stds[m] * rng.normal(size=(40, stds[m].size)), jnp.float32)
         for m in stds}
  normalise = lambda r: {m: (r[m] - means[m]) / stds[m] for m in r}
  raw_logits = lambda r: sum(scores_fn(normalise(r)).values())
  labels = jnp.argmax(raw_logits(raw), -1).astype(jnp.int32)
  eta = {m: certify.integration_factors(weights[m])[labels] for m in stds}  # Exact, normalised.
  scales = certify.input_scales({m: _Stats(std) for m, std in stds.items()})
  cert = certify.radius_from_scores(scores_fn(normalise(raw)), labels, eta, kind="sound",
                                    input_scale=scales)
  normalised = certify.radius_from_scores(scores_fn(normalise(raw)), labels, eta, kind="sound")
  assert cert.units == "input" and normalised.units == "normalised"
  for m in stds:
    np.testing.assert_allclose(cert.per_modality[m], scales[m] * normalised.per_modality[m],
                               rtol=1e-5)
  assert np.all(np.asarray(cert.radius) >= min(scales.values()) * np.asarray(
      normalised.radius) * (1 - 1e-6))

  # The nearest boundary in raw space, from the raw-space Jacobian (constant).
  logits = np.asarray(raw_logits(raw))
  jacobian = jax.jacobian(lambda r: raw_logits(r)[0])({m: x[:1] for m, x in raw.items()})
  gradients = np.concatenate([np.asarray(jacobian[m]).reshape(K, -1) for m in sorted(raw)], 1)
  y = np.asarray(labels)
  difference = gradients[y][:, None, :] - gradients[None, :, :]  # [B, K, D]: grad(h_y - h_k)
  distance = (logits[np.arange(40), y][:, None] - logits) / np.maximum(
      np.linalg.norm(difference, axis=-1), 1e-30)
  distance[np.arange(40), y] = np.inf
  nearest = np.argmin(distance, axis=1)
  np.testing.assert_allclose(cert.radius, distance[np.arange(40), nearest], rtol=1e-5)
  direction = -difference[np.arange(40), nearest]
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  sizes = np.cumsum([0] + [raw[m].shape[1] for m in sorted(raw)])
  for factor, flipped in ((0.999, False), (1.01, True)):
    step = factor * np.asarray(cert.radius)[:, None] * direction
    moved = {m: raw[m] + step[:, sizes[i]:sizes[i + 1]] for i, m in enumerate(sorted(raw))}
    assert np.all((np.argmax(raw_logits(moved), -1) != y) == flipped), factor
  adversarial = attacks.pgd(raw_logits, raw, labels, jax.random.PRNGKey(5),
                            eps=0.999 * cert.radius, steps=100, restarts=2, loss="margin")
  assert np.all(np.argmax(raw_logits(adversarial), -1) == y)


def test_certify_in_raw_units_holds_against_attacks_in_raw_space(trained_mfeat):
  model, variables, splits, _ = trained_mfeat["jt"]
  test = splits["test"]
  inputs = {m: jnp.asarray(x[:48]) for m, x in test.inputs.items()}
  labels = jnp.asarray(test.labels[:48])
  mean = {m: jnp.asarray(s.mean) for m, s in test.stats.items()}
  std = {m: jnp.asarray(s.std) for m, s in test.stats.items()}
  raw = {m: inputs[m] * std[m] + mean[m] for m in inputs}
  raw_logits = lambda r: model.apply(variables, {m: (r[m] - mean[m]) / std[m] for m in r}).logits
  scales = certify.input_scales(test.stats)
  for kind, factor, breaks in (("sound", 0.999, False), ("local", 3.0, True)):
    cert = certify.certify(model, variables, inputs, labels, kind, input_scale=scales)
    normalised = certify.certify(model, variables, inputs, labels, kind)
    assert cert.units == "input"
    for m in inputs:
      np.testing.assert_allclose(cert.per_modality[m], scales[m] * normalised.per_modality[m],
                                 rtol=1e-5)
    attacked = np.asarray(cert.correct) & (np.asarray(cert.radius) > 0)
    adversarial = attacks.pgd(raw_logits, raw, labels, jax.random.PRNGKey(6),
                              eps=factor * cert.radius, steps=50, restarts=2, loss="margin")
    broken = np.asarray(jnp.argmax(raw_logits(adversarial), -1) != labels) & attacked
    assert broken.any() == breaks, (kind, factor, int(broken.sum()), int(attacked.sum()))
  with pytest.raises(ValueError, match=r"input_scale: expected modalities \['fou', 'pix'\]"):
    certify.certify(model, variables, inputs, labels, "sound", input_scale={"pix": scales["pix"]})


def test_pgd_skips_no_example_of_a_bfloat16_model_as_certified():
  # Its certificates are of its float32 evaluation, not of the function attacked.
  half, full, variables, inputs, labels = _tiny_models("concat")
  dataset = data_lib.Dataset(name="toy", split="test", inputs=jax.device_get(inputs),
                             labels=np.asarray(labels), num_classes=K, stats={})
  evals = {"pgd": {"type": "pgd", "split": "test", "eps": [0.01], "protocol": "fast"}}
  radii = {dtype: registry.build_evaluators(evals, model=model, splits={"test": dataset})[
      "pgd"].sound_radii(variables) for dtype, model in (("bfloat16", half), ("float32", full))}
  assert radii["bfloat16"] is None and radii["float32"]["multi"].shape == (32,)
