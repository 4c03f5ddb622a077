"""Layers and encoders that state their own Lipschitz bound, against brute force:
the largest singular value of materialised Jacobians (at random points, with
random parameters, not only at initialisation) and secant ratios; 1-Lipschitz
layers also stay within 1 + 1e-5."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmsafe import certify, models
from mmsafe.models import layers as layers_lib
from mmsafe.models import lipschitz_layers as lip
from mmsafe.models import rescaling
from mmsafe.models.operator_norms import BoundOptions
from mmsafe.train.optimizer import make_optimizer


def _perturbed(variables, seed=1, scale=0.5):
  """Variables moved away from their initialisation (random kernels and
  biases; positive batch-norm variances), so bounds are tested off the
  identity-like starting points."""
  rng = np.random.default_rng(seed)

  def move(path, leaf):
    name = str(getattr(path[-1], "key", ""))
    noise = rng.normal(size=leaf.shape).astype(np.float32)
    if name == "var":
      return jnp.asarray(rng.uniform(0.2, 2.0, size=leaf.shape), jnp.float32)
    if name == lip.ORTHOGONAL_KERNEL:
      return leaf  # stays on the manifold (the optimizer keeps it there)
    return leaf + scale * noise * (np.abs(np.asarray(leaf)).mean() + 0.1)

  return jax.tree_util.tree_map_with_path(move, variables)


def _jacobian_norms(layer, variables, x):
  """Largest singular value of the per-example Jacobian at each point of x."""
  fn = lambda v: layer.apply(variables, v[None])[0]
  jac = jax.jit(jax.vmap(jax.jacfwd(fn)))(x)
  matrix = np.asarray(jac, np.float64).reshape(x.shape[0], -1, int(np.prod(x.shape[1:])))
  return np.linalg.svd(matrix, compute_uv=False)[:, 0]


def _secant_ratios(layer, variables, x, y):
  fn = jax.jit(lambda v: layer.apply(variables, v))
  diff = np.asarray(fn(x) - fn(y)).reshape(x.shape[0], -1)
  return np.linalg.norm(diff, axis=1) / np.linalg.norm(np.asarray(x - y).reshape(x.shape[0], -1),
                                                      axis=1)


def _bound(layer, variables, shape):
  bound = lambda v: layer.apply(v, jnp.zeros((1, *shape)), BoundOptions(),
                                method="lipschitz_bound")
  with jax.default_matmul_precision("highest"):
    return float(jax.jit(bound)(variables))


ONE_LIPSCHITZ = {
    "orthogonal_dense_wide": (lip.OrthogonalDense(9), (6,)),
    "orthogonal_dense_narrow": (lip.OrthogonalDense(4), (6,)),
    "aol_dense": (lip.AOLDense(5), (7,)),
    "aol_conv": (lip.AOLConv(3, (3, 3)), (6, 5, 2)),
    "aol_conv_strided": (lip.AOLConv(4, (3, 3), strides=2), (7, 6, 3)),
    "aol_conv_1x1": (lip.AOLConv(2, (1, 1)), (4, 4, 5)),
    "cayley_conv_square": (lip.CayleyConv(3, (3, 3)), (6, 5, 3)),
    "cayley_conv_expand": (lip.CayleyConv(4, (3, 3)), (5, 4, 2)),
    "cayley_conv_reduce": (lip.CayleyConv(2, (3, 3)), (4, 6, 3)),
    "sll_dense": (lip.SLLDense(), (6,)),
    "sll_dense_hidden": (lip.SLLDense(hidden=9), (5,)),
    "sll_conv": (lip.SLLConv((3, 3)), (5, 4, 3)),
    "maxmin": (lip.MaxMin(), (6,)),
    "space_to_depth": (lip.SpaceToDepth(2), (5, 3, 2)),
    "global_norm_pool": (lip.GlobalNormPool(), (3, 4, 2)),
}

FREE = {
    "dense": (layers_lib.Dense(5), (7,)),
    "conv": (layers_lib.Conv(3, (3, 3), strides=(2, 1), padding="SAME"), (6, 5, 2)),
    "conv_bn": (layers_lib.ConvBatchNorm(3, (3, 3), (1, 1), ((1, 1), (1, 1))), (5, 5, 2)),
    "avg_pool": (layers_lib.AvgPool((2, 2), (2, 2), "SAME"), (5, 4, 2)),
    "max_pool": (layers_lib.MaxPool(), (6, 5, 1)),
    "global_mean": (layers_lib.GlobalMeanPool(), (3, 4, 2)),
    "residual_block": (layers_lib.ResidualBlock(3, 1, project=False), (4, 4, 3)),
    "residual_block_projected": (layers_lib.ResidualBlock(4, 2, project=True), (5, 4, 2)),
    "relu": (layers_lib.ReLU(), (5,)),
    "flatten": (layers_lib.Flatten(), (2, 3)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted({**ONE_LIPSCHITZ, **FREE}))
def test_layer_bound_covers_jacobians_and_secants(name):
  layer, shape = {**ONE_LIPSCHITZ, **FREE}[name]
  key = jax.random.PRNGKey(0)
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(1), (6, *shape))
  y = x + 0.3 * jax.random.normal(jax.random.PRNGKey(2), x.shape)
  variables = jax.jit(layer.init)(key, x[:2])
  if variables:
    variables = _perturbed(variables)
  bound = _bound(layer, variables, shape)
  local = _jacobian_norms(layer, variables, x)
  assert local.max() > 0.05, name  # a non-degenerate layer
  assert np.all(local <= bound * (1 + 1e-6)), (name, local.max(), bound)
  assert np.all(_secant_ratios(layer, variables, x, y) <= bound * (1 + 1e-5)), name
  if name in ONE_LIPSCHITZ:
    assert bound <= 1.0 + 1e-5, (name, bound)


@pytest.mark.parametrize("name", ["aol_dense", "aol_conv", "aol_conv_strided",
                                  "cayley_conv_reduce", "cayley_conv_expand"])
def test_linear_one_lipschitz_layers_have_norm_at_most_one(name):
  # For any kernel (not only the initial one): the materialised matrix of the
  # layer (bias removed) has largest singular value <= 1.
  layer, shape = ONE_LIPSCHITZ[name]
  x = jnp.zeros((1, *shape))
  variables = _perturbed(jax.jit(layer.init)(jax.random.PRNGKey(3), x), seed=5, scale=2.0)
  fn = lambda v: (layer.apply(variables, v[None]) - layer.apply(variables, x))[0]
  matrix = np.asarray(jax.jit(jax.jacfwd(fn))(jnp.zeros(shape)), np.float64)
  matrix = matrix.reshape(-1, np.prod(shape))
  sigma = np.linalg.svd(matrix, compute_uv=False)
  assert sigma[0] <= 1.0 + 1e-5 and sigma[0] > 0.1


def test_cayley_convolution_is_orthogonal():
  layer, shape = ONE_LIPSCHITZ["cayley_conv_square"]
  variables = _perturbed(jax.jit(layer.init)(jax.random.PRNGKey(4), jnp.zeros((1, *shape))),
                         seed=2)
  fn = lambda v: (layer.apply(variables, v[None]) - layer.apply(variables, 0 * v[None]))[0]
  matrix = np.asarray(jax.jit(jax.jacfwd(fn))(jnp.zeros(shape)), np.float64)
  matrix = matrix.reshape(-1, np.prod(shape))
  np.testing.assert_allclose(matrix.T @ matrix, np.eye(matrix.shape[1]), atol=2e-5)


def test_aol_rescaling_is_the_identity_on_an_orthogonal_kernel():
  # An orthogonal kernel needs no rescaling: AOL leaves it unchanged (exactly 1).
  layer = lip.AOLDense(4, use_bias=False)
  q = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0].astype(np.float32)
  x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
  out = layer.apply({"params": {"kernel": jnp.asarray(q)}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out), x @ q, atol=1e-5)


@pytest.mark.parametrize("name", ["aol", "sll"])
def test_the_rescaling_is_tight_for_a_nonnegative_kernel(name):
  # For an all-ones kernel |P^T P| = P^T P, whose interior rows all sum to its
  # norm: the Schur sums are exact there, so the layer's norm on a large grid is
  # close to 1 (it is 1 on the infinite domain). Sums that are too small
  # (a shift left out) push it above 1, sums that are too large well below.
  shape = (24, 24, 2)
  if name == "aol":
    layer = lip.AOLConv(2, (3, 3), use_bias=False)
    params = {"kernel": jnp.ones((3, 3, 2, 2))}
  else:  # a large bias keeps every ReLU on: the Jacobian is I - 2 P^T T^-1 P
    layer = lip.SLLConv((3, 3))
    params = {"kernel": jnp.ones((3, 3, 2, 2)), "bias": 1e3 * jnp.ones(2),
              "log_q": jnp.zeros(2)}
  fn = lambda v: layer.apply({"params": params}, v[None])[0]
  matrix = np.asarray(jax.jit(jax.jacfwd(fn))(jnp.zeros(shape)), np.float64)
  sigma = np.linalg.svd(matrix.reshape(-1, np.prod(shape)), compute_uv=False)[0]
  assert 0.97 < sigma <= 1.0 + 1e-5, sigma


ENCODER_SHAPES = {"vec": (7,), "img": (8, 6, 1), "clip": (2, 16, 8, 2)}
LIPSCHITZ_ENCODERS = {
    "lip_mlp_aol": ({"name": "lip_mlp", "widths": (12, 10)}, "vec"),
    "lip_mlp_orthogonal_sll": ({"name": "lip_mlp", "widths": (12, 10), "dense": "orthogonal",
                                "residual_blocks": 1}, "vec"),
    "lip_cnn_aol": ({"name": "lip_cnn", "channels": (4, 6), "features": 12}, "img"),
    "lip_cnn_cayley_sll": ({"name": "lip_cnn", "channels": (4, 6), "features": 12,
                            "conv": "cayley", "residual_blocks": 1}, "img"),
    "lip_resnet": ({"name": "lip_resnet", "stage_sizes": (1, 1), "widths": (4, 8),
                    "features": 12}, "img"),
    "lip_resnet_clip": ({"name": "lip_resnet", "stage_sizes": (1, 1), "widths": (4, 8),
                         "features": 12}, "clip"),
    "lip_resnet_stem4": ({"name": "lip_resnet", "stage_sizes": (1, 1), "widths": (4, 8),
                          "features": 12, "stem_block": 4}, "img"),
}


def _one_encoder_model(encoder, modality, shape, head="orthogonal"):
  config = {"head": head, "encoders": {modality: encoder}}
  return models.build(config, num_classes=5, input_shapes={modality: shape})


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LIPSCHITZ_ENCODERS))
def test_lipschitz_encoders_are_one_lipschitz(name):
  encoder_config, kind = LIPSCHITZ_ENCODERS[name]
  shape = ENCODER_SHAPES[kind]
  model = _one_encoder_model(encoder_config, "x", shape)
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(1), (3, *shape))
  # Jitted: op by op, initialising and bounding an encoder takes 3x longer.
  variables = _perturbed(jax.jit(model.init)(jax.random.PRNGKey(0), {"x": x[:2]}), scale=0.3)
  bounds = jax.jit(lambda v: model.apply(v, method="feature_lipschitz"))(variables)
  bound, layers = jax.jit(lambda p: certify.encoder_lipschitz(model.encoders["x"], p, None,
                                                              shape))(
      variables["params"]["encoders_x"])
  np.testing.assert_allclose(float(bound), float(bounds["x"]), rtol=1e-6)
  frames = shape[0] if kind == "clip" else 1
  assert float(bound) <= (1.0 + 1e-5) / np.sqrt(frames)
  np.testing.assert_allclose(float(bound), np.prod([float(b) for b in layers.values()])
                             / np.sqrt(frames), rtol=1e-5)
  encode = lambda v: model.apply(variables, "x", v, method="encode")
  jac = jax.jit(jax.vmap(jax.jacrev(lambda v: encode(v[None])[0])))(x)
  local = np.linalg.svd(np.asarray(jac, np.float64).reshape(3, jac.shape[1], -1),
                        compute_uv=False)[:, 0]
  assert local.max() > 0.01 and np.all(local <= float(bound) * (1 + 1e-6)), (local, bound)


def test_free_encoders_keep_their_layer_product_bounds():
  # The MLP bound is exactly the product of its kernels' spectral norms (and
  # the rounding margin per layer), as before the layers stated their bounds.
  model = _one_encoder_model({"name": "mlp", "widths": (9, 6)}, "v", (4,), head="concat")
  variables = _perturbed(jax.jit(model.init)(jax.random.PRNGKey(0), {"v": jnp.ones((2, 4))}))
  params = variables["params"]["encoders_v"]
  expected = np.prod([np.linalg.svd(np.asarray(params[f"Dense_{i}"]["kernel"], np.float64),
                                    compute_uv=False)[0] for i in range(2)])
  bound = model.apply(variables, method="feature_lipschitz")["v"]
  np.testing.assert_allclose(float(bound), expected * (1 + certify.ROUNDING_MARGIN) ** 2,
                             rtol=1e-5)


class _PlainDense(nn.Module):
  """A layer that states no Lipschitz bound."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(4)(x)


