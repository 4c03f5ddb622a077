"""1-Lipschitz layers: encoders built from them own a bound of 1 (or their exact norm).

Written from the papers (no code copied):

* `OrthogonalDense`: a kernel with orthonormal rows (or columns), kept on the
  Stiefel manifold by the optimizer (`mmsafe.manifold.stiefel_transform`, the
  same retraction as the orthogonal head). Bound: its exact spectral norm.
* `AOLDense`, `AOLConv`: almost-orthogonal layers (Prach & Lampert, "Almost-
  Orthogonal Layers for Efficient General-Purpose Lipschitz Networks", ECCV
  2022, Thm. 1): the kernel `P` is rescaled per input channel by
  `d_i = (sum_j |P^T P|_ij)^(-1/2)`, which guarantees `||P diag(d)|| <= 1`.
* `CayleyConv`: an orthogonal circular convolution (Trockman & Kolter,
  "Orthogonalizing Convolutional Layers with the Cayley Transform", ICLR
  2021): per spatial frequency, the Cayley transform `(I + A)^(-1) (I - A)` of
  the skew-Hermitian `A = V^ - V^H` of the kernel's FFT is unitary.
* `SLLDense`, `SLLConv`: SDP-based Lipschitz residual layers (Araujo, Havens,
  Delattre, Allauzen & Hu, "A Unified Algebraic Perspective on Lipschitz
  Neural Networks", ICLR 2023, Thm. 3):
  `z = x - 2 W T^(-1) relu(W^T x + b)` with
  `T = diag(sum_j |W^T W|_ij q_j / q_i)`, `q > 0`, is 1-Lipschitz.
* `MaxMin` (GroupSort with groups of 2; Anil, Lucas & Grosse, ICML 2019), a
  gradient-norm-preserving activation; `SpaceToDepth`, a downsampling that is
  an exact isometry; `GlobalNormPool`, the per-channel l2 norm over space.

Every layer follows `mmsafe.models.layers`' contract (`__call__` and
`lipschitz_bound` side by side) and has no normalisation layer with unbounded
gain. Analytic bounds of 1 carry a relative margin `SCALE_ROUNDING` for the
float32 rounding of the rescaling that enforces them.
"""

from __future__ import annotations

from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.manifold.stiefel import random_stiefel
from mmsafe.models.layers import record, spectral_norm
from mmsafe.models.operator_norms import BoundOptions
from mmsafe.models.rescaling import autocorrelation_row_sums, schur_scale
from mmsafe.numerics import HIGHEST

Array = jax.Array
_TINY = 1e-30

# Parameter name of `OrthogonalDense`'s kernel: the optimizer keeps leaves of
# this name on the Stiefel manifold, like the orthogonal head's W~.
ORTHOGONAL_KERNEL = "orthogonal_kernel"
# Relative float32 rounding of a rescaling computed from sums of |Gram| entries.
SCALE_ROUNDING = 1e-6


def _one(module: nn.Module) -> Array:
  return record(module, 1.0 + SCALE_ROUNDING)


def _with_bias(module: nn.Module, y: Array) -> Array:
  """`y` plus the module's bias parameter `[features]` when it has `use_bias`."""
  if not module.use_bias:
    return y
  return y + module.param("bias", nn.initializers.zeros_init(), (module.features,)).astype(y.dtype)


