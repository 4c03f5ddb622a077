"""Uni-modal encoders `phi^(m)`: ResNet18 (images, spectrograms, flow stacks,
videos), a small CNN and an MLP for small inputs.

Every encoder maps one modality's batch `[B, *example_shape]` to features
`[B, d_m]`. Layers are plain Flax Linen layers (Dense, Conv, BatchNorm, average
pooling, ReLU) so that `mmsafe.certify` can bound their Lipschitz constants
layer by layer.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class MLPEncoder(nn.Module):
  """Flatten, then `Dense -> ReLU` for each width; the last activation is phi."""

  widths: Sequence[int] = (256, 128)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for width in self.widths:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return x


class SmallCNN(nn.Module):
  """`[Conv3x3 -> ReLU -> AvgPool2]` per channel width, then `Dense -> ReLU`.

  For small images such as 16x15 digits or short spectrograms `[B, H, W, C]`.
  Average (not max) pooling keeps the network's Lipschitz constant easy to bound.
  """

  channels: Sequence[int] = (32, 64)
  features: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    del train
    x = x.astype(self.dtype)
    for width in self.channels:
      x = nn.relu(nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype)(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    x = x.reshape(x.shape[0], -1)
    return nn.relu(nn.Dense(self.features, dtype=self.dtype)(x))


class ResidualBlock(nn.Module):
  """ResNet basic block: `relu(F(x) + shortcut(x))` with F = conv-bn-relu-conv-bn."""

  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  axis_name: str | None = None  # batch-norm statistics over this pmap axis (None: local)

  @nn.compact
  def __call__(self, x: Array, train: bool) -> Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, axis_name=self.axis_name)
    y = conv(self.filters, (3, 3), (self.strides, self.strides), padding=((1, 1), (1, 1)))(x)
    y = nn.relu(norm()(y))
    y = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)))(y)
    y = norm()(y)
    if x.shape[-1] != self.filters or self.strides != 1:
      x = conv(self.filters, (1, 1), (self.strides, self.strides), name="shortcut_conv")(x)
      x = norm(name="shortcut_norm")(x)
    return nn.relu(x + y)


class ResNet18(nn.Module):
  """ResNet18 (He et al. 2016) for images `[B, H, W, C]` or clips `[B, T, H, W, C]`.

  Any number of input channels (3 for RGB, 1 for spectrograms, 2 for optical
  flow stacks). Clip frames are folded into the batch, encoded independently and
  their globally pooled 512-d features averaged over time, as in the CRMT
  reference code. `axis_name`: under `jax.pmap`, the named axis over which
  training-mode batch-norm statistics are averaged (None: this device's batch;
  `jax.jit` over a sharded global batch needs none).
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x: Array, train: bool = False) -> Array:
    frames = x.shape[1] if x.ndim == 5 else None
    if frames is not None:
      x = einops.rearrange(x, "b t h w c -> (b t) h w c")
    x = x.astype(self.dtype)
    x = nn.Conv(self.widths[0], (7, 7), (2, 2), padding=((3, 3), (3, 3)), use_bias=False,
                dtype=self.dtype, name="stem_conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                     dtype=self.dtype, axis_name=self.axis_name, name="stem_norm")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, strides, dtype=self.dtype, axis_name=self.axis_name)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    if frames is not None:
      x = einops.reduce(x, "(b t) d -> b d", "mean", t=frames)
    return x


ENCODERS = {"mlp": MLPEncoder, "cnn": SmallCNN, "resnet18": ResNet18}