class _Unbounded(layers_lib.Chain):
  def make_layers(self):
    return [layers_lib.Flatten(), _PlainDense(name="plain_dense")]


def test_a_layer_without_a_bound_is_refused_by_name():
  encoder = _Unbounded()
  variables = encoder.init(jax.random.PRNGKey(0), jnp.ones((1, 3)))
  with pytest.raises(NotImplementedError,
                     match="plain_dense.*_PlainDense.*states no Lipschitz bound"):
    certify.encoder_lipschitz(encoder, variables["params"], None, (3,))


def test_encoder_config_errors_name_the_field():
  with pytest.raises(ValueError, match=r"lip_cnn\.conv: expected one of \['aol', 'cayley'\]"):
    _one_encoder_model({"name": "lip_cnn", "conv": "soc"}, "x", (8, 6, 1)).init(
        jax.random.PRNGKey(0), {"x": jnp.ones((1, 8, 6, 1))})
  with pytest.raises(ValueError, match=r"lip_resnet\.stem_block: expected an integer >= 1, got 0"):
    _one_encoder_model({"name": "lip_resnet", "stem_block": 0}, "x", (8, 6, 1)).init(
        jax.random.PRNGKey(0), {"x": jnp.ones((1, 8, 6, 1))})
  with pytest.raises(ValueError, match="even widths"):
    _one_encoder_model({"name": "lip_mlp", "widths": (7,)}, "x", (5,)).init(
        jax.random.PRNGKey(0), {"x": jnp.ones((1, 5))})
  with pytest.raises(ValueError, match=r"model.encoders\['x'\].lipschitz: not a field"):
    _one_encoder_model({"name": "mlp", "lipschitz": True}, "x", (5,))


