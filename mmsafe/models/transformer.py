"""A multi-modal transformer (MMT) whose per-modality class tokens feed mmsafe's heads.

The transformer extension of CRMT (Yang et al., "Quantifying and Enhancing
Multi-modal Robustness with Modality Preference", ICLR 2024, Sec. 4.3 and
Table 3): a Multi-Modal Transformer with hierarchical attention (Xu, Zhu and
Clifton, "Multimodal Learning with Transformers: A Survey", TPAMI 2023,
"multi-stream to one-stream"), trained from scratch, whose per-modality class
tokens are concatenated and linearly projected to the classes.

Architecture (ViT-style, Dosovitskiy et al., ICLR 2021, with pre-LayerNorm
blocks, Xiong et al., ICML 2020):

* Tokens, per modality `m` (`Tokenizer`):
    vector   `[B, D]`          -> chunks of `patch` numbers, each a token;
    sequence `[B, L, D]`       -> one token per row;
    image    `[B, H, W, C]`    -> non-overlapping `ph x pw` patches (images,
                                  spectrograms, flow stacks);
    clip     `[B, T, H, W, C]` -> every frame patchified as an image, with a
                                  spatial and a temporal (per frame) embedding.
  Inputs are zero-padded at the end to a whole number of patches. Each patch
  is flattened and projected by a Dense layer (the same map as a convolution
  with kernel = stride = patch), a learned positional embedding is added and a
  learned class token `[CLS_m]` is prepended.
* Multi-stream: `depth_unimodal` self-attention blocks per modality, with
  their own parameters; modality `m`'s tokens attend only to themselves.
* One-stream: `depth_crossmodal` blocks over the concatenation of all
  modalities' tokens (shared parameters), so every token of every modality
  attends to every token of every modality (cross-modal attention).
* Features: `phi^(m) = LayerNorm_m([CLS_m])`, `[B, width]` in float32.
* Head: mmsafe's fusion head on `{m: phi^(m)}`. The concat head
  (`ConcatHead`, CRMT eq. 3) is exactly "concatenate the class tokens and
  project linearly"; the orthogonal head (`OrthogonalHead`, CRMT eq. 8) works
  the same way, so CRMT step 1 (`crmt_step1`) and `ojt` train this model
  unchanged.

Certification caveat. With `depth_crossmodal > 0`, `phi^(m)` is a function of
*every* modality's input, not of `x^(m)` alone. The bounds of CRMT (Thm 3.3,
Thm 3.5) and the per-modality Lipschitz constants of `mmsafe.certify` assume
`phi^(m)(x^(m))`, so they do not apply to this model (the paper therefore uses
only CRMT step 1 here: "both audio and visual input influence each token, which
is beyond our assumption"). Accordingly this model has no `encode` method (no
per-modality encoder exists to run alone) and no `encoders` attribute, so
`mmsafe.certify`'s "sound" constants raise `NotImplementedError` for it. The
"local"/"empirical" constants still run (through the full model) but measure
only how `x^(m)` moves the scores of modality `m`, not those of the other
modalities, so radii derived from them are not certificates for this model.
Attacks and training objectives, which only read `ModelOutput.logits` and
`ModelOutput.scores`, work as for any other model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsafe.checks import check_inputs
from mmsafe.models.outputs import ModelOutput

Array = jax.Array
PatchSize = int | Sequence[int]

# Patch sizes used when `patch_sizes` names no size for a modality: by the rank
# of one example (vector chunk length; image / clip frame patch height, width).
DEFAULT_PATCH_SIZES: dict[int, tuple[int, ...]] = {1: (16,), 3: (4, 4), 4: (4, 4)}
_KINDS = {1: "vector", 2: "sequence", 3: "image", 4: "clip"}
_EMBED_INIT = nn.initializers.normal(stddev=0.02)


def modality_kind(shape: Sequence[int]) -> str:
  """The kind of a per-example shape: "vector", "sequence", "image" or "clip"."""
  if len(shape) not in _KINDS:
    raise ValueError(f"expected a per-example shape of rank 1 (vector [D]), 2 (sequence "
                     f"[L, D]), 3 (image [H, W, C]) or 4 (clip [T, H, W, C]), got {tuple(shape)}")
  return _KINDS[len(shape)]


def normalize_patch_size(shape: Sequence[int], patch_size: PatchSize | None,
                         modality: str = "?") -> tuple[int, ...]:
  """The patch size for one modality as a tuple: `(chunk,)` for vectors, `()`
  for sequences (one token per row), `(ph, pw)` for images and clip frames (an
  int `p` means `(p, p)`). Raises ValueError naming the modality."""
  kind = modality_kind(shape)
  if kind == "sequence":
    if patch_size not in (None, (), []):
      raise ValueError(f"patch_sizes[{modality!r}]: a sequence [L, D] becomes one token per "
                       f"row and takes no patch size, got {patch_size!r}")
    return ()
  if patch_size is None:
    patch = DEFAULT_PATCH_SIZES[len(shape)]
  elif isinstance(patch_size, int):
    patch = (patch_size,) if kind == "vector" else (patch_size, patch_size)
  else:
    patch = tuple(patch_size)
  expected = 1 if kind == "vector" else 2
  if len(patch) != expected or not all(isinstance(p, int) and p >= 1 for p in patch):
    raise ValueError(f"patch_sizes[{modality!r}]: expected {expected} positive int(s) for a "
                     f"{kind} of shape {tuple(shape)}, got {patch_size!r}")
  return patch


def resolve_patch_sizes(input_shapes: Mapping[str, Sequence[int]],
                        patch_sizes: Mapping[str, PatchSize] | None
                        ) -> dict[str, tuple[int, ...]]:
  """Modality -> normalised patch size (`normalize_patch_size`) for every modality."""
  sizes = dict(patch_sizes or {})
  return {m: normalize_patch_size(input_shapes[m], sizes.get(m), m) for m in sorted(input_shapes)}


def num_tokens(shape: Sequence[int], patch: Sequence[int]) -> int:
  """Number of patch tokens (without the class token) of one example."""
  kind = modality_kind(shape)
  ceil = lambda n, p: -(-n // p)
  if kind == "vector":
    return ceil(shape[0], patch[0])
  if kind == "sequence":
    return shape[0]
  spatial = ceil(shape[-3], patch[0]) * ceil(shape[-2], patch[1])
  return spatial * (shape[0] if kind == "clip" else 1)


def _pad_to_multiple(x: Array, axis_patches: Mapping[int, int]) -> Array:
  """Zero-pads `x` at the end of each axis to a multiple of its patch size."""
  pad = [(0, 0)] * x.ndim
  for axis, p in axis_patches.items():
    pad[axis] = (0, -x.shape[axis] % p)
  return jnp.pad(x, pad) if any(after for _, after in pad) else x


class Tokenizer(nn.Module):
  """One modality's input `[B, *shape]` -> tokens `[B, 1 + N, width]`.

  Token 0 is the learned class token; the N patch tokens carry learned
  positional embeddings (for clips: a spatial embedding shared by the frames
  plus a temporal embedding per frame).

  Attributes:
    width: token dimension.
    patch_size: see `normalize_patch_size`.
    dtype: computation dtype (parameters stay float32).
  """

  width: int
  patch_size: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kind = modality_kind(x.shape[1:])
    x = x.astype(self.dtype)
    if kind == "vector":
      (chunk,) = self.patch_size
      x = einops.rearrange(_pad_to_multiple(x, {1: chunk}), "b (n c) -> b n c", c=chunk)
    elif kind in ("image", "clip"):
      ph, pw = self.patch_size
      x = _pad_to_multiple(x, {x.ndim - 3: ph, x.ndim - 2: pw})
      lead = "b" if kind == "image" else "b t"
      x = einops.rearrange(x, f"{lead} (h p) (w q) c -> {lead} (h w) (p q c)", p=ph, q=pw)
    tokens = nn.Dense(self.width, dtype=self.dtype, name="embed")(x)
    spatial = self.param("pos_embedding", _EMBED_INIT, (tokens.shape[-2], self.width))
    tokens = tokens + spatial.astype(self.dtype)
    if kind == "clip":
      temporal = self.param("time_embedding", _EMBED_INIT, (tokens.shape[1], self.width))
      tokens = tokens + temporal.astype(self.dtype)[:, None, :]
      tokens = einops.rearrange(tokens, "b t n d -> b (t n) d")
    cls = self.param("cls", nn.initializers.zeros_init(), (1, 1, self.width))
    cls = jnp.broadcast_to(cls.astype(self.dtype), (tokens.shape[0], 1, self.width))
    return jnp.concatenate([cls, tokens], axis=1)


class MlpBlock(nn.Module):
  """`Dense(mlp_dim) -> GELU -> Dense(width)`."""

  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    x = nn.gelu(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(width, dtype=self.dtype, name="fc2")(x)


class EncoderBlock(nn.Module):
  """Pre-LayerNorm transformer block on `[B, N, width]`:
  `x + MHSA(LN(x))`, then `x + MLP(LN(x))`."""

  heads: int
  mlp_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.LayerNorm(dtype=self.dtype, name="attention_norm")(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                        deterministic=True, name="attention")(y, y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
    return x + MlpBlock(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


class MultiModalTransformer(nn.Module):
  """Multi-modal transformer (MMT, CRMT Sec. 4.3): per-modality class tokens
  `phi^(m)` fused by an mmsafe head (see the module docstring).

  `phi^(m)` depends on every modality once `depth_crossmodal > 0` (cross-modal
  attention), so the per-modality Lipschitz bounds of `mmsafe.certify` (which
  assume `phi^(m)` depends on `x^(m)` only) do not apply to this model; it
  deliberately has no `encode` method.

  Attributes:
    head: the fusion head module (`ConcatHead` or `OrthogonalHead`; it knows
      the number of classes).
    input_shapes: modality -> per-example input shape (checked on every call).
    width: token / feature dimension `d` (every `phi^(m)` is `[B, width]`).
    depth_unimodal: self-attention blocks per modality (multi-stream).
    depth_crossmodal: blocks over all modalities' tokens (one-stream); 0 gives
      independent uni-modal transformers (late fusion by the head).
    heads: attention heads (must divide `width`).
    mlp_dim: hidden width of the MLP blocks (None: `4 * width`).
    patch_sizes: modality -> patch size (see `normalize_patch_size`); absent
      modalities use `DEFAULT_PATCH_SIZES`.
    dtype: computation dtype of the transformer; parameters, features and the
      head stay float32.
  """

  head: nn.Module
  input_shapes: Mapping[str, tuple[int, ...]]
  width: int = 64
  depth_unimodal: int = 2
  depth_crossmodal: int = 2
  heads: int = 4
  mlp_dim: int | None = None
  patch_sizes: Mapping[str, PatchSize] | None = None
  dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    super().__post_init__()
    if not self.input_shapes:
      raise ValueError(f"input_shapes: expected modality -> shape, got {self.input_shapes!r}")
    for name in ("width", "heads"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"model.transformer.{name}: expected a positive int, got "
                         f"{getattr(self, name)!r}")
    for name in ("depth_unimodal", "depth_crossmodal"):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
        raise ValueError(f"model.transformer.{name}: expected an int >= 0, got "
                         f"{getattr(self, name)!r}")
    if self.width % self.heads:
      raise ValueError(f"model.transformer: heads={self.heads} must divide width={self.width}")
    unknown = sorted(set(self.patch_sizes or {}) - set(self.input_shapes))
    if unknown:
      raise ValueError(f"model.transformer.patch_sizes: unknown modality {unknown}; the data "
                       f"has {sorted(self.input_shapes)}")
    resolve_patch_sizes(self.input_shapes, self.patch_sizes)  # Validates shapes and patches.

  @nn.compact
  def __call__(self, inputs: Mapping[str, Array], train: bool = False) -> ModelOutput:
    del train  # No dropout or batch statistics: training and inference agree.
    check_inputs(inputs, self.input_shapes)
    modalities = sorted(self.input_shapes)
    mlp_dim = self.mlp_dim or 4 * self.width
    patches = resolve_patch_sizes(self.input_shapes, self.patch_sizes)
    tokens = {m: Tokenizer(self.width, patches[m], dtype=self.dtype, name=f"tokenizer_{m}")(
        inputs[m]) for m in modalities}
    for m in modalities:  # Multi-stream: each modality attends to itself.
      for i in range(self.depth_unimodal):
        tokens[m] = EncoderBlock(self.heads, mlp_dim, dtype=self.dtype,
                                 name=f"unimodal_{m}_{i}")(tokens[m])
    if self.depth_crossmodal:  # One-stream: every token attends to all modalities.
      lengths = [tokens[m].shape[1] for m in modalities]
      joint = jnp.concatenate([tokens[m] for m in modalities], axis=1)
      for i in range(self.depth_crossmodal):
        joint = EncoderBlock(self.heads, mlp_dim, dtype=self.dtype, name=f"crossmodal_{i}")(joint)
      splits = jnp.split(joint, [sum(lengths[:i + 1]) for i in range(len(lengths) - 1)], axis=1)
      tokens = dict(zip(modalities, splits))
    features = {m: nn.LayerNorm(dtype=self.dtype, name=f"norm_{m}")(tokens[m][:, 0])
                .astype(jnp.float32) for m in modalities}
    scores, logits, head = self.head(features)
    return ModelOutput(features=features, scores=scores, logits=logits, head=head)

  def feature_lipschitz(self, options=None):
    """No sound bound exists: always raises, naming the part without one.

    Raises:
      NotImplementedError: with `depth_crossmodal > 0` the cross-modal
        attention blocks make `phi^(m)` depend on every modality; otherwise
        the self-attention blocks and LayerNorm of each modality state no
        Lipschitz bound (dot-product attention is not globally Lipschitz).
    """
    del options
    if self.depth_crossmodal:
      part = (f"the cross-modal attention blocks (crossmodal_0..{self.depth_crossmodal - 1}): "
              f"phi^(m) depends on every modality's input, beyond Thm 3.3/3.5")
    else:
      part = ("the per-modality self-attention blocks and LayerNorm: dot-product attention "
              "is not globally Lipschitz")
    raise NotImplementedError(f"sound Lipschitz bound: MultiModalTransformer states none for "
                              f"{part}")


_CONFIG_FIELDS = ("width", "depth_unimodal", "depth_crossmodal", "heads", "mlp_dim",
                  "patch_sizes")


def from_config(config: Mapping[str, Any], *, head: nn.Module,
                input_shapes: Mapping[str, tuple[int, ...]], dtype: Any = jnp.float32
                ) -> MultiModalTransformer:
  """A `MultiModalTransformer` from `model.transformer` (fields `width`,
  `depth_unimodal`, `depth_crossmodal`, `heads`, `mlp_dim`, `patch_sizes`;
  absent fields take the class defaults). Used by `mmsafe.models.build` with
  `model.architecture = "transformer"`."""
  config = dict(config or {})
  unknown = sorted(set(config) - set(_CONFIG_FIELDS))
  if unknown:
    raise ValueError(f"model.transformer: unknown field(s) {unknown}; expected a subset of "
                     f"{list(_CONFIG_FIELDS)}")
  if config.get("patch_sizes") is not None:
    config["patch_sizes"] = {m: p if isinstance(p, int) else tuple(p)
                             for m, p in dict(config["patch_sizes"]).items()}
  return MultiModalTransformer(head=head, input_shapes={m: tuple(s) for m, s in
                                                        input_shapes.items()},
                               dtype=dtype, **config)