class MaxMin(nn.Module):
  """GroupSort-2 (MaxMin): each pair of channels `(a, b)` becomes
  `(max(a, b), min(a, b))`. 1-Lipschitz and gradient-norm preserving (a
  permutation on each linear piece). Needs an even channel count."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    if x.shape[-1] % 2:
      raise ValueError(f"MaxMin: expected an even number of channels, got {x.shape[-1]}")
    pairs = x.reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    return jnp.concatenate([jnp.max(pairs, -1), jnp.min(pairs, -1)], axis=-1)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, 1.0)


class SpaceToDepth(nn.Module):
  """`[B, H, W, C] -> [B, H/s, W/s, s*s*C]` (zero-padding H, W up to multiples
  of `s`): a permutation after an isometric embedding, so exactly 1-Lipschitz."""

  block: int = 2

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    s = self.block
    pad_h, pad_w = (-x.shape[1]) % s, (-x.shape[2]) % s
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    return einops.rearrange(x, "b (h p) (w q) c -> b h w (p q c)", p=s, q=s)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, 1.0)


class GlobalNormPool(nn.Module):
  """`[B, H, W, C] -> [B, C]`: `sqrt(sum_{h,w} x^2 + 1e-12)` per channel.
  1-Lipschitz: `| ||a_c|| - ||b_c|| | <= ||a_c - b_c||` for every channel."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=(1, 2)) + 1e-12)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, 1.0)


class _DenseLayer(nn.Module):
  """A dense layer `x M + b` whose `[d_in, features]` matrix `M` a subclass
  builds from its parameters (`matrix`)."""

  features: int
  use_bias: bool = True
  dtype: Any = jnp.float32

  def matrix(self, d_in: int) -> Array:
    raise NotImplementedError(type(self).__name__)

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    matrix = self.matrix(x.shape[-1])
    return _with_bias(self, jnp.matmul(x.astype(self.dtype), matrix.astype(self.dtype),
                                       precision=HIGHEST))


class OrthogonalDense(_DenseLayer):
  """`x W^T + b` with `W` of orthonormal rows (`features <= d_in`) or columns
  (`features > d_in`), stored as `[min, max]` with orthonormal rows under
  `ORTHOGONAL_KERNEL`. Bound: the exact spectral norm of the stored kernel
  (1 while the optimizer keeps it on the manifold; any drift is counted)."""

  def matrix(self, d_in: int) -> Array:
    shape = (min(d_in, self.features), max(d_in, self.features))
    kernel = self.param(ORTHOGONAL_KERNEL, lambda key: random_stiefel(key, *shape))
    return kernel.T if self.features <= d_in else kernel

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, spectral_norm(self.variables["params"][ORTHOGONAL_KERNEL])
                  * (1.0 + SCALE_ROUNDING))


class AOLDense(_DenseLayer):
  """AOL dense layer (Prach & Lampert 2022, Thm. 1): the kernel `K [d_in,
  features]` rescaled on its smaller side, `diag(d) K` with
  `d_i = (sum_j |K K^T|_ij)^(-1/2)` when `d_in <= features`, else `K diag(d)`
  with `d_j = (sum_l |K^T K|_jl)^(-1/2)`, so the Gram is `min(d_in,
  features)` wide (a 32000-wide input needs no 32000 x 32000 Gram).

  Bound 1. Proof: for a Gram `M = P^T P` and any `v`,
  `v^T M v <= sum_ij |M_ij| |v_i| |v_j| <= sum_i v_i^2 sum_j |M_ij|`, so
  `diag(d) M diag(d) <= I` and `||P diag(d)|| <= 1`; take `P = K^T` (input
  side) or `P = K` (output side; `||K diag(d)|| = ||diag(d) K^T||`).
  """

  def matrix(self, d_in: int) -> Array:
    kernel = self.param("kernel", nn.initializers.orthogonal(), (d_in, self.features))
    if d_in <= self.features:
      return kernel * schur_scale(autocorrelation_row_sums(kernel[None, None]))[:, None]
    return kernel * schur_scale(autocorrelation_row_sums(kernel.T[None, None]))[None]

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return _one(self)


