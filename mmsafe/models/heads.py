"""Fusion heads: concatenation (joint training, JT) and orthogonal (OJT / CRMT).

Both map per-modality features `{m: phi^(m) [B, d_m]}` to
`(scores {m: [B, K]}, logits [B, K], HeadParams)`; see `outputs.ModelOutput`.
The head always computes in float32 at full matmul precision, whatever the
encoders' dtype, because the bounds are read off its outputs.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsafe.manifold.stiefel import random_stiefel
from mmsafe.models.lipschitz_layers import ORTHOGONAL_KERNEL
from mmsafe.models.outputs import HeadParams
from mmsafe.numerics import HIGHEST

Array = jax.Array

# Name of the parameter collection entry that holds the orthonormal-row
# matrices W~^(m); the optimizer keeps these leaves, and the kernels of
# `OrthogonalDense` encoder layers, on the Stiefel manifold.
STIEFEL_PARAM = "w_tilde"
STIEFEL_PARAMS = (STIEFEL_PARAM, ORTHOGONAL_KERNEL)


def _keys(path: tuple) -> list:
  return [getattr(entry, "key", None) for entry in path]


def is_stiefel_leaf(path: tuple, leaf: Array) -> bool:
  """Whether a parameter leaf (by its pytree key path) is kept on the Stiefel
  manifold: an orthogonal head's W~ or an `OrthogonalDense` kernel."""
  del leaf
  return any(key in STIEFEL_PARAMS for key in _keys(path))


def is_modality_weight(path: tuple, leaf: Array) -> bool:
  """Whether a parameter leaf (by its key path from the parameters' root) is an
  orthogonal head's `a^(m)`: exactly the path `head / a / <modality>`."""
  del leaf
  keys = _keys(path)
  return len(keys) == 3 and keys[:2] == ["head", "a"]


def _matmul(x: Array, kernel: Array) -> Array:
  return jnp.matmul(x.astype(jnp.float32), kernel, precision=HIGHEST)


class ConcatHead(nn.Module):
  """`h(x) = sum_m W^(m) phi^(m)(x^(m)) + b` (CRMT eq. 3): one linear layer on the
  concatenated features, stored as one [d_m, K] block per modality.

  Initialised like a linear layer on the concatenation: uniform in
  `+-1/sqrt(sum_m d_m)` for kernels and bias.
  """

  num_classes: int

  @nn.compact
  def __call__(self, features: Mapping[str, Array]):
    modalities = sorted(features)
    fan_in = sum(features[m].shape[-1] for m in modalities)
    bound = 1.0 / jnp.sqrt(fan_in)
    uniform = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    kernels = {
        m: self.param(f"kernel_{m}", uniform, (features[m].shape[-1], self.num_classes))
        for m in modalities
    }
    bias = self.param("bias", uniform, (self.num_classes,))
    scores = {m: _matmul(features[m], kernels[m]) for m in modalities}
    logits = sum(scores.values()) + bias
    return scores, logits, HeadParams(kind="concat", bias=bias, kernels=kernels, weights={})


class OrthogonalHead(nn.Module):
  """`h~_k(x) = sum_m a^(m)_k W~^(m)_k phi^(m)(x^(m)) + b~_k` (CRMT eq. 8).

  `W~^(m)` ([K, d_m], parameter `w_tilde/<m>`) has orthonormal rows and is
  initialised uniformly on the Stiefel manifold; the optimizer must keep it there
  (`mmsafe.manifold.stiefel_transform` with `is_stiefel_leaf`). The per-class
  modality weights `a^(m)` start at `weight_init` (0.1 in the paper's code).
  """

  num_classes: int
  weight_init: float = 0.1

  @nn.compact
  def __call__(self, features: Mapping[str, Array]):
    modalities = sorted(features)
    dims = {m: features[m].shape[-1] for m in modalities}
    for m, d in dims.items():
      if d < self.num_classes:
        raise ValueError(
            f"orthogonal head: modality {m!r} has feature dimension {d}, but an "
            f"orthonormal-row W~ of shape [K, d] needs d >= K = {self.num_classes}")

    def init_w_tilde(key):
      keys = jax.random.split(key, len(modalities))
      return {m: random_stiefel(k, self.num_classes, dims[m]) for m, k in zip(modalities, keys)}

    w_tilde = self.param(STIEFEL_PARAM, init_w_tilde)
    weights = self.param(
        "a", lambda _: {m: jnp.full((self.num_classes,), self.weight_init, jnp.float32)
                        for m in modalities})
    bias = self.param("bias", nn.initializers.zeros_init(), (self.num_classes,), jnp.float32)
    kernels = {m: w_tilde[m].T for m in modalities}
    scores = {m: _matmul(features[m], kernels[m]) for m in modalities}
    logits = sum(weights[m] * scores[m] for m in modalities) + bias
    return scores, logits, HeadParams(
        kind="orthogonal", bias=bias, kernels=kernels, weights=dict(weights))


HEADS = {"concat": ConcatHead, "orthogonal": OrthogonalHead}
