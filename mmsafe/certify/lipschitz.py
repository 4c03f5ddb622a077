"""Lipschitz constants of the uni-modal scores and margins (CRMT, ICLR 2024, Sec. 3).

The certified radii of `mmsafe.certify.bounds` need, per modality `m`, a
Lipschitz constant of

* the uni-modal score `u^(m)_k(x^(m)) = W~^(m)_k phi^(m)(x^(m))` of each class
  `k` (orthogonal head, CRMT eq. 9: `tau~^(m)_k`), or
* the uni-modal margin `zeta^(m)_k = (W^(m)_y - W^(m)_k) phi^(m) / c^(m)_k` of
  each class pair `(y, k)` (concat/JT head, CRMT eq. 4: `tau^(m)_k`), with the
  integration factor `c^(m)_k = ||W^(m)_y - W^(m)_k||` (CRMT eq. 3).

Three kinds, always recorded in the result (`LipschitzConstants.kind`):

* `local`: the gradient norm at the sample (`local_lipschitz`): an estimate,
  not a certificate. All K classes and all pairs at once from the per-example
  Jacobian `J = d s^(m) / d x^(m)` ([K, D]), computed with `jax.jacfwd` or
  `jax.jacrev` and `vmap`-ed over the batch.
* `empirical`: the per-class (per-pair) maximum of `local` over a dataset
  (`empirical_constants`), as in the CRMT reference code. Still an estimate.
* `sound`: an upper bound valid for every input (`sound_constants`), from
  products of layer operator norms (`encoder_lipschitz`); radii computed with
  it are certificates.

Representation (`LipschitzConstants.values[m]`):

* orthogonal head (`target == "scores"`): `[N, K]`, entry `k` bounds the
  gradient norm of `u^(m)_k` (independent of the label);
* concat head (`target == "margins"`): `[N, K, K]`, entry `(y, k)` bounds the
  gradient norm of `zeta^(m)_k` for true label `y` (the diagonal is 0);

with `N = B` for `local` (one row per sample) and `N = 1` for `empirical` and
`sound` (one table for every input). `LipschitzConstants.tau(labels)` resolves
the label and returns the `[B|1, K]` arrays `certified_radius` takes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import functools
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.models.encoders import MLPEncoder, ResNet18, SmallCNN
from mmsafe.models.outputs import ModelOutput

Array = jax.Array
_HIGHEST = jax.lax.Precision.HIGHEST

KINDS = ("local", "empirical", "sound")
MODES = ("auto", "jacfwd", "jacrev")
TARGETS = {"concat": "margins", "orthogonal": "scores"}

# Batch-norm epsilon of every BatchNorm in `mmsafe.models.encoders` (ResNet18).
_BN_EPSILON = 1e-5
# Relative margin added to every computed operator norm for float32 rounding
# (dot products with fan-in up to ~1e4 have relative error below ~6e-4).
ROUNDING_MARGIN = 1e-3
_TINY = 1e-30


@flax.struct.dataclass
class LipschitzConstants:
  """Lipschitz constants of every modality's uni-modal scores or margins.

  Attributes:
    values: modality -> `[N, K]` (target "scores": constant of `u^(m)_k`) or
      `[N, K, K]` (target "margins": constant of `zeta^(m)_k` for the pair
      (row `y`, column `k`), 0 on the diagonal). `N` is the batch size for
      kind "local" and 1 for "empirical" and "sound".
    encoder: modality -> scalar upper bound on `Lip(phi^(m))` (kind "sound"
      only; empty otherwise).
    kind: "local" | "empirical" | "sound".
    target: "scores" (orthogonal head) | "margins" (concat head).
  """

  values: dict[str, Array]
  encoder: dict[str, Array] = flax.struct.field(default_factory=dict)
  kind: str = flax.struct.field(pytree_node=False, default="local")
  target: str = flax.struct.field(pytree_node=False, default="scores")

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(sorted(self.values))

  def tau(self, labels: Array) -> dict[str, Array]:
    """The constants `certified_radius` takes: modality -> `[B|1, K]`.

    Scores: the values as they are. Margins: row `labels[b]` of the pair table
    (of sample `b` for "local", of the shared table otherwise), so entry
    `[b, k]` is the constant of `zeta^(m)_k` for the pair `(labels[b], k)`.
    """
    labels = jnp.asarray(labels)
    if self.target == "scores":
      return dict(self.values)
    out = {}
    for m, table in self.values.items():
      if table.shape[0] == 1:
        out[m] = table[0][labels]
      else:
        if table.shape[0] != labels.shape[0]:
          raise ValueError(f"tau: constants of modality {m!r} have {table.shape[0]} rows "
                           f"(kind {self.kind!r}), expected {labels.shape[0]} (the labels)")
        out[m] = jnp.take_along_axis(table, labels[:, None, None], axis=1)[:, 0]
    return out


def integration_factors(kernel: Array) -> Array:
  """`c[y, k] = ||W_y - W_k||_2` (CRMT eq. 3) for a head kernel `[d, K]` (`W^T`).

  Exact row differences (no Gram-matrix cancellation), one row `y` at a time.
  """
  kernel = jnp.asarray(kernel, jnp.float32)
  if kernel.ndim != 2:
    raise ValueError(f"kernel: expected [d, K], got shape {tuple(kernel.shape)}")
  return jax.lax.map(lambda column: jnp.linalg.norm(kernel - column[:, None], axis=0), kernel.T)


def _safe_divide(numerator: Array, denominator: Array) -> Array:
  """`numerator / denominator`, 0 where the denominator is 0."""
  ok = denominator > 0
  return jnp.where(ok, numerator / jnp.where(ok, denominator, 1.0), 0.0)


# ----------------------------------------------------------------------------
# local: per-example Jacobians


def _select_scores(out: Any, modality: str) -> Array:
  if isinstance(out, ModelOutput):
    return out.scores[modality]
  if isinstance(out, Mapping):
    return out[modality]
  return out


def _resolve_mode(mode: str, input_dim: int, num_outputs: int) -> str:
  if mode not in MODES:
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
  if mode == "auto":
    # Forward mode pushes one tangent per input entry, reverse mode pulls one
    # cotangent per output: pick the smaller count.
    return "jacfwd" if input_dim < num_outputs else "jacrev"
  return mode


def jacobian_norms(score_fn: Callable[[dict[str, Array]], Any], inputs: Mapping[str, Array],
                   modality: str, mode: str = "auto", *, chunk_size: int | None = None,
                   precision: str | None = "highest") -> tuple[Array, Array]:
  """Row norms and pairwise row distances of the per-example Jacobian of the scores.

  For each example `b` with Jacobian `J_b = d s^(m)(x_b) / d x_b^(m)` ([K, D],
  flattened input), returns

    norms[b, k]    = ||J_b[k]||                (gradient norm of score k)
    pairs[b, y, k] = ||J_b[y] - J_b[k]||       (gradient norm of s_y - s_k)

  The pair distances come from the Gram matrix of the Jacobian rows (one
  `[K, D] x [D, K]` product per example) after subtracting the mean row, which
  leaves the distances unchanged and removes the component all rows share, so
  the cancellation in `G_yy + G_kk - 2 G_yk` is small.

  Args:
    score_fn: `inputs -> scores`, where scores is `[B, K]`, a dict
      modality -> `[B, K]` or a `ModelOutput` (its `.scores[modality]`). It
      must treat examples independently (batch-norm in eval mode). Arrays it
      closes over become constants of the compiled program: for large models
      call this under `jax.jit` with the variables as arguments (as
      `local_constants` does).
    inputs: modality -> `[B, ...]`; only `inputs[modality]` is differentiated.
    modality: the modality whose input the Jacobian is taken against.
    mode: "jacfwd", "jacrev", or "auto" (jacfwd when the per-example input
      dimension is smaller than K, else jacrev).
    chunk_size: examples per vectorised chunk (`jax.lax.map(..., batch_size)`),
      to bound memory; None: the whole batch at once (`jax.vmap`).
    precision: `jax.default_matmul_precision` for the model's matmuls and
      convolutions inside the Jacobian ("highest": full float32, as DESIGN.md
      asks for everything the bounds use; None: the ambient setting, e.g.
      TF32 on GPUs).

  Returns:
    (norms [B, K], pairs [B, K, K]) in float32.
  """
  if modality not in inputs:
    raise ValueError(f"modality: expected one of {sorted(inputs)}, got {modality!r}")
  x = inputs[modality]
  if x.ndim < 2 or x.shape[0] == 0:
    raise ValueError(f"inputs[{modality!r}]: expected shape [B, ...] with B >= 1, "
                     f"got {tuple(x.shape)}")
  others = {m: v for m, v in inputs.items() if m != modality}
  first = {m: v[:1] for m, v in inputs.items()}
  probe = jax.eval_shape(lambda inp: _select_scores(score_fn(inp), modality), first)
  if len(probe.shape) != 2 or probe.shape[0] != 1:
    raise ValueError(f"score_fn: expected scores of shape [B, K] for modality {modality!r}, "
                     f"got {tuple(probe.shape)} for a batch of 1")
  num_classes = probe.shape[1]
  mode = _resolve_mode(mode, int(np.prod(x.shape[1:])), num_classes)
  jacobian = jax.jacfwd if mode == "jacfwd" else jax.jacrev

  def one(args):
    if precision is None:
      return one_example(args)
    with jax.default_matmul_precision(precision):
      return one_example(args)

  def one_example(args):
    x_b, others_b = args

    def scores(x_single):
      batch = {m: v[None] for m, v in others_b.items()}
      batch[modality] = x_single[None]
      return _select_scores(score_fn(batch), modality)[0].astype(jnp.float32)

    jac = jacobian(scores)(x_b).reshape(num_classes, -1).astype(jnp.float32)
    norms = jnp.sqrt(jnp.sum(jac * jac, axis=-1))
    centred = jac - jnp.mean(jac, axis=0, keepdims=True)
    gram = jnp.matmul(centred, centred.T, precision=_HIGHEST)
    diag = jnp.diagonal(gram)
    squared = diag[:, None] + diag[None, :] - 2.0 * gram
    pairs = jnp.sqrt(jnp.maximum(squared, 0.0)) * (1.0 - jnp.eye(num_classes))
    return norms, pairs

  def run(x, others):
    if chunk_size is None:
      return jax.vmap(one)((x, others))
    return jax.lax.map(one, (x, others), batch_size=int(chunk_size))

  # Compiled once per call (inlined when the caller is already under jit).
  return jax.jit(run)(x, others)


def local_lipschitz(score_fn: Callable[[dict[str, Array]], Any], inputs: Mapping[str, Array],
                    modality: str, mode: str = "auto", *, labels: Array | None = None,
                    kernel: Array | None = None, chunk_size: int | None = None,
                    precision: str | None = "highest") -> Array:
  """Local Lipschitz estimates `[B, K]`: gradient norms at each sample.

  * `labels=None`: `||grad_x u^(m)_k(x_b)||` for every class k, i.e. the local
    `tau~^(m)_k` of CRMT eq. 9 when `score_fn` returns the orthogonal head's
    uni-modal scores.
  * `labels` given: `||grad_x (s^(m)_y - s^(m)_k)(x_b)|| / c^(m)_k` with
    `y = labels[b]`, the local `tau^(m)_k` of the margin `zeta^(m)_k`
    (CRMT eqs. 2 and 4) for the JT head's contributions `s^(m) = W^(m) phi^(m)`,
    where `c^(m)_k = ||W_y - W_k||` is read off `kernel` ([d_m, K], `W^T`);
    without `kernel`, `c = 1` (the constant of `s_y - s_k` itself, which is
    the vulnerability indicator `eta^(m)_k = c^(m)_k tau^(m)_k`). Entry `k = y`
    is 0.

  See `jacobian_norms` for `score_fn`, `mode`, `chunk_size` and `precision`.

  Returns:
    float32 [B, K] estimates (not certificates).

  Pure and jit-able with `score_fn`, `modality`, `mode`, `chunk_size` and
  `precision` static (close over them); `inputs`, `labels` and `kernel` may
  be traced.
  """
  norms, pairs = jacobian_norms(score_fn, inputs, modality, mode, chunk_size=chunk_size,
                                precision=precision)
  if labels is None:
    return norms
  labels = jnp.asarray(labels)
  if labels.shape != (norms.shape[0],):
    raise ValueError(f"labels: expected shape [{norms.shape[0]}], got {tuple(labels.shape)}")
  rows = jnp.take_along_axis(pairs, labels[:, None, None], axis=1)[:, 0]
  if kernel is None:
    return rows
  if kernel.shape[-1] != norms.shape[-1]:
    raise ValueError(f"kernel: expected [d, K={norms.shape[-1]}], got {tuple(kernel.shape)}")
  return _safe_divide(rows, integration_factors(kernel)[labels])


def model_score_fn(model, variables: Mapping[str, Any], modality: str, kernel: Array
                   ) -> Callable[[dict[str, Array]], Array]:
  """`inputs -> phi^(m)(inputs[m]) @ kernel` in eval mode, running only the
  encoder of `modality` (via `model.encode` when the model has one)."""
  if hasattr(model, "encode"):
    def score_fn(inputs):
      features = model.apply(variables, modality, inputs[modality], method="encode")
      return jnp.matmul(features.astype(jnp.float32), kernel, precision=_HIGHEST)
    return score_fn
  return lambda inputs: model.apply(variables, inputs).scores[modality]


def head_params(model, variables):
  """The `HeadParams` of `model` (one forward pass on a zero example)."""
  shapes = getattr(model, "input_shapes", None)
  if not shapes:
    raise ValueError("model: expected a model with `input_shapes` (see mmsafe.models.build)")
  example = {m: jnp.zeros((1, *s), jnp.float32) for m, s in shapes.items()}
  return model.apply(variables, example).head


def local_constants(model, variables: Mapping[str, Any], inputs: Mapping[str, Array], *,
                    head=None, mode: str = "auto", chunk_size: int | None = None,
                    precision: str | None = "highest") -> LipschitzConstants:
  """Kind "local": per-sample gradient norms for every modality (see module doc).

  Orthogonal head: `[B, K]` norms of the uni-modal score gradients, the local
  `tau~^(m)_k` of CRMT eq. 9. Concat head: `[B, K, K]` constants of the
  margins `zeta^(m)_k` for every pair, the local `tau^(m)_k` of CRMT eq. 4
  (margins of eq. 2). Estimates, not certificates.
  `mode`, `chunk_size`, `precision`: see `jacobian_norms`.

  Args:
    model, variables: a model from `mmsafe.models.build` and its variables
      (evaluated in eval mode).
    inputs: modality -> [B, ...].
    head: the model's `HeadParams` (computed by one forward pass when None).

  Returns:
    `LipschitzConstants` of kind "local". Pure and jit-able with `model` and
    the options static (close over them); `variables`, `inputs` and `head`
    may be traced.
  """
  head = head_params(model, variables) if head is None else head
  target = _target(head.kind)

  def compute(variables, inputs, head):
    values = {}
    for m in sorted(head.kernels):
      norms, pairs = jacobian_norms(model_score_fn(model, variables, m, head.kernels[m]), inputs,
                                    m, mode, chunk_size=chunk_size, precision=precision)
      values[m] = norms if target == "scores" else _safe_divide(
          pairs, integration_factors(head.kernels[m])[None])
    return values

  # Compiled once per call (inlined when the caller is already under jit).
  values = jax.jit(compute)(variables, inputs, head)
  return LipschitzConstants(values=values, kind="local", target=target)


def _target(head_kind: str) -> str:
  if head_kind not in TARGETS:
    raise ValueError(f"head.kind: expected one of {sorted(TARGETS)}, got {head_kind!r}")
  return TARGETS[head_kind]


def empirical_constants(model, variables: Mapping[str, Any], batches: Iterable[Any], *,
                        head=None, mode: str = "auto", chunk_size: int | None = None,
                        precision: str | None = "highest") -> LipschitzConstants:
  """Kind "empirical": the maximum of `local` over a dataset, per class (pair).

  Streams `batches` (batch dicts `{"inputs": ..., "valid": bool[B]?}` as from
  `mmsafe.data.eval_batches`, or plain inputs dicts); examples with
  `valid == False` (padding) are ignored. The maximum runs over every example
  regardless of its label: the constant of `u^(m)_k` (or of `zeta^(m)_k` for
  the pair (y, k)) is a property of the function, not of class-y inputs.

  As in the CRMT reference code, this estimates `tau~^(m)_k` (CRMT eq. 9) or
  `tau^(m)_k` (CRMT eq. 4) by the largest local gradient norm seen.
  `mode`, `chunk_size`, `precision`: see `jacobian_norms`.

  Pure, but not jit-able itself: it iterates over `batches` in Python (a
  stream of any length) and reads each `valid` mask as concrete numpy; each
  batch's maximum is one jitted computation.

  Returns:
    `LipschitzConstants` with values `[1, K]` (scores) or `[1, K, K]` (margins).

  Raises:
    ValueError if `batches` holds no (valid) example.
  """
  head = head_params(model, variables) if head is None else head
  target = _target(head.kind)
  modalities = sorted(head.kernels)
  factors = {m: integration_factors(head.kernels[m]) for m in modalities}

  # Variables and kernels are arguments (not closed-over constants) so large
  # models are not baked into the compiled program.
  @jax.jit
  def batch_max(variables, kernels, factors, inputs, valid):
    out = {}
    for m in modalities:
      norms, pairs = jacobian_norms(model_score_fn(model, variables, m, kernels[m]),
                                    inputs, m, mode, chunk_size=chunk_size, precision=precision)
      value = norms if target == "scores" else _safe_divide(pairs, factors[m][None])
      mask = valid.reshape((-1,) + (1,) * (value.ndim - 1))
      out[m] = jnp.max(jnp.where(mask, value, -jnp.inf), axis=0)
    return out

  running = None
  for batch in batches:
    inputs = batch["inputs"] if isinstance(batch, Mapping) and "inputs" in batch else batch
    size = next(iter(inputs.values())).shape[0]
    valid = np.ones(size, bool) if not (isinstance(batch, Mapping) and "valid" in batch) else (
        np.asarray(batch["valid"], bool))
    if size == 0 or not valid.any():
      continue
    maxima = batch_max(variables, dict(head.kernels), factors, inputs, jnp.asarray(valid))
    running = maxima if running is None else jax.tree_util.tree_map(jnp.maximum, running, maxima)
  if running is None:
    raise ValueError("empirical_constants: the dataset is empty (no valid example in `batches`); "
                     "expected at least one example")
  return LipschitzConstants(values={m: v[None] for m, v in running.items()}, kind="empirical",
                            target=target)


# ----------------------------------------------------------------------------
# sound: operator norms


def power_iteration_factor(dim: int, iterations: int, failure_probability: float) -> float:
  """Multiplier turning the power-iteration estimate into an upper bound.

  Claim: let `M = T^T T` (n x n, eigenvalues `l_1 >= ... >= 0`), `b` uniform on
  the unit sphere, `v = M^q b / ||M^q b||` and `theta = v^T M v = ||T v||^2`.
  Then with probability at least `1 - delta` over `b`,

      ||T||_2 = sqrt(l_1) <= sqrt(theta) * t^(-1 / (2q)),  t = delta sqrt(pi / (2n)).

  Proof. Write `b = sum_i beta_i e_i` in an eigenbasis and
  `m_p = sum_i beta_i^2 l_i^p` (`m_0 = 1`). By Cauchy-Schwarz
  `m_p^2 <= m_{p-1} m_{p+1}`, so the ratios `r_p = m_p / m_{p-1}` do not
  decrease and `m_{2q} = prod_{p<=2q} r_p <= r_{2q+1}^{2q} = theta^{2q}`. Hence
  `theta >= m_{2q}^{1/(2q)} >= (beta_1^2 l_1^{2q})^{1/(2q)} = l_1 |beta_1|^{1/q}`.
  `beta_1` is one coordinate of a uniform point of the sphere; its density
  `Gamma(n/2) / (sqrt(pi) Gamma((n-1)/2)) (1 - x^2)^((n-3)/2)` is at most
  `sqrt(n / (2 pi))` (Gautschi's inequality), so
  `P(|beta_1| < t) <= t sqrt(2n / pi) = delta`. Outside that event
  `l_1 <= theta / t^{1/q}`. (A repeated top eigenvalue only helps.)

  This is the flavour of Kuczynski & Wozniakowski (1992), with explicit
  constants. Example: n = 150,528 (a 224x224x3 image), q = 300,
  delta = 1e-6 give a factor 1.033.
  """
  if dim < 1 or iterations < 1 or not 0 < failure_probability < 1:
    raise ValueError(f"power iteration: expected dim >= 1, iterations >= 1 and "
                     f"0 < failure_probability < 1, got {dim}, {iterations}, "
                     f"{failure_probability}")
  t = failure_probability * math.sqrt(math.pi / (2.0 * dim))
  return math.exp(-math.log(t) / (2.0 * iterations))


def operator_norm(linear_fn: Callable[[Array], Array], in_shape: tuple[int, ...], *,
                  key: Array | None = None, method: str = "auto", iterations: int = 300,
                  failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21,
                  rounding_margin: float = ROUNDING_MARGIN) -> Array:
  """Upper bound on the l2 operator norm of a linear map on arrays of `in_shape`.

  * "exact": builds the matrix (`jax.jacfwd`/`jax.jacrev`) and takes its
    largest singular value (deterministic).
  * "power": power iteration on `T^T T` with the adjoint from `jax.vjp`, from a
    random start, `iterations` steps, multiplied by
    `power_iteration_factor(n, iterations, failure_probability)`: an upper
    bound with probability >= 1 - failure_probability (over the start `key`).
  * "auto": "exact" when the matrix has at most `exact_max_entries` entries.

  Both are multiplied by `1 + rounding_margin` for float32 rounding.
  Pure and jit-able (`linear_fn` must be linear: no bias).
  """
  in_shape = tuple(int(s) for s in in_shape)
  out_struct = jax.eval_shape(linear_fn, jax.ShapeDtypeStruct(in_shape, jnp.float32))
  n, p = int(np.prod(in_shape)), int(np.prod(out_struct.shape))
  if method not in ("auto", "exact", "power"):
    raise ValueError(f"method: expected 'auto', 'exact' or 'power', got {method!r}")
  if method == "auto":
    method = "exact" if n * p <= exact_max_entries else "power"
  zeros = jnp.zeros(in_shape, jnp.float32)
  if method == "exact":
    jac = (jax.jacfwd if n <= p else jax.jacrev)(linear_fn)(zeros)
    matrix = jac.reshape(p, n).astype(jnp.float32)
    sigma = jnp.linalg.svd(matrix, compute_uv=False)[0] if min(n, p) > 0 else jnp.float32(0)
    return sigma * (1.0 + rounding_margin)
  key = jax.random.PRNGKey(0) if key is None else key
  _, adjoint = jax.vjp(linear_fn, zeros)

  def normal_op(v):
    return adjoint(linear_fn(v))[0]

  def normalise(v):
    return v / jnp.maximum(jnp.linalg.norm(v), _TINY)

  v = normalise(jax.random.normal(key, in_shape, jnp.float32))
  v = jax.lax.fori_loop(0, iterations, lambda _, v: normalise(normal_op(v)), v)
  sigma = jnp.linalg.norm(linear_fn(v))
  return sigma * power_iteration_factor(n, iterations, failure_probability) * (
      1.0 + rounding_margin)


@functools.partial(jax.jit, static_argnames=(
    "in_shape", "strides", "padding", "method", "iterations", "failure_probability",
    "exact_max_entries"))
def conv_operator_norm(kernel: Array, scale: Array | None, key: Array, *,
                       in_shape: tuple[int, int, int], strides: tuple[int, int],
                       padding: Any, method: str = "auto", iterations: int = 300,
                       failure_probability: float = 1e-6,
                       exact_max_entries: int = 1 << 21) -> Array:
  """Operator norm bound of `x -> scale * conv(x, kernel)` on inputs `[H, W, C]`.

  The convolution is exactly Flax's `nn.Conv` (cross-correlation, `padding`
  "SAME"/"VALID"/explicit pairs, `strides`), no bias; `scale` ([C_out] or
  None) is a folded eval-mode batch-norm `gamma / sqrt(var + eps)`. The norm
  depends on the input's spatial size (border effects of the padding), hence
  `in_shape`. See `operator_norm` for the soundness of each method.
  """
  conv = nn.Conv(kernel.shape[-1], kernel.shape[:2], strides=strides, padding=padding,
                 use_bias=False, precision=_HIGHEST)
  kernel = kernel.astype(jnp.float32)

  def linear_fn(x):
    y = conv.apply({"params": {"kernel": kernel}}, x[None])[0]
    return y if scale is None else y * scale.astype(jnp.float32)

  return operator_norm(linear_fn, in_shape, key=key, method=method, iterations=iterations,
                       failure_probability=failure_probability,
                       exact_max_entries=exact_max_entries)


@functools.partial(jax.jit, static_argnames=(
    "in_shape", "window", "strides", "padding", "method", "iterations", "failure_probability",
    "exact_max_entries"))
def avg_pool_operator_norm(key: Array, *, in_shape: tuple[int, int], window: tuple[int, int],
                           strides: tuple[int, int], padding: Any, method: str = "auto",
                           iterations: int = 300, failure_probability: float = 1e-6,
                           exact_max_entries: int = 1 << 21) -> Array:
  """Operator norm bound of Flax's `nn.avg_pool` on `[H, W, C]` (padding included).

  Average pooling acts on each channel alone with the same matrix, so its norm
  is that of one channel `[H, W, 1]`: computed exactly (or by power
  iteration), SAME padding and the border windows included. For 2x2/2 windows
  the windows are disjoint and the value is 1/2.
  """
  def linear_fn(x):
    return nn.avg_pool(x[None], window, strides=strides, padding=padding)[0]

  return operator_norm(linear_fn, (*in_shape, 1), key=key, method=method,
                       iterations=iterations, failure_probability=failure_probability,
                       exact_max_entries=exact_max_entries)


def _windows_per_index(size: int, window: int, stride: int, pad: tuple[int, int]) -> np.ndarray:
  """How many pooling windows contain each of `size` input positions (1-D)."""
  outputs = (size + pad[0] + pad[1] - window) // stride + 1
  starts = np.arange(outputs) * stride - pad[0]
  index = np.arange(size)
  return ((index[:, None] >= starts[None]) & (index[:, None] < starts[None] + window)).sum(1)


def max_pool_lipschitz(in_shape: tuple[int, int], window: tuple[int, int],
                       strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> float:
  """l2 Lipschitz constant bound `sqrt(N_max)` of 2-D max pooling (padding -inf).

  Proof: output `o` is `y_o = max_{i in W_o} x_i`; a max is 1-Lipschitz in the
  sup norm, so `|y_o - y'_o| <= max_{i in W_o} |d_i|` and
  `|y_o - y'_o|^2 <= sum_{i in W_o} d_i^2` (d = x - x'). Summing over outputs,
  `||y - y'||^2 <= sum_i N_i d_i^2 <= N_max ||d||^2` where `N_i` counts the
  windows containing input `i`. (Padded entries are -inf and never win, as
  every window holds a real entry.) Overlapping windows make this > 1: for
  ResNet's 3x3/2 pooling with padding 1 an entry lies in up to 2 windows per
  axis, 4 in all, so the bound is 2 -- and it is attained by a single bump
  that is the maximum of all 4 windows containing it.
  """
  counts = [_windows_per_index(int(n), int(k), int(s), tuple(p))
            for n, k, s, p in zip(in_shape, window, strides, padding)]
  if any(c.size == 0 for c in counts):
    raise ValueError(f"max pool: empty input {tuple(in_shape)}")
  return math.sqrt(float(np.prod([c.max() for c in counts])))


def _conv_out_shape(in_shape, kernel_shape, strides, padding):
  conv = nn.Conv(kernel_shape[-1], kernel_shape[:2], strides=strides, padding=padding,
                 use_bias=False)
  out = jax.eval_shape(lambda x: conv.apply({"params": {"kernel": jnp.zeros(kernel_shape)}}, x),
                       jax.ShapeDtypeStruct((1, *in_shape), jnp.float32))
  return tuple(out.shape[1:])


def _bn_scale(params: Mapping[str, Array], stats: Mapping[str, Array]) -> Array:
  """Eval-mode batch-norm as a per-channel scale `gamma / sqrt(var + eps)` (the
  shift `beta - gamma mean / sqrt(var + eps)` does not change Lipschitz constants)."""
  return params["scale"].astype(jnp.float32) / jnp.sqrt(
      stats["var"].astype(jnp.float32) + _BN_EPSILON)


def _dense_norm(kernel: Array) -> Array:
  """Exact largest singular value of a Dense kernel, with the rounding margin."""
  return jnp.linalg.svd(kernel.astype(jnp.float32), compute_uv=False)[0] * (1.0 + ROUNDING_MARGIN)


def _require(tree: Mapping[str, Any], name: str, where: str):
  if name not in tree:
    raise ValueError(f"{where}: expected a parameter entry {name!r}, found {sorted(tree)}")
  return tree[name]


def encoder_lipschitz(encoder: nn.Module, params: Mapping[str, Any],
                      batch_stats: Mapping[str, Any] | None, input_shape: tuple[int, ...], *,
                      key: Array | None = None, method: str = "auto", iterations: int = 300,
                      failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21
                      ) -> tuple[Array, dict[str, Array]]:
  """A sound upper bound on the l2 Lipschitz constant of an encoder `phi`.

  Walks the encoder's layers (eval mode) and multiplies layer bounds:
  Dense: exact spectral norm; Conv (+ folded batch-norm): `conv_operator_norm`
  on the layer's actual input shape; ReLU: 1; flatten: 1; average pooling: its
  exact operator norm; 3x3/2 max pooling: `max_pool_lipschitz` (2); residual
  block `relu(shortcut(x) + F(x))`: `Lip(shortcut) + Lip(F)` (identity: 1);
  global mean over H x W: `1/sqrt(HW)`; mean over T frames: `1/sqrt(T)`
  (`||(1/T) sum_t (g(x_t) - g(x'_t))|| <= (L/T) sum_t ||d_t|| <= L/sqrt(T) ||d||`).

  Conv layers whose matrix has more than `exact_max_entries` entries use power
  iteration: the bound then holds with probability >= 1 - failure_probability
  per such layer (see `power_iteration_factor`). The bound is for float32
  arithmetic; a bfloat16 encoder computes a slightly different function.

  Args:
    encoder: an `MLPEncoder`, `SmallCNN` or `ResNet18` module (its attributes
      give the architecture).
    params / batch_stats: its variables (the "params" / "batch_stats"
      collections of this encoder).
    input_shape: the per-example input shape.

  Returns:
    (bound, layers): the bound and an ordered dict layer name -> bound.
  """
  key = jax.random.PRNGKey(0) if key is None else key
  options = dict(method=method, iterations=iterations, failure_probability=failure_probability,
                 exact_max_entries=exact_max_entries)
  batch_stats = batch_stats or {}
  layers: dict[str, Array] = {}
  counter = iter(range(1 << 30))

  def conv(kernel, scale, shape, strides, padding):
    norm = conv_operator_norm(kernel, scale, jax.random.fold_in(key, next(counter)),
                              in_shape=tuple(shape), strides=strides, padding=padding, **options)
    return norm, _conv_out_shape(shape, kernel.shape, strides, padding)

  name = type(encoder).__name__
  if isinstance(encoder, MLPEncoder):
    for i in range(len(encoder.widths)):
      layers[f"Dense_{i}"] = _dense_norm(_require(params, f"Dense_{i}", name)["kernel"])
  elif isinstance(encoder, SmallCNN):
    if len(input_shape) != 3:
      raise ValueError(f"SmallCNN: expected a per-example input shape [H, W, C], got "
                       f"{tuple(input_shape)}")
    shape = tuple(input_shape)
    for i, _ in enumerate(encoder.channels):
      kernel = _require(params, f"Conv_{i}", name)["kernel"]
      layers[f"Conv_{i}"], shape = conv(kernel, None, shape, (1, 1), "SAME")
      layers[f"avg_pool_{i}"] = avg_pool_operator_norm(
          jax.random.fold_in(key, next(counter)), in_shape=shape[:2], window=(2, 2),
          strides=(2, 2), padding="SAME", **options)
      shape = (-(-shape[0] // 2), -(-shape[1] // 2), shape[2])
    layers["Dense_0"] = _dense_norm(_require(params, "Dense_0", name)["kernel"])
  elif isinstance(encoder, ResNet18):
    if len(input_shape) not in (3, 4):
      raise ValueError(f"ResNet18: expected a per-example input shape [H, W, C] or "
                       f"[T, H, W, C], got {tuple(input_shape)}")
    shape = tuple(input_shape[-3:])
    kernel = _require(params, "stem_conv", name)["kernel"]
    scale = _bn_scale(_require(params, "stem_norm", name), _require(batch_stats, "stem_norm", name))
    layers["stem"], shape = conv(kernel, scale, shape, (2, 2), ((3, 3), (3, 3)))
    layers["max_pool"] = jnp.float32(max_pool_lipschitz(shape[:2], (3, 3), (2, 2),
                                                        ((1, 1), (1, 1))))
    shape = (-(-shape[0] // 2), -(-shape[1] // 2), shape[2])
    index = 0
    for stage, (blocks, _) in enumerate(zip(encoder.stage_sizes, encoder.widths)):
      for block in range(blocks):
        strides = (2, 2) if stage > 0 and block == 0 else (1, 1)
        block_name = f"ResidualBlock_{index}"
        p = _require(params, block_name, name)
        s = _require(batch_stats, block_name, name)
        f0, mid = conv(p["Conv_0"]["kernel"], _bn_scale(p["BatchNorm_0"], s["BatchNorm_0"]),
                       shape, strides, ((1, 1), (1, 1)))
        f1, out = conv(p["Conv_1"]["kernel"], _bn_scale(p["BatchNorm_1"], s["BatchNorm_1"]),
                       mid, (1, 1), ((1, 1), (1, 1)))
        if "shortcut_conv" in p:
          shortcut, _ = conv(p["shortcut_conv"]["kernel"],
                             _bn_scale(p["shortcut_norm"], s["shortcut_norm"]), shape, strides,
                             "SAME")
        else:
          shortcut = jnp.float32(1.0)
        layers[block_name] = shortcut + f0 * f1
        shape = out
        index += 1
    layers["global_mean"] = jnp.float32(1.0 / math.sqrt(shape[0] * shape[1]))
    if len(input_shape) == 4:
      layers["frame_mean"] = jnp.float32(1.0 / math.sqrt(input_shape[0]))
  else:
    raise NotImplementedError(f"sound Lipschitz bound: no layer walk for encoder {name}; "
                              f"supported: MLPEncoder, SmallCNN, ResNet18")
  bound = functools.reduce(lambda a, b: a * b, layers.values(), jnp.float32(1.0))
  return bound, layers


def sound_constants(model, variables: Mapping[str, Any], *, head=None, key: Array | None = None,
                    method: str = "auto", iterations: int = 300,
                    failure_probability: float = 1e-6, exact_max_entries: int = 1 << 21
                    ) -> LipschitzConstants:
  """Kind "sound": upper bounds valid for every input.

  Orthogonal head: `tau~^(m)_k = ||W~^(m)_k|| Lip(phi^(m))` with the actual
  row norms of `W~` (never an assumed 1). Concat head: the margin
  `zeta^(m)_k` is `phi^(m)` along a unit direction, so its constant is
  `Lip(phi^(m))` for every pair (0 on the diagonal). `Lip(phi^(m))` from
  `encoder_lipschitz`. These bound `tau~^(m)_k` (CRMT eq. 9) and
  `tau^(m)_k` (CRMT eq. 4) for every input, so the radii of Thm 3.3 / Thm 3.5
  computed with them are certificates (up to the power-iteration failure
  probability for large conv layers).

  Args:
    model, variables: a model from `mmsafe.models.build` (encoders MLP, CNN
      or ResNet18) and its variables.
    head: the model's `HeadParams` (computed by one forward pass when None).
    key: PRNG key of the power iterations (default `PRNGKey(0)`).
    method, iterations, failure_probability, exact_max_entries: see
      `operator_norm`.

  Returns:
    `LipschitzConstants` of kind "sound" with values `[1, K]` (scores) or
    `[1, K, K]` (margins), and `encoder` modality -> scalar `Lip(phi^(m))`.

  Pure and jit-able with `model` and the options static (close over them);
  `variables`, `head` and `key` may be traced.
  """
  if not (hasattr(model, "encoders") and hasattr(model, "input_shapes")):
    raise NotImplementedError(f"sound_constants: expected a model from mmsafe.models.build "
                              f"(with `encoders` and `input_shapes`), got {type(model).__name__}")
  head = head_params(model, variables) if head is None else head
  target = _target(head.kind)
  key = jax.random.PRNGKey(0) if key is None else key
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  values, encoder = {}, {}
  for i, m in enumerate(sorted(head.kernels)):
    name = f"encoders_{m}"
    if name not in params:
      raise ValueError(f"sound_constants: no parameters {name!r} for modality {m!r}; "
                       f"found {sorted(params)}")
    bound, _ = encoder_lipschitz(model.encoders[m], params[name], stats.get(name, {}),
                                 tuple(model.input_shapes[m]), key=jax.random.fold_in(key, i),
                                 method=method, iterations=iterations,
                                 failure_probability=failure_probability,
                                 exact_max_entries=exact_max_entries)
    encoder[m] = bound
    kernel = head.kernels[m].astype(jnp.float32)
    num_classes = kernel.shape[-1]
    if target == "scores":
      values[m] = (jnp.linalg.norm(kernel, axis=0) * bound)[None]
    else:
      values[m] = (bound * (1.0 - jnp.eye(num_classes)))[None]
  return LipschitzConstants(values=values, encoder=encoder, kind="sound", target=target)
