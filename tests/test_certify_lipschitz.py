"""Lipschitz constants: local (jacfwd/jacrev vs finite differences), empirical,
sound (operator norms vs exact SVDs, pooling vs brute force, sound >= local)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import certify, models
from mmsafe.certify import local

K = 5
SHAPES = {"img": (6, 5, 1), "vec": (7,), "vec2": (4,), "clip": (2, 40, 8, 2)}
ENCODERS = {"img": {"name": "cnn", "channels": (3, 4), "features": 12},
            "vec": {"name": "mlp", "widths": (12, 11)},
            "vec2": {"name": "mlp", "widths": (9, 6)}}


def _inputs(shapes, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  return {m: jnp.asarray(rng.normal(size=(batch, *s)), jnp.float32)
          for m, s in sorted(shapes.items())}


def random_variables(init_fn, *args, seed=0):
  """Variables with the structure of `init_fn(*args)` filled by numpy (no compile):
  kernels N(0, 1/fan_in), biases N(0, 0.1^2), non-trivial eval-mode batch-norm
  (random scales of both signs, means, variances), orthonormal-row `w_tilde`
  and per-class weights `a` of both signs."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(init_fn, *args)

  def fill(path, leaf):
    names = [str(getattr(p, "key", "")) for p in path]
    shape = leaf.shape
    if "w_tilde" in names:
      q, _ = np.linalg.qr(rng.normal(size=(shape[1], shape[0])))
      return jnp.asarray(q.T, jnp.float32)
    if names[-2:-1] == ["a"] or (len(names) >= 2 and names[-2] == "a"):
      return jnp.asarray(np.linspace(-0.7, 1.3, shape[0]) + 0.1 * rng.normal(size=shape),
                         jnp.float32)
    if names[-1] == "var":
      value = rng.uniform(0.2, 2.0, size=shape)
    elif names[-1] == "mean":
      value = rng.normal(size=shape)
    elif names[-1] == "scale":
      value = rng.normal(size=shape) * 1.5
    elif names[-1] == "bias":
      value = 0.1 * rng.normal(size=shape)
    else:  # kernels
      value = rng.normal(size=shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny_models():
  """{head: (model, variables, inputs)}: concat on (img, vec), orthogonal on (img, vec, vec2)."""
  out = {}
  for head, modalities in (("concat", ("img", "vec")), ("orthogonal", ("img", "vec", "vec2"))):
    shapes = {m: SHAPES[m] for m in modalities}
    model = models.build({"head": head, "encoders": {m: ENCODERS[m] for m in modalities}},
                         num_classes=K, input_shapes=shapes)
    x = _inputs(shapes)
    out[head] = (model, random_variables(model.init, jax.random.PRNGKey(0), x, seed=1), x)
  return out


@pytest.fixture(scope="module")
def resnet():
  """(encoder, variables, clip inputs [3, 2, 40, 8, 2]) with non-trivial batch-norm; the
  last stage's feature map is 2x1, so the global mean pools two positions."""
  encoder = models.ResNet18(stage_sizes=(1, 1, 1, 1), widths=(2, 4, 4, 6))
  x = _inputs({"clip": SHAPES["clip"]}, seed=2)["clip"]
  return encoder, random_variables(encoder.init, jax.random.PRNGKey(0), x, seed=3), x


def _scores_fn(model, variables, modality):
  return lambda inputs: model.apply(variables, inputs).scores[modality]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_jacfwd_and_jacrev_agree(tiny_models, head):
  model, variables, x = tiny_models[head]
  kernels = model.apply(variables, x).head.kernels
  for m in sorted(x):
    fn = certify.model_score_fn(model, variables, m, kernels[m])
    fwd = certify.jacobian_norms(fn, x, m, "jacfwd")
    rev = certify.jacobian_norms(fn, x, m, "jacrev")
    for a, b in zip(fwd, rev):
      scale = float(np.max(np.abs(b)))
      assert scale > 0
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale, err_msg=m)


def _finite_difference_jacobian(fn, x, modality, h=1e-3):
  """[B, K, D] central differences of `fn(inputs)` ([B, K]) w.r.t. inputs[modality]."""
  xm = np.asarray(x[modality], np.float32)
  d = int(np.prod(xm.shape[1:]))
  cols = []
  for i in range(d):  # one input direction at a time: an independent brute force
    e = np.zeros((d,), np.float32)
    e[i] = h
    e = e.reshape(xm.shape[1:])
    up = np.asarray(fn({**x, modality: xm + e}), np.float64)
    down = np.asarray(fn({**x, modality: xm - e}), np.float64)
    cols.append((up - down) / (2 * h))
  return np.stack(cols, axis=-1)  # [B, K, D]


