"""Layers that state their own Lipschitz bound, and `Chain`, which composes them.

Every layer here is a Flax Linen module with two methods side by side:

    __call__(x, train=False) -> y          the layer itself, on a batch [B, ...]
    lipschitz_bound(x, options) -> Array   a scalar upper bound on the l2 Lipschitz
                                           constant of the per-example map x_b -> y_b

The bound holds in eval mode (batch norm with its running statistics) for every
input of `x`'s per-example shape; `x` itself is only read for its shape (a zero
example will do). `options` (`BoundOptions`) says how operator norms are
computed. Each bound is also recorded ("sown") in the `"lipschitz"` collection
under the layer's path, so `apply(..., mutable=["lipschitz"])` reports it layer
by layer.

`Chain` runs its layers in order and multiplies their bounds, walking the same
list in both methods: an encoder built as a `Chain` cannot compute something its
bound does not cover, and a layer without a stated bound is refused by name.

Free layers (this file): `Dense` and `Conv` (exact or power-iterated operator
norms), `ConvBatchNorm` (batch norm folded into the convolution), `ReLU`,
`AvgPool` (exact norm), `MaxPool` (`sqrt` of the windows per input), `Flatten`,
`GlobalMeanPool` and the ResNet `ResidualBlock`. The 1-Lipschitz layers are in
`mmsafe.models.lipschitz_layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsafe.models.operator_norms import (ROUNDING_MARGIN, BoundOptions, avg_pool_operator_norm,
                                          conv_operator_norm, max_pool_lipschitz)

Array = jax.Array
LIPSCHITZ_COLLECTION = "lipschitz"


def record(module: nn.Module, bound: Array | float) -> Array:
  """Sows `bound` into the "lipschitz" collection at `module`'s path; returns it."""
  bound = jnp.asarray(bound, jnp.float32)
  module.sow(LIPSCHITZ_COLLECTION, "bound", bound)
  return bound


def spectral_norm(matrix: Array) -> Array:
  """The exact largest singular value of a matrix (float32, full precision)."""
  return jnp.linalg.svd(matrix.astype(jnp.float32), compute_uv=False)[0]


def _static(value: Any) -> Any:
  """Lists (as configs give them) as tuples, so they can be static jit arguments."""
  if isinstance(value, (list, tuple)):
    return tuple(_static(v) for v in value)
  return value


def _pairs(value: int | Sequence[int], rank: int = 2) -> tuple[int, ...]:
  return (value,) * rank if isinstance(value, int) else tuple(value)


class Chain(nn.Module):
  """Layers run in order (`make_layers`); the bound is the product of theirs.

  Subclasses list their layers in `make_layers()` (called once in `setup`)
  and may set `FRAME_RANK`: the per-example rank of an image (3 for
  `[H, W, C]`). An input with one more axis is a clip `[B, T, H, W, C]`: its
  frames are folded into the batch, encoded alone and their features
  averaged, which multiplies the bound by `1/sqrt(T)` because
  `||(1/T) sum_t d_t|| <= (1/sqrt(T)) sqrt(sum_t ||d_t||^2)`.
  """

  FRAME_RANK = None

  def make_layers(self) -> Sequence[nn.Module]:
    raise NotImplementedError(f"{type(self).__name__}.make_layers")

  def setup(self):
    self.layers = list(self.make_layers())

  def _frames(self, x: Array) -> int | None:
    if self.FRAME_RANK is not None and x.ndim == self.FRAME_RANK + 2:
      return x.shape[1]
    return None

  def __call__(self, x: Array, train: bool = False) -> Array:
    frames = self._frames(x)
    x = x.astype(getattr(self, "dtype", jnp.float32))
    if frames is not None:
      x = einops.rearrange(x, "b t ... -> (b t) ...")
    for layer in self.layers:
      x = layer(x, train=train)
    if frames is not None:
      x = einops.reduce(x, "(b t) d -> b d", "mean", t=frames)
    return x

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    frames = self._frames(x)
    x = x.astype(getattr(self, "dtype", jnp.float32))
    if frames is not None:
      x = einops.rearrange(x, "b t ... -> (b t) ...")[:1]
    bound = jnp.float32(1.0)
    for layer in self.layers:
      if not hasattr(layer, "lipschitz_bound"):
        raise NotImplementedError(
            f"sound Lipschitz bound: layer {'/'.join(layer.path)} ({type(layer).__name__}) "
            f"of {type(self).__name__} states no Lipschitz bound")
      bound = bound * layer.lipschitz_bound(x, options)
      x = layer(x, train=False)
    if frames is not None:
      bound = bound / math.sqrt(frames)
    return record(self, bound)