def _identity_like(key, shape, dtype=jnp.float32):
  """A conv kernel whose centre tap is an orthogonal matrix (a near-identity map)."""
  kh, kw, c_in, c_out = shape
  centre = nn.initializers.orthogonal()(key, (c_in, c_out), dtype)
  return jnp.zeros(shape, dtype).at[kh // 2, kw // 2].set(centre)


class AOLConv(nn.Module):
  """AOL convolution (Prach & Lampert 2022): a zero-padded "SAME" convolution
  whose kernel is rescaled per input channel by
  `d_c = (sum_{delta, c'} |R[c, delta, c']|)^(-1/2)` with `R` the kernel's
  autocorrelation (the kernel of `P^T P`; `rescaling.autocorrelation_row_sums`).

  Bound 1: the same Schur argument as `AOLDense` on the infinite-domain
  convolution; zero padding embeds the input isometrically and the output
  (also after `strides`) is a coordinate projection, neither of which
  increases the norm.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    kernel = self.param("kernel", _identity_like, (*self.kernel_size, x.shape[-1], self.features))
    scale = schur_scale(autocorrelation_row_sums(kernel))
    scaled = kernel * scale[None, None, :, None]
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), scaled.astype(self.dtype), (self.strides, self.strides), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HIGHEST)
    return _with_bias(self, y)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return _one(self)


def _dft_matrices(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """`E_H [H, H]` and the half-spectrum `E_W [W//2+1, W]` of the 2-D real DFT."""
  def dft(n, rows):
    k = np.arange(n)
    return np.exp(-2j * np.pi * np.outer(k[:rows], k) / n).astype(np.complex64)
  return dft(height, height), dft(width, width // 2 + 1)


def _rfft2(x: Array, height: int, width: int) -> Array:
  """`jnp.fft.rfft2(x, axes=(1, 2))` of `[B, H, W, C]` as two matrix products.

  Written with DFT matrices rather than `jnp.fft`: XLA:CPU (jax 0.10) can
  deadlock when FFT operations of one program run concurrently on its thread
  pool, and at the small spatial sizes of these layers the products are cheap.
  """
  e_h, e_w = _dft_matrices(height, width)
  return jnp.einsum("hn,bnmc,wm->bhwc", e_h, x.astype(jnp.complex64), e_w, precision=HIGHEST)


def _irfft2(y_hat: Array, height: int, width: int) -> Array:
  """`jnp.fft.irfft2(y_hat, s=(H, W), axes=(1, 2))` as two matrix products (the
  imaginary parts of the zero and Nyquist columns are dropped, as irfft does)."""
  e_h, e_w = _dft_matrices(height, width)
  columns = np.full(width // 2 + 1, 2.0, np.float32)
  columns[0] = 1.0
  if width % 2 == 0:
    columns[-1] = 1.0
  inverse_w = (np.conj(e_w).T * columns[None]).astype(np.complex64) / width  # [W, W//2+1]
  rows = jnp.einsum("nh,bhwc->bnwc", np.conj(e_h).T / height, y_hat, precision=HIGHEST)
  return jnp.real(jnp.einsum("bnwc,mw->bnmc", rows, inverse_w, precision=HIGHEST))


def _cayley_spectrum(kernel: Array, alpha: Array, height: int, width: int) -> Array:
  """Per-frequency unitary matrices `[H, W//2+1, C, C]` of the Cayley convolution."""
  norm = jnp.sqrt(jnp.sum(jnp.square(kernel)))
  v = (kernel * (alpha / jnp.maximum(norm, _TINY))).astype(jnp.complex64)
  e_h, e_w = _dft_matrices(height, width)
  kh, kw = kernel.shape[:2]
  v_hat = jnp.einsum("hp,wq,pqij->hwij", e_h[:, :kh], e_w[:, :kw], v, precision=HIGHEST)
  return cayley_transform(v_hat - jnp.conj(jnp.swapaxes(v_hat, -1, -2)))


def _accretive_inverse(m: Array) -> Array:
  """`m^(-1)` for a batch `[..., C, C]` whose Hermitian part is positive
  definite, by Gauss-Jordan elimination without pivoting (no LAPACK call).

  Every leading block of such a matrix has a positive definite Hermitian
  part too, so no pivot vanishes and the elimination is stable. Batched
  LAPACK calls are avoided on purpose: on XLA:CPU (jax 0.10) two of them
  running at once can deadlock the thread pool they both wait on.
  """
  size = m.shape[-1]
  augmented = jnp.concatenate([m, jnp.broadcast_to(jnp.eye(size, dtype=m.dtype), m.shape)], -1)

  def eliminate(i, augmented):
    pivot_row = augmented[..., i, :] / augmented[..., i, i][..., None]
    column = augmented[..., :, i].at[..., i].set(0.0)
    augmented = augmented - column[..., :, None] * pivot_row[..., None, :]
    return augmented.at[..., i, :].set(pivot_row)

  return jax.lax.fori_loop(0, size, eliminate, augmented)[..., size:]


@jax.custom_vjp
def cayley_transform(a: Array) -> Array:
  """`Q = (I + A)^(-1) (I - A) = 2 (I + A)^(-1) - I` for skew-Hermitian `A`
  `[..., C, C]`: unitary. Its derivative needs no second inverse, since
  `(I + A)^(-1) = (I + Q) / 2`: `dQ = -2 N dA N` with `N = (I + Q) / 2`."""
  eye = jnp.eye(a.shape[-1], dtype=a.dtype)
  return 2.0 * _accretive_inverse(eye + a) - eye


def _cayley_forward(a):
  q = cayley_transform(a)
  return q, q


def _cayley_backward(q, q_bar):
  # JAX's cotangent of a holomorphic map is the plain transpose: A_bar = -2 N^T Q_bar N^T.
  eye = jnp.eye(q.shape[-1], dtype=q.dtype)
  n_t = jnp.swapaxes((eye + q) / 2.0, -1, -2)
  return (-2.0 * jnp.matmul(jnp.matmul(n_t, q_bar, precision=HIGHEST), n_t,
                            precision=HIGHEST),)


cayley_transform.defvjp(_cayley_forward, _cayley_backward)


def schur_operator_norm(block: Array) -> Array:
  """An upper bound on `max` over the batch of the spectral norm of `block
  [..., m, n]`: `sqrt(max_i sum_j |G_ij|)` for the smaller Gram `G` (`B B^H`
  when `m < n`, else `B^H B`): the Schur test, exact up to rounding when the
  rows (or columns) are orthonormal, computed without a batched SVD (see
  `_accretive_inverse`)."""
  adjoint = jnp.conj(jnp.swapaxes(block, -1, -2))
  gram = (jnp.matmul(block, adjoint, precision=HIGHEST) if block.shape[-2] < block.shape[-1]
          else jnp.matmul(adjoint, block, precision=HIGHEST))
  return jnp.sqrt(jnp.max(jnp.sum(jnp.abs(gram), axis=-1)))


class CayleyConv(nn.Module):
  """Orthogonal circular convolution by the Cayley transform in the Fourier
  domain (Trockman & Kolter, ICLR 2021).

  The kernel `V [kh, kw, C, C]` (`C = max(C_in, C_out)`, scaled to Frobenius
  norm `alpha`, a learned scalar as in the paper) is zero-padded to the input's
  `H x W` and Fourier transformed; at every frequency `A = V^ - V^H` is
  skew-Hermitian, so `Q = (I + A)^(-1) (I - A)` is unitary, and `y^ = Q x^`
  (inputs zero-padded to `C` channels, the first `C_out` outputs kept).
  Conjugate symmetry of a real kernel's spectrum keeps `y` real. Bound: the
  operator norm is the `max` over frequencies of the largest singular value
  of the used block of `Q`, bounded by the Schur test on its Gram matrix
  (`schur_operator_norm`; 1 up to rounding). The transforms are DFT matrix
  products (`_rfft2`), cost `O(HW (H + W))` per channel: meant for the small
  images and spectrograms it is used on.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  use_bias: bool = True
  dtype: Any = jnp.float32

  def _spectrum(self, x: Array) -> tuple[Array, int]:
    channels = max(x.shape[-1], self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, channels, channels))
    alpha = self.param("alpha", lambda _: jnp.sqrt(jnp.sum(jnp.square(kernel))))
    return _cayley_spectrum(kernel, alpha, x.shape[1], x.shape[2]), channels

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    q, channels = self._spectrum(x)
    c_in, (height, width) = x.shape[-1], x.shape[1:3]
    x = jnp.pad(x.astype(jnp.float32), ((0, 0),) * 3 + ((0, channels - c_in),))
    y_hat = jnp.einsum("hwij,bhwj->bhwi", q, _rfft2(x, height, width), precision=HIGHEST)
    return _with_bias(self, _irfft2(y_hat, height, width)[..., :self.features]).astype(self.dtype)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del options
    params = self.variables["params"]
    q = _cayley_spectrum(params["kernel"], params["alpha"], x.shape[1], x.shape[2])
    block = q[..., :self.features, :x.shape[-1]]
    return record(self, schur_operator_norm(block) * (1.0 + SCALE_ROUNDING))