@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_local_lipschitz_matches_finite_differences(tiny_models, head):
  model, variables, x = tiny_models[head]
  labels = jnp.array([0, 3, 4])
  out = model.apply(variables, x)
  for m in ("img", "vec"):
    fn = jax.jit(_scores_fn(model, variables, m))
    jac = _finite_difference_jacobian(fn, x, m)
    kernel = np.asarray(out.head.kernels[m], np.float64)
    norms, pairs = certify.jacobian_norms(fn, x, m)
    margins_tau = certify.local_lipschitz(fn, x, m, labels=labels, kernel=out.head.kernels[m])
    for b in range(3):
      y = int(labels[b])
      for k in range(K):
        np.testing.assert_allclose(norms[b, k], np.linalg.norm(jac[b, k]), rtol=2e-3)
        if k == y:
          assert margins_tau[b, k] == 0 and pairs[b, y, k] == 0
          continue
        grad = jac[b, y] - jac[b, k]  # gradient of s_y - s_k
        c = np.linalg.norm(kernel[:, y] - kernel[:, k])
        np.testing.assert_allclose(pairs[b, y, k], np.linalg.norm(grad), rtol=2e-3)
        np.testing.assert_allclose(pairs[b, k, y], np.linalg.norm(grad), rtol=2e-3)
        np.testing.assert_allclose(margins_tau[b, k], np.linalg.norm(grad) / c, rtol=2e-3)


def test_local_lipschitz_rejects_bad_arguments(tiny_models):
  model, variables, x = tiny_models["concat"]
  fn = _scores_fn(model, variables, "vec")
  with pytest.raises(ValueError, match="mode"):
    certify.local_lipschitz(fn, x, "vec", mode="jacobi")
  with pytest.raises(ValueError, match="modality"):
    certify.local_lipschitz(fn, x, "audio")
  with pytest.raises(ValueError, match="labels"):
    certify.local_lipschitz(fn, x, "vec", labels=jnp.zeros((2,), jnp.int32))


def _dense_matrix(linear_fn, in_shape):
  jac = jax.jacobian(linear_fn)(jnp.zeros(in_shape, jnp.float32))
  n = int(np.prod(in_shape))
  return np.asarray(jac, np.float64).reshape(-1, n)


CONVS = [  # in_shape, kernel_shape, strides, padding
    ((7, 6, 2), (3, 3, 2, 3), (2, 2), ((1, 1), (1, 1))),
    ((9, 9, 1), (7, 7, 1, 2), (2, 2), ((3, 3), (3, 3))),
]


@pytest.mark.slow
@pytest.mark.parametrize("in_shape,kernel_shape,strides,padding", CONVS)
def test_conv_operator_norm_vs_exact_svd(in_shape, kernel_shape, strides, padding):
  key = jax.random.PRNGKey(sum(kernel_shape))
  kernel = jax.random.normal(key, kernel_shape)
  scale = jax.random.normal(jax.random.fold_in(key, 1), (kernel_shape[-1],))
  conv = nn.Conv(kernel_shape[-1], kernel_shape[:2], strides=strides, padding=padding,
                 use_bias=False)
  matrix = _dense_matrix(lambda v: conv.apply({"params": {"kernel": kernel}}, v[None])[0] * scale,
                         in_shape)
  exact = np.linalg.svd(matrix, compute_uv=False)[0]
  kwargs = dict(in_shape=in_shape, strides=strides, padding=padding)
  iterations = 100
  power = float(certify.conv_operator_norm(kernel, scale, key, method="power",
                                           iterations=iterations, **kwargs))
  factor = certify.power_iteration_factor(int(np.prod(in_shape)), iterations, 1e-6)
  assert exact <= power <= exact * factor * (1 + certify.ROUNDING_MARGIN) * (1 + 1e-5)
  if in_shape == CONVS[0][0]:
    by_svd = float(certify.conv_operator_norm(kernel, scale, key, method="exact", **kwargs))
    np.testing.assert_allclose(by_svd, exact * (1 + certify.ROUNDING_MARGIN), rtol=1e-5)


def test_power_iteration_bound_holds_where_the_estimate_falls_short():
  # A slowly decaying spectrum: 30 power steps underestimate the top singular
  # value; the probabilistic factor must still give an upper bound.
  n, iterations = 2000, 30
  spectrum = jnp.linspace(1.0, 0.5, n)
  factor = certify.power_iteration_factor(n, iterations, 1e-6) * (
      1 + certify.ROUNDING_MARGIN)
  bounds = np.array([float(certify.operator_norm(
      lambda v: v * spectrum, (n,), key=jax.random.PRNGKey(seed), method="power",
      iterations=iterations)) for seed in range(5)])
  assert np.all(bounds >= 1.0)
  assert np.all(bounds / factor < 0.999), "the raw estimates should fall short here"