class Dense(nn.Dense):
  """`nn.Dense`; bound: the kernel's exact spectral norm (+ the rounding margin)."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return super().__call__(x)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, spectral_norm(self.variables["params"]["kernel"])
                  * (1.0 + ROUNDING_MARGIN))


class Conv(nn.Conv):
  """`nn.Conv`; bound: the exact (or power-iterated) norm of its linear map on
  this input's spatial shape, borders, strides, dilations and feature groups
  included (`conv_operator_norm`). Circular, reflecting and causal padding and
  kernel masks state no bound (refused by name)."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return super().__call__(x)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    unbounded = ([f"padding={self.padding!r}"] if isinstance(self.padding, str)
                 and self.padding.upper() not in ("SAME", "VALID") else [])
    unbounded += ["mask"] if self.mask is not None else []
    if unbounded:
      where = "/".join(self.path) or self.name
      raise NotImplementedError(f"sound Lipschitz bound: layer {where} (Conv) states no bound "
                                f"with {', '.join(unbounded)}")
    kernel = self.variables["params"]["kernel"]
    return record(self, conv_operator_norm(
        kernel, None, in_shape=tuple(x.shape[1:]), strides=_pairs(self.strides),
        padding=_static(self.padding), kernel_dilation=_pairs(self.kernel_dilation or 1),
        input_dilation=_pairs(self.input_dilation or 1),
        feature_group_count=self.feature_group_count, **options.for_layer(self.path)))


class ConvBatchNorm(nn.Module):
  """`BatchNorm(Conv(x))` without a conv bias (ResNet); bound: the norm of the
  convolution with the eval-mode batch norm folded in as a per-channel scale
  `gamma / sqrt(var + epsilon)` (the shift does not change Lipschitz constants)."""

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  padding: Any = "SAME"
  dtype: Any = jnp.float32
  axis_name: str | None = None  # batch-norm statistics over this pmap axis (None: local)
  momentum: float = 0.9
  epsilon: float = 1e-5

  def setup(self):
    self.conv = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                        use_bias=False, dtype=self.dtype)
    self.norm = nn.BatchNorm(momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype,
                             axis_name=self.axis_name)

  def __call__(self, x: Array, train: bool = False) -> Array:
    return self.norm(self.conv(x), use_running_average=not train)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    if "batch_stats" not in self.norm.variables:
      raise ValueError(f"sound Lipschitz bound: {'/'.join(self.path)} needs its batch-norm "
                       f"running statistics (the 'batch_stats' collection); got only "
                       f"{sorted(self.norm.variables)}")
    gamma = self.norm.variables["params"]["scale"].astype(jnp.float32)
    var = self.norm.variables["batch_stats"]["var"].astype(jnp.float32)
    return record(self, conv_operator_norm(
        self.conv.variables["params"]["kernel"], gamma / jnp.sqrt(var + self.epsilon),
        in_shape=tuple(x.shape[1:]), strides=_pairs(self.strides),
        padding=_static(self.padding), **options.for_layer(self.path)))