class SLLDense(nn.Module):
  """SDP-based Lipschitz layer on vectors (Araujo et al., ICLR 2023, Thm. 3):
  `z = x - 2 W T^(-1) relu(W^T x + b)`, `W [d, hidden]`,
  `T_ii = sum_j |W^T W|_ij q_j / q_i` with learned `q = exp(log_q)`. Bound 1.
  Keeps the width `d`."""

  hidden: int | None = None  # None: the input width
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    width = x.shape[-1]
    hidden = self.hidden or width
    kernel = self.param("kernel", nn.initializers.orthogonal(), (width, hidden))
    bias = self.param("bias", nn.initializers.zeros_init(), (hidden,))
    q = jnp.exp(self.param("log_q", nn.initializers.zeros_init(), (hidden,)))
    inverse_t = jnp.square(schur_scale(autocorrelation_row_sums(kernel.T[None, None], q)))
    x = x.astype(jnp.float32)
    h = nn.relu(jnp.matmul(x, kernel, precision=HIGHEST) + bias)
    return (x - 2.0 * jnp.matmul(h * inverse_t, kernel.T, precision=HIGHEST)).astype(self.dtype)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return _one(self)


class SLLConv(nn.Module):
  """SDP-based Lipschitz residual convolution (Araujo et al., ICLR 2023):
  `z = x - 2 P^T T^(-1) relu(P x + b)` for the zero-padded "SAME" convolution
  `P` (kernel `[kh, kw, C, C]`), its exact adjoint `P^T`
  (`jax.linear_transpose`) and `T_ii = sum_{delta, j} |R[i, delta, j]| q_j / q_i`
  with `R` the autocorrelation of `P P^T` (`autocorrelation_row_sums` of the
  kernel with its channel axes swapped). Bound 1: Thm. 3 needs
  `P P^T <= T`, which holds for the infinite-domain convolution by the Schur
  argument, and zero padding only removes terms.
  """

  kernel_size: tuple[int, int] = (3, 3)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, channels, channels))
    bias = self.param("bias", nn.initializers.zeros_init(), (channels,))
    q = jnp.exp(self.param("log_q", nn.initializers.zeros_init(), (channels,)))
    sums = autocorrelation_row_sums(jnp.swapaxes(kernel, 2, 3), q)
    inverse_t = jnp.square(schur_scale(sums))
    x = x.astype(jnp.float32)

    def conv(v):
      return jax.lax.conv_general_dilated(v, kernel, (1, 1), "SAME",
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          precision=HIGHEST)

    h = nn.relu(conv(x) + bias) * inverse_t
    (adjoint,) = jax.linear_transpose(conv, x)(h)
    return (x - 2.0 * adjoint).astype(self.dtype)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return _one(self)