@pytest.mark.slow
def test_orthogonal_dense_stays_on_the_stiefel_manifold_under_training():
  model = _one_encoder_model({"name": "lip_mlp", "widths": (12, 6), "dense": "orthogonal"},
                             "x", (8,))
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 8))
  labels = jnp.arange(16) % 5
  params = jax.jit(model.init)(jax.random.PRNGKey(1), {"x": x})["params"]
  tx = make_optimizer({"name": "sgd", "learning_rate": 0.5, "momentum": 0.9,
                       "weight_decay": 1e-3}, 10)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, {"x": x}).logits, labels).mean()
    grads = jax.grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  start = params
  for _ in range(30):
    params, opt_state = step(params, opt_state)
  for i in range(2):
    kernel = np.asarray(params["encoders_x"][f"dense_{i}"][lip.ORTHOGONAL_KERNEL], np.float64)
    moved = np.abs(kernel - np.asarray(start["encoders_x"][f"dense_{i}"][lip.ORTHOGONAL_KERNEL]))
    assert moved.max() > 1e-3  # it trained
    np.testing.assert_allclose(kernel @ kernel.T, np.eye(kernel.shape[0]), atol=1e-5)
  bound = model.apply({"params": params}, method="feature_lipschitz")["x"]
  assert 1.0 - 1e-5 <= float(bound) <= 1.0 + 1e-5


