"""Uni-modal encoders `phi^(m)`, each a `Chain` of layers that state their bounds.

Every encoder maps one modality's batch `[B, *example_shape]` to features
`[B, d_m]` and has `lipschitz_bound(x, options)`: an upper bound on the l2
Lipschitz constant of `phi^(m)` (eval mode), the product of its layers' own
bounds (`mmsafe.models.layers`), which `mmsafe.certify` uses for sound radii.

Free encoders (batch norm folded into the convolutions for the bound):

* `MLPEncoder` ("mlp"): `Dense -> ReLU` per width.
* `SmallCNN` ("cnn"): `[Conv3x3 -> ReLU -> AvgPool2]` per width, `Dense -> ReLU`.

Both take `kept_indicator=True` for ablated (sparse) inputs: a second channel
marks the entries an ablation kept (`layers.KeptIndicator`; no Lipschitz bound).
* `ResNet18` ("resnet18"): images, spectrograms, flow stacks or clips.

Lipschitz encoders (1-Lipschitz by construction, `mmsafe.models.lipschitz_layers`;
no normalisation layers):

* `LipschitzMLP` ("lip_mlp"): `Dense -> MaxMin` per width (dense "aol" or
  "orthogonal"), optional SLL residual blocks.
* `LipschitzCNN` ("lip_cnn"): `Conv -> MaxMin -> SLL blocks` per width with
  `SpaceToDepth` downsampling (conv "aol" or "cayley"), then `Dense -> MaxMin`.
* `LipschitzResNet` ("lip_resnet"): SLL residual stages for Kinetics-Sounds
  shapes (images or clips), global l2-norm pooling, `Dense`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmsafe.models.layers import (AvgPool, Chain, Conv, ConvBatchNorm, Dense, Flatten,
                                  GlobalMeanPool, KeptIndicator, MaxPool, ReLU, ResidualBlock)
from mmsafe.models.lipschitz_layers import (AOLConv, AOLDense, CayleyConv, GlobalNormPool, MaxMin,
                                            OrthogonalDense, SLLConv, SLLDense, SpaceToDepth)

DENSE_LAYERS = {"aol": AOLDense, "orthogonal": OrthogonalDense}
CONV_LAYERS = {"aol": AOLConv, "cayley": CayleyConv}


def _choice(encoder: str, field: str, value: str, choices: dict) -> Any:
  if value not in choices:
    raise ValueError(f"{encoder}.{field}: expected one of {sorted(choices)}, got {value!r}")
  return choices[value]


def _even(encoder: str, field: str, widths: Sequence[int]) -> None:
  odd = [w for w in widths if w % 2]
  if odd:
    raise ValueError(f"{encoder}.{field}: expected even widths (MaxMin pairs channels), "
                     f"got {tuple(widths)}")


class MLPEncoder(Chain):
  """Flatten, then `Dense -> ReLU` for each width; the last activation is phi
  (`kept_indicator`: the kept-entry indicator is appended first)."""

  widths: Sequence[int] = (256, 128)
  kept_indicator: bool = False
  dtype: Any = jnp.float32

  def make_layers(self):
    layers = [Flatten()] + ([KeptIndicator()] if self.kept_indicator else [])
    for i, width in enumerate(self.widths):
      layers += [Dense(width, dtype=self.dtype, name=f"Dense_{i}"), ReLU()]
    return layers


class SmallCNN(Chain):
  """`[Conv3x3 -> ReLU -> AvgPool2]` per channel width, then `Dense -> ReLU`.

  For small images such as 16x15 digits or short spectrograms `[B, H, W, C]`.
  Average (not max) pooling keeps the network's Lipschitz constant easy to bound.
  `kept_indicator`: each channel gets its kept-entry indicator channel first
  (for ablated inputs).
  """

  channels: Sequence[int] = (32, 64)
  features: int = 128
  kept_indicator: bool = False
  dtype: Any = jnp.float32

  def make_layers(self):
    layers = [KeptIndicator()] if self.kept_indicator else []
    for i, width in enumerate(self.channels):
      layers += [Conv(width, (3, 3), padding="SAME", dtype=self.dtype, name=f"Conv_{i}"),
                 ReLU(), AvgPool((2, 2), (2, 2), "SAME")]
    return layers + [Flatten(), Dense(self.features, dtype=self.dtype, name="Dense_0"), ReLU()]


class ResNet18(Chain):
  """ResNet18 (He et al. 2016) for images `[B, H, W, C]` or clips `[B, T, H, W, C]`.

  Any number of input channels (3 for RGB, 1 for spectrograms, 2 for optical
  flow stacks). Clip frames are folded into the batch, encoded independently and
  their globally pooled 512-d features averaged over time, as in the CRMT
  reference code. `axis_name`: under `jax.pmap`, the named axis over which
  training-mode batch-norm statistics are averaged (None: this device's batch;
  `jax.jit` over a sharded global batch needs none).
  """

  FRAME_RANK = 3

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32
  axis_name: str | None = None

  def make_layers(self):
    layers = [ConvBatchNorm(self.widths[0], (7, 7), (2, 2), ((3, 3), (3, 3)), self.dtype,
                            self.axis_name, name="stem"),
              ReLU(name="stem_relu"), MaxPool((3, 3), (2, 2), ((1, 1), (1, 1)), name="max_pool")]
    index, previous = 0, self.widths[0]
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        layers.append(ResidualBlock(width, strides, project=strides != 1 or previous != width,
                                    dtype=self.dtype, axis_name=self.axis_name,
                                    name=f"ResidualBlock_{index}"))
        index, previous = index + 1, width
    return layers + [GlobalMeanPool(name="global_mean")]


class LipschitzMLP(Chain):
  """1-Lipschitz MLP: flatten, then `Dense -> MaxMin` per width, each followed
  by `residual_blocks` SLL residual layers. `dense`: "aol" (`AOLDense`) or
  "orthogonal" (`OrthogonalDense`, kept on the Stiefel manifold)."""

  widths: Sequence[int] = (256, 128)
  dense: str = "aol"
  residual_blocks: int = 0
  dtype: Any = jnp.float32

  def make_layers(self):
    dense = _choice("lip_mlp", "dense", self.dense, DENSE_LAYERS)
    _even("lip_mlp", "widths", self.widths)
    layers = [Flatten()]
    for i, width in enumerate(self.widths):
      layers += [dense(width, dtype=self.dtype, name=f"dense_{i}"), MaxMin()]
      layers += [SLLDense(dtype=self.dtype, name=f"sll_{i}_{j}")
                 for j in range(self.residual_blocks)]
    return layers


class LipschitzCNN(Chain):
  """1-Lipschitz CNN for small images / spectrograms `[B, H, W, C]`: per channel
  width `Conv3x3 -> MaxMin -> SLL blocks`, with `SpaceToDepth2` (half the
  resolution, four times the channels, an isometry) before every stage but
  the first and once more after the last, where an AOL 1x1 convolution
  brings the channels back to the last width; then flatten and
  `Dense -> MaxMin` to `features` (the resolution and flattened width of
  `SmallCNN` with the same widths).

  `conv`: "aol" (`AOLConv`, zero-padded) or "cayley" (`CayleyConv`, circular,
  orthogonal); `dense`: "aol" or "orthogonal"; `residual_blocks` SLL residual
  convolutions per stage.
  """

  channels: Sequence[int] = (16, 32)
  features: int = 128
  conv: str = "aol"
  dense: str = "aol"
  residual_blocks: int = 0
  dtype: Any = jnp.float32

  def make_layers(self):
    conv = _choice("lip_cnn", "conv", self.conv, CONV_LAYERS)
    dense = _choice("lip_cnn", "dense", self.dense, DENSE_LAYERS)
    _even("lip_cnn", "channels", self.channels)
    _even("lip_cnn", "features", (self.features,))
    layers = []
    for i, width in enumerate(self.channels):
      if i:
        layers.append(SpaceToDepth(2))
      layers += [conv(width, (3, 3), dtype=self.dtype, name=f"conv_{i}"), MaxMin()]
      layers += [SLLConv((3, 3), dtype=self.dtype, name=f"sll_{i}_{j}")
                 for j in range(self.residual_blocks)]
    layers += [SpaceToDepth(2),
               AOLConv(self.channels[-1], (1, 1), dtype=self.dtype, name="pool_conv")]
    return layers + [Flatten(), dense(self.features, dtype=self.dtype, name="dense"), MaxMin()]


class LipschitzResNet(Chain):
  """A 1-Lipschitz residual encoder for Kinetics-Sounds shapes: images
  `[B, H, W, C]` or clips `[B, T, H, W, C]` (frames averaged, bound
  `1/sqrt(T)`).

  `SpaceToDepth(stem_block) -> Conv3x3 -> MaxMin` stem (1/`stem_block`
  resolution; 4 gives ResNet18's resolutions, a quarter of the convolution
  FLOPs of 2, for large frames), then per stage
  (`stage_sizes[i]` SLL residual convolutions of width `widths[i]`) a
  transition `SpaceToDepth2 -> AOL 1x1 conv` (1/2 resolution, except before
  the first stage), and finally global l2-norm pooling and `Dense` to
  `features`.
  """

  FRAME_RANK = 3

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  features: int = 512
  conv: str = "aol"
  dense: str = "aol"
  stem_block: int = 2
  dtype: Any = jnp.float32

  def make_layers(self):
    conv = _choice("lip_resnet", "conv", self.conv, CONV_LAYERS)
    dense = _choice("lip_resnet", "dense", self.dense, DENSE_LAYERS)
    _even("lip_resnet", "widths", self.widths)
    if self.stem_block < 1:
      raise ValueError(f"lip_resnet.stem_block: expected an integer >= 1, got {self.stem_block}")
    layers = [SpaceToDepth(self.stem_block),
              conv(self.widths[0], (3, 3), dtype=self.dtype, name="stem"), MaxMin()]
    for stage, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      if stage > 0:
        layers += [SpaceToDepth(2),
                   AOLConv(width, (1, 1), dtype=self.dtype, name=f"transition_{stage}")]
      layers += [SLLConv((3, 3), dtype=self.dtype, name=f"stage_{stage}_{block}")
                 for block in range(blocks)]
    return layers + [GlobalNormPool(), dense(self.features, dtype=self.dtype, name="dense")]


ENCODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPEncoder, "cnn": SmallCNN, "resnet18": ResNet18,
    "lip_mlp": LipschitzMLP, "lip_cnn": LipschitzCNN, "lip_resnet": LipschitzResNet,
}
LIPSCHITZ_ENCODERS = ("lip_mlp", "lip_cnn", "lip_resnet")
