"""The AOL / SLL rescaling of a kernel: Schur-test row sums of its conv Gram.

AOL (Prach & Lampert, ECCV 2022, Thm. 1) rescales a kernel `P` by
`d_i = (sum_j |P^T P|_ij)^(-1/2)`; SLL (Araujo et al., ICLR 2023, Thm. 3)
divides by `T_ii = sum_j |W^T W|_ij q_j / q_i`. For a convolution both sums
run over the kernel's autocorrelation. They depend only on the parameters, so
a train step computes each once (jit shares them between the forward and the
backward pass), at a cost independent of the batch and the input size.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.numerics import HIGHEST

Array = jax.Array
_TINY = 1e-30


def _tap_pairs(kh: int, kw: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The tap pairs `(a, b)` of a `kh x kw` kernel with `a` after `b` in raster
  order, and the 0/1 matrix `[shifts, pairs]` grouping them by their shift
  `pos(a) - pos(b)` (every shift of one half-plane)."""
  later, earlier = np.tril_indices(kh * kw, -1)
  shifts = list(zip(later // kw - earlier // kw, later % kw - earlier % kw))
  unique = sorted(set(shifts))
  group = np.zeros((len(unique), len(shifts)), np.float32)
  group[[unique.index(shift) for shift in shifts], np.arange(len(shifts))] = 1.0
  return later, earlier, group


def autocorrelation_row_sums(kernel: Array, q: Array | None = None) -> Array:
  """`s_i = sum_{delta, j} |R[i, delta, j]| q_j / q_i` (`q = 1` unless given),
  the sums of the AOL and SLL rescalings, for the autocorrelation
  `R[i, delta, j] = sum_{p, o} K[p + delta, i, o] K[p, j, o]` of a conv kernel
  `K [kh, kw, C_in, C_out]`: the kernel of `P^T P` for the convolution `P`
  (for `kh = kw = 1` the Gram `K K^T`). Shape `[C_in]`.

  Only products of tap pairs are formed: `R(delta)` is the sum of
  `K[a] K[b]^T` over the taps with `pos(a) - pos(b) = delta`, and
  `R(-delta) = R(delta)^T`, so the pairs with `a` after `b` give one half of
  the shifts and their transposes the other: `(k^2 (k^2 + 1) / 2) C_in^2 C_out`
  multiply-adds (45 C^3 for 3x3), against 225 C^3 for the products of every
  shifted window of the zero-padded kernel.
  """
  if kernel.ndim != 4:
    raise ValueError(f"autocorrelation_row_sums: expected a kernel [kh, kw, C_in, C_out], "
                     f"got shape {kernel.shape}")
  kh, kw, c_in, c_out = kernel.shape
  q = jnp.ones((c_in,), kernel.dtype) if q is None else q
  chex.assert_shape(q, (c_in,))
  taps = kernel.reshape(kh * kw, c_in, c_out)
  centre = jnp.abs(jnp.einsum("pio,pjo->ij", taps, taps, precision=HIGHEST))
  sums = jnp.matmul(centre, q, precision=HIGHEST)
  if kh * kw > 1:
    later, earlier, group = _tap_pairs(kh, kw)
    pairs = jnp.einsum("pio,pjo->pij", taps[later], taps[earlier], precision=HIGHEST)
    half = jnp.abs(jnp.einsum("sp,pij->sij", group, pairs, precision=HIGHEST))
    sums = (sums + jnp.einsum("sij,j->i", half, q, precision=HIGHEST)
            + jnp.einsum("sji,j->i", half, q, precision=HIGHEST))
  return sums / q


def schur_scale(row_sums: Array) -> Array:
  """`s^(-1/2)` for the row sums `s` of `autocorrelation_row_sums` (the AOL
  rescaling `d`; its square is SLL's `T^(-1)`)."""
  return jax.lax.rsqrt(jnp.maximum(row_sums, _TINY))
