"""Operator norms of the linear maps inside encoders: the building blocks of
every layer's stated Lipschitz bound (`mmsafe.models.layers`).

* `operator_norm`: the l2 operator norm of any linear map, exactly (the
  materialised matrix's largest singular value) or by power iteration with a
  proven probabilistic safety factor (`power_iteration_factor`).
* `conv_operator_norm`, `avg_pool_operator_norm`: Flax convolutions (with a
  folded eval-mode batch norm) and average pooling on a given input shape.
* `max_pool_lipschitz`: `sqrt(max windows per input)` for max pooling.

`BoundOptions` carries how bounds are computed from the certifier down to the
layers.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
from typing import Any
import zlib

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.numerics import HIGHEST

Array = jax.Array

# Relative margin added to every numerically computed operator norm for float32
# rounding (dot products with fan-in up to ~1e4 have relative error below ~6e-4).
# A heuristic, not a floating-point proof.
ROUNDING_MARGIN = 1e-3
_TINY = 1e-30


@flax.struct.dataclass
class BoundOptions:
  """How layers compute the operator norms behind their Lipschitz bounds.

  Attributes:
    key: PRNG key of the power iterations; each layer folds in its own path.
    method: "auto" (exact when the matrix has at most `exact_max_entries`
      entries, else power iteration), "exact" or "power" (see `operator_norm`).
    iterations: power-iteration steps.
    failure_probability: per power-iterated layer, the probability over `key`
      that its bound fails (see `power_iteration_factor`).
    exact_max_entries: the "auto" threshold.
  """

  key: Array = flax.struct.field(default_factory=lambda: jax.random.PRNGKey(0))
  method: str = flax.struct.field(pytree_node=False, default="auto")
  iterations: int = flax.struct.field(pytree_node=False, default=300)
  failure_probability: float = flax.struct.field(pytree_node=False, default=1e-6)
  exact_max_entries: int = flax.struct.field(pytree_node=False, default=1 << 21)

  def for_layer(self, path: tuple[str, ...]) -> dict[str, Any]:
    """`operator_norm`'s keyword arguments for the layer at `path` (its own key)."""
    salt = zlib.crc32("/".join(map(str, path)).encode()) & 0x7FFFFFFF
    return dict(key=jax.random.fold_in(self.key, salt), method=self.method,
                iterations=self.iterations, failure_probability=self.failure_probability,
                exact_max_entries=self.exact_max_entries)


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
    "in_shape", "strides", "padding", "kernel_dilation", "input_dilation",
    "feature_group_count", "method", "iterations", "failure_probability",
    "exact_max_entries"))
def conv_operator_norm(kernel: Array, scale: Array | None, key: Array, *,
                       in_shape: tuple[int, int, int], strides: tuple[int, int],
                       padding: Any, kernel_dilation: tuple[int, int] = (1, 1),
                       input_dilation: tuple[int, int] = (1, 1), feature_group_count: int = 1,
                       method: str = "auto", iterations: int = 300,
                       failure_probability: float = 1e-6,
                       exact_max_entries: int = 1 << 21) -> Array:
  """Operator norm bound of `x -> scale * conv(x, kernel)` on inputs `[H, W, C]`.

  The convolution is that of Flax's `nn.Conv` (cross-correlation, `padding`
  "SAME"/"VALID"/explicit pairs, `strides`, `kernel_dilation` (atrous),
  `input_dilation` and `feature_group_count`), no bias; `scale` ([C_out] or
  None) is a folded eval-mode batch-norm `gamma / sqrt(var + eps)`. The norm
  depends on the input's spatial size (border effects of the padding), hence
  `in_shape`. See `operator_norm` for the soundness of each method.
  """
  kernel = kernel.astype(jnp.float32)
  if not isinstance(padding, str):
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)

  def linear_fn(x):
    y = jax.lax.conv_general_dilated(x[None], kernel, tuple(strides), padding,
                                     lhs_dilation=tuple(input_dilation),
                                     rhs_dilation=tuple(kernel_dilation),
                                     feature_group_count=feature_group_count,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=HIGHEST)[0]
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