class ReLU(nn.Module):
  """`max(x, 0)`: 1-Lipschitz."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return nn.relu(x)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, 1.0)


class KeptIndicator(nn.Module):
  """`x -> [x, 1{x != 0}]` along the last (channel) axis: tells a voter which
  entries an ablation kept (`mmsafe.certify.ablation` sets the others to
  exactly 0, the training mean), so "missing" and "small" are two inputs, not
  one. A kept entry exactly at the mean reads as missing; both carry the value 0.

  The indicator is discontinuous: the layer states no Lipschitz bound, so a
  sound certificate of an encoder that uses it refuses (`Chain.lipschitz_bound`).
  An ablation certificate needs none: it holds for any base classifier.
  """

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return jnp.concatenate([x, (x != 0).astype(x.dtype)], axis=-1)


class Flatten(nn.Module):
  """`[B, ...] -> [B, D]`: an isometry."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return x.reshape(x.shape[0], -1)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del x, options
    return record(self, 1.0)


class AvgPool(nn.Module):
  """`nn.avg_pool` on `[B, H, W, C]`; bound: its exact operator norm on this
  input's spatial shape (1/2 for disjoint 2x2 windows; `avg_pool_operator_norm`)."""

  window: tuple[int, int] = (2, 2)
  strides: tuple[int, int] = (2, 2)
  padding: Any = "SAME"

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return nn.avg_pool(x, self.window, strides=self.strides, padding=self.padding)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    return record(self, avg_pool_operator_norm(
        in_shape=tuple(x.shape[1:3]), window=_static(self.window),
        strides=_static(self.strides), padding=_static(self.padding),
        **options.for_layer(self.path)))


class MaxPool(nn.Module):
  """`nn.max_pool` with explicit padding; bound `sqrt(max windows per input)`
  (`max_pool_lipschitz`: 2 for ResNet's overlapping 3x3/2 windows)."""

  window: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (2, 2)
  padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return nn.max_pool(x, self.window, strides=self.strides, padding=self.padding)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del options
    return record(self, max_pool_lipschitz(tuple(x.shape[1:3]), self.window, self.strides,
                                           self.padding))


class GlobalMeanPool(nn.Module):
  """Mean over the spatial axes `[B, H, W, C] -> [B, C]`: exactly `1/sqrt(HW)`."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    return jnp.mean(x, axis=(1, 2))

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    del options
    return record(self, 1.0 / math.sqrt(x.shape[1] * x.shape[2]))


class ResidualBlock(nn.Module):
  """ResNet basic block `relu(F(x) + shortcut(x))`, `F = conv-bn-relu-conv-bn`.

  `project`: a 1x1 conv-bn shortcut (when the width or the stride changes);
  otherwise the identity. Bound `Lip(shortcut) + Lip(conv-bn) Lip(conv-bn)`
  (`||I + F|| <= 1 + ||F||`; the ReLUs are 1-Lipschitz).
  """

  filters: int
  strides: int = 1
  project: bool = False
  dtype: Any = jnp.float32
  axis_name: str | None = None

  def setup(self):
    same = ((1, 1), (1, 1))
    stride = (self.strides, self.strides)
    self.conv_bn_0 = ConvBatchNorm(self.filters, (3, 3), stride, same, self.dtype,
                                   self.axis_name)
    self.conv_bn_1 = ConvBatchNorm(self.filters, (3, 3), (1, 1), same, self.dtype,
                                   self.axis_name)
    if self.project:
      self.shortcut = ConvBatchNorm(self.filters, (1, 1), stride, "SAME", self.dtype,
                                    self.axis_name)

  def __call__(self, x: Array, train: bool = False) -> Array:
    y = self.conv_bn_1(nn.relu(self.conv_bn_0(x, train)), train)
    shortcut = self.shortcut(x, train) if self.project else x
    return nn.relu(shortcut + y)

  def lipschitz_bound(self, x: Array, options: BoundOptions) -> Array:
    first = self.conv_bn_0.lipschitz_bound(x, options)
    second = self.conv_bn_1.lipschitz_bound(self.conv_bn_0(x), options)
    shortcut = self.shortcut.lipschitz_bound(x, options) if self.project else 1.0
    return record(self, shortcut + first * second)