def _avg_pool_matrix(h, w):
  """Flax SAME 2x2/2 average pooling of one channel, built by hand (padding at the
  end of each axis, divisor 4 including the padded cells)."""
  oh, ow = -(-h // 2), -(-w // 2)
  matrix = np.zeros((oh * ow, h * w))
  for i in range(oh):
    for j in range(ow):
      for di in range(2):
        for dj in range(2):
          r, c = 2 * i + di, 2 * j + dj
          if r < h and c < w:
            matrix[i * ow + j, r * w + c] = 0.25
  return matrix


@pytest.mark.parametrize("hw", [(7, 5)])
def test_avg_pool_operator_norm_vs_brute_force(hw):
  matrix = _avg_pool_matrix(*hw)
  flax_matrix = _dense_matrix(lambda v: nn.avg_pool(v[None], (2, 2), (2, 2), "SAME")[0],
                              (*hw, 1))
  np.testing.assert_allclose(flax_matrix, matrix, atol=1e-7)
  exact = np.linalg.svd(matrix, compute_uv=False)[0]
  np.testing.assert_allclose(exact, 0.5, rtol=1e-12)
  for method in ("exact", "power"):
    bound = float(certify.avg_pool_operator_norm(jax.random.PRNGKey(0), in_shape=hw,
                                                 window=(2, 2), strides=(2, 2), padding="SAME",
                                                 method=method, iterations=50))
    assert exact <= bound <= exact * 1.2, method


@pytest.mark.slow
@pytest.mark.parametrize("hw", [(7, 9)])
def test_max_pool_bound_vs_brute_force(hw):
  window, strides, padding = (3, 3), (2, 2), ((1, 1), (1, 1))
  pool = lambda v: nn.max_pool(v[None], window, strides, padding)[0]
  h, w = hw
  # Brute force: windows containing input i are the outputs that equal 1 when
  # input i is 1 and every other input is -1.
  onehots = jnp.where(jnp.eye(h * w, dtype=bool), 1.0, -1.0).reshape(h * w, h, w, 1)
  counts = np.asarray(jax.vmap(lambda v: jnp.sum(pool(v) == 1.0))(onehots))
  bound = certify.max_pool_lipschitz(hw, window, strides, padding)
  assert bound == pytest.approx(np.sqrt(counts.max()))
  assert bound == pytest.approx(2.0)
  # Attained: a bump at an input inside 4 windows moves 4 outputs by delta.
  i = int(np.argmax(counts))
  x = -jnp.ones((h, w, 1))
  bumped = x.reshape(-1).at[i].add(3.0).reshape(h, w, 1)
  ratio = jnp.linalg.norm(pool(bumped) - pool(x)) / 3.0
  assert float(ratio) == pytest.approx(bound, rel=1e-6)
  # Random pairs never exceed the bound.
  key = jax.random.PRNGKey(0)
  a, b = jax.random.normal(key, (2, 200, h, w, 1))
  ratios = jax.vmap(lambda u, v: jnp.linalg.norm(pool(u) - pool(v)) / jnp.linalg.norm(u - v))(a, b)
  assert float(ratios.max()) <= bound


def _encoder_jacobians(encoder, enc_vars, x):
  """[B, d, D] per-example Jacobians of the encoder (float64 numpy)."""
  jac = jax.jit(jax.vmap(jax.jacrev(lambda v: encoder.apply(enc_vars, v[None])[0])))(x)
  return np.asarray(jac, np.float64).reshape(x.shape[0], jac.shape[1], -1)


@pytest.mark.slow
@pytest.mark.parametrize("modality", ["vec", "img", "clip"])
def test_sound_encoder_bound_is_above_local_and_secant_ratios(tiny_models, resnet, modality):
  if modality == "clip":
    encoder, enc_vars, _ = resnet
    params, stats = enc_vars["params"], enc_vars["batch_stats"]
  else:
    model, variables, _ = tiny_models["orthogonal"]
    encoder = model.encoders[modality]
    params = variables["params"][f"encoders_{modality}"]
    stats = {}
    enc_vars = {"params": params}
  bound, layers = certify.encoder_lipschitz(encoder, params, stats, SHAPES[modality])
  points = _inputs({modality: SHAPES[modality]}, batch=8, seed=3)[modality] * 2.0
  jac = _encoder_jacobians(encoder, enc_vars, points)
  local = np.linalg.svd(jac, compute_uv=False)[:, 0]
  assert np.all(local <= float(bound)), (local.max(), float(bound))
  other = _inputs({modality: SHAPES[modality]}, batch=8, seed=4)[modality]
  phi = jax.jit(lambda v: encoder.apply(enc_vars, v))
  secant = np.linalg.norm(phi(points) - phi(other), axis=-1) / np.linalg.norm(
      (points - other).reshape(8, -1), axis=-1)
  assert np.all(secant <= float(bound))
  if modality == "vec":  # the MLP bound is exactly the product of the kernels' norms
    expected = np.prod([np.linalg.svd(np.asarray(params[f"Dense_{i}"]["kernel"], np.float64),
                                      compute_uv=False)[0] for i in range(2)])
    np.testing.assert_allclose(float(bound), expected * (1 + certify.ROUNDING_MARGIN)**2,
                               rtol=1e-5)
  if modality == "clip":
    assert float(layers["max_pool"]) == 2.0  # 3x3/2 windows: sqrt(2 x 2) per input
    np.testing.assert_allclose(float(layers["global_mean"]), 1 / np.sqrt(2))
    # Clip frames: the encoder's bound is its layers' product over sqrt(T = 2).
    np.testing.assert_allclose(float(bound), np.prod([float(b) for b in layers.values()])
                               / np.sqrt(2), rtol=1e-5)
    # The stem's bound is the exact norm of the linear part of BatchNorm(Conv(x))
    # in eval mode, built from Flax's own layers (independent of the folding).
    stem = nn.Conv(2, (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False)
    norm = nn.BatchNorm(use_running_average=True, epsilon=1e-5)
    norm_vars = {"params": params["stem"]["norm"], "batch_stats": stats["stem"]["norm"]}
    affine = lambda v: norm.apply(norm_vars, stem.apply({"params": params["stem"]["conv"]},
                                                        v[None]))
    matrix = _dense_matrix(lambda v: (affine(v) - affine(jnp.zeros_like(v)))[0], SHAPES["clip"][1:])
    np.testing.assert_allclose(float(layers["stem"]),
                               np.linalg.svd(matrix, compute_uv=False)[0]
                               * (1 + certify.ROUNDING_MARGIN), rtol=1e-4)
    assert len([name for name in layers if name.startswith("ResidualBlock")]) == 4
    # Forward-mode per-example Jacobians through the ResNet (eval-mode batch-norm,
    # 5-D clips) agree with the reverse-mode ones above, row by row and pair by pair.
    fn = lambda inputs: encoder.apply(enc_vars, inputs["clip"])
    norms, pairs = certify.jacobian_norms(fn, {"clip": points[:2]}, "clip", "jacfwd")
    jac = jac[:2]
    scale = np.abs(jac).max() * np.sqrt(jac.shape[-1])
    np.testing.assert_allclose(norms, np.linalg.norm(jac, axis=-1), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(
        pairs, np.linalg.norm(jac[:, :, None] - jac[:, None, :], axis=-1), rtol=1e-4,
        atol=1e-6 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["concat", "orthogonal"])
def test_sound_constants_dominate_local_constants(tiny_models, head):
  model, variables, x = tiny_models[head]
  sound = certify.sound_constants(model, variables)
  assert sound.kind == "sound" and sound.target == certify.constants.TARGETS[head]
  points = {m: v * 3.0 for m, v in _inputs({m: SHAPES[m] for m in x}, batch=8, seed=7).items()}
  local = certify.local_constants(model, variables, points)
  assert local.kind == "local"
  for m in sorted(x):
    assert sound.values[m].shape[0] == 1 and local.values[m].shape[0] == 8
    assert np.all(np.asarray(local.values[m]) <= np.asarray(sound.values[m]) + 1e-7), m
    if head == "orthogonal":  # actual row norms of W~, never an assumed 1
      kernel = model.apply(variables, points).head.kernels[m]
      np.testing.assert_allclose(sound.values[m][0],
                                 np.linalg.norm(kernel, axis=0) * float(sound.encoder[m]),
                                 rtol=1e-6)


def test_sound_constants_use_the_actual_w_tilde_row_norms(tiny_models):
  model, variables, _ = tiny_models["orthogonal"]
  params = dict(variables["params"])
  head = dict(params["head"])
  head["w_tilde"] = {m: w * jnp.linspace(1.0, 3.0, K)[:, None] for m, w in head["w_tilde"].items()}
  params["head"] = head
  scaled = certify.sound_constants(model, {**variables, "params": params})
  base = certify.sound_constants(model, variables)
  for m in base.values:
    np.testing.assert_allclose(scaled.values[m] / base.values[m], jnp.linspace(1.0, 3.0, K)[None],
                               rtol=1e-5)


@pytest.mark.slow
def test_empirical_is_the_maximum_of_local_over_valid_examples(tiny_models):
  model, variables, _ = tiny_models["concat"]
  shapes = {m: SHAPES[m] for m in ("img", "vec")}
  first, second = _inputs(shapes, batch=4, seed=11), _inputs(shapes, batch=4, seed=12)
  second = {m: v * 4.0 for m, v in second.items()}
  valid = np.array([True, True, False, False])
  batches = [first, {"inputs": second, "valid": valid}]
  empirical = certify.empirical_constants(model, variables, batches)
  assert empirical.kind == "empirical"
  local_first = certify.local_constants(model, variables, first)
  local_second = certify.local_constants(model, variables, second)
  for m in shapes:
    expected = np.maximum(np.max(local_first.values[m], 0), np.max(local_second.values[m][:2], 0))
    np.testing.assert_allclose(empirical.values[m][0], expected, rtol=1e-6)
    # tau(labels) resolves the row of each label.
    labels = jnp.array([2, 0])
    np.testing.assert_allclose(empirical.tau(labels)[m], expected[np.array([2, 0])], rtol=1e-6)


def test_empirical_on_an_empty_dataset_is_a_clear_error(tiny_models):
  model, variables, _ = tiny_models["concat"]
  with pytest.raises(ValueError, match="empty"):
    certify.empirical_constants(model, variables, [])
  padding_only = {"inputs": _inputs({m: SHAPES[m] for m in ("img", "vec")}, batch=2),
                  "valid": np.zeros(2, bool)}
  with pytest.raises(ValueError, match="empty"):
    certify.empirical_constants(model, variables, [padding_only])


@pytest.mark.slow
def test_sound_resnet_bound_counts_the_shortcut_path(resnet):
  # Residual branches scaled to almost nothing: the signal flows through the
  # identity / projection shortcuts, which the bound must count (1 + ||F||).
  encoder, enc_vars, _ = resnet
  params = jax.tree_util.tree_map(lambda v: v, enc_vars["params"])
  for name, block in params.items():
    if name.startswith("ResidualBlock"):
      norm = block["conv_bn_1"]["norm"]
      block["conv_bn_1"] = {**block["conv_bn_1"], "norm": {**norm, "scale": norm["scale"] * 1e-3}}
  variables = {"params": params, "batch_stats": enc_vars["batch_stats"]}
  bound, layers = certify.encoder_lipschitz(encoder, params, variables["batch_stats"],
                                            SHAPES["clip"])
  points = _inputs({"clip": SHAPES["clip"]}, batch=8, seed=5)["clip"]
  local = np.linalg.svd(_encoder_jacobians(encoder, variables, points), compute_uv=False)[:, 0]
  assert local.max() > 0 and np.all(local <= float(bound))
  assert float(layers["ResidualBlock_0"]) >= 1.0  # identity shortcut


@pytest.mark.slow
def test_host_chunks_give_the_results_of_one_program(tiny_models, monkeypatch):
  """On a CPU, direct calls loop over host chunks (the last one shorter, not
  padded); radii and constants equal those of one vectorised program (jitted)."""
  model, variables, _ = tiny_models["orthogonal"]
  x = _inputs({m: SHAPES[m] for m in ("img", "vec", "vec2")}, batch=5, seed=13)
  labels = jnp.arange(5) % K
  whole = jax.jit(lambda v, x, y: certify.certify(model, v, x, y, "local"))(variables, x, labels)
  whole_local = jax.jit(lambda v, x: certify.local_constants(model, v, x))(variables, x)
  monkeypatch.setattr(local, "CPU_JACOBIAN_ROWS", 2 * K)
  assert local.host_chunk_size(5, K, None) == 2  # chunks of 2, 2 and 1 examples
  assert local.host_chunk_size(5, K, 3) is None and local.host_chunk_size(2, K, None) is None
  chunked = certify.certify(model, variables, x, labels, "local")
  np.testing.assert_allclose(chunked.radius, whole.radius, rtol=1e-5)
  np.testing.assert_allclose(chunked.per_class, whole.per_class, rtol=1e-5)
  chunked_local = certify.local_constants(model, variables, x)
  empirical = certify.empirical_constants(model, variables, [x])
  for m, value in whole_local.values.items():
    np.testing.assert_allclose(chunked_local.values[m], value, rtol=1e-5)
    np.testing.assert_allclose(empirical.values[m][0], np.max(value, 0), rtol=1e-5)