@pytest.mark.slow
def test_cayley_transform_and_its_gradient_match_a_lapack_solve():
  # The elimination without pivoting and the closed-form VJP against
  # `jnp.linalg.solve` (one call here, so no concurrent LAPACK calls).
  rng = np.random.default_rng(0)
  v = (rng.normal(size=(6, 5, 5)) + 1j * rng.normal(size=(6, 5, 5))).astype(np.complex64)
  skew = lambda w: w - jnp.conj(jnp.swapaxes(w, -1, -2))
  reference = lambda a: jnp.linalg.solve(jnp.eye(5) + a, jnp.eye(5) - a)
  q = lip.cayley_transform(skew(v))
  np.testing.assert_allclose(q, reference(skew(v)), atol=2e-6)
  np.testing.assert_allclose(jnp.conj(jnp.swapaxes(q, -1, -2)) @ q, np.eye(5)[None] * np.ones(
      (6, 1, 1)), atol=2e-6)
  x = rng.normal(size=(6, 5)).astype(np.float32)

  def loss(transform, w):
    out = transform(skew(w.astype(jnp.complex64) * (1 + 0.5j)))
    return jnp.sum(jnp.real(jnp.einsum("bij,bj->bi", out, x)) ** 2) + jnp.sum(out[:, 0, 1].imag)

  real = np.real(v).astype(np.float32)
  np.testing.assert_allclose(jax.grad(lambda w: loss(lip.cayley_transform, w))(real),
                             jax.grad(lambda w: loss(reference, w))(real), atol=1e-5)
  # The Schur bound: >= every singular value, exact for orthonormal rows / columns.
  block = np.asarray(q)[:, :3, :]
  sigma = np.linalg.svd(block, compute_uv=False).max()
  np.testing.assert_allclose(float(lip.schur_operator_norm(block)), sigma, rtol=1e-5)
  general = rng.normal(size=(4, 3, 6)).astype(np.float32)
  assert float(lip.schur_operator_norm(general)) >= np.linalg.svd(general,
                                                                  compute_uv=False).max() - 1e-6


@pytest.mark.parametrize("shape", [(3, 3, 4, 5), (1, 1, 6, 3), (3, 2, 2, 7), (2, 4, 3, 3)])
@pytest.mark.parametrize("weighted", [False, True])
def test_autocorrelation_row_sums_are_those_of_the_conv_gram(shape, weighted):
  # Against |P^T P| of the materialised zero-padded convolution on a grid large
  # enough that no shift is cut (interior rows of the Gram): its rows are the
  # autocorrelation's, and their weighted sums are the AOL / SLL sums.
  kh, kw, c_in, c_out = shape
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=shape)
  q = rng.uniform(0.5, 2.0, size=c_in) if weighted else np.ones(c_in)
  height, width = 4 * kh, 4 * kw
  conv = lambda v: jax.lax.conv_general_dilated(
      v[None], jnp.asarray(kernel), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)[0]
  with jax.enable_x64():
    matrix = np.asarray(jax.jacfwd(conv)(jnp.zeros((height, width, c_in)))).reshape(
        height * width * c_out, height * width * c_in)
  gram = np.abs(matrix.T @ matrix).reshape(height, width, c_in, height, width, c_in)
  centre = gram[2 * kh, 2 * kw]  # [C_in, H, W, C_in]: every shift inside the grid
  expected = np.einsum("ihwj,j->i", centre, q) / q
  got = rescaling.autocorrelation_row_sums(jnp.asarray(kernel, jnp.float32),
                                           jnp.asarray(q, jnp.float32) if weighted else None)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)


@pytest.mark.slow
def test_a_folded_batch_norm_without_its_statistics_is_a_clear_error():
  encoder = models.ResNet18(stage_sizes=(1, 1), widths=(2, 4))
  variables = encoder.init(jax.random.PRNGKey(0), jnp.ones((1, 8, 8, 1)))
  with pytest.raises(ValueError, match="stem needs its batch-norm running statistics"):
    certify.encoder_lipschitz(encoder, variables["params"], None, (8, 8, 1))
