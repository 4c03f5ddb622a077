"""`build(config) -> MultiModalModel`: encoders per modality composed with a head
(or, with `architecture="transformer"`, a `MultiModalTransformer`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmsafe import programs
from mmsafe.checks import check_inputs
from mmsafe.models import transformer
from mmsafe.models.encoders import ENCODERS
from mmsafe.models.heads import HEADS
from mmsafe.models.operator_norms import BoundOptions
from mmsafe.models.outputs import ModelOutput

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ARCHITECTURES = ("encoders", "transformer")


class MultiModalModel(nn.Module):
  """Per-modality encoders `phi^(m)` fused by a head (concat JT or orthogonal).

  Attributes:
    encoders: modality -> encoder module.
    head: the fusion head module.
    input_shapes: modality -> per-example input shape (checked on every call).
  """

  encoders: Mapping[str, nn.Module]
  head: nn.Module
  input_shapes: Mapping[str, tuple[int, ...]]

  def __call__(self, inputs: Mapping[str, Array], train: bool = False) -> ModelOutput:
    check_inputs(inputs, self.input_shapes)
    features = {m: self.encoders[m](inputs[m], train=train).astype(jnp.float32)
                for m in sorted(self.input_shapes)}
    scores, logits, head = self.head(features)
    return ModelOutput(features=features, scores=scores, logits=logits, head=head)

  def encode(self, modality: str, x: Array, train: bool = False) -> Array:
    """`phi^(m)(x)` for one modality alone (e.g. for per-modality Jacobians)."""
    return self.encoders[modality](x, train=train).astype(jnp.float32)

  def feature_lipschitz(self, options: BoundOptions | None = None) -> dict[str, Array]:
    """`L^(m) >= Lip(phi^(m))` (l2, eval mode) for every modality: each encoder's
    own stated bound (`lipschitz_bound`), computed at full matmul precision.

    Raises:
      NotImplementedError naming the modality and the encoder (or its layer)
      that states no bound.
    """
    options = BoundOptions() if options is None else options
    bounds = {}
    for m in sorted(self.input_shapes):
      encoder = self.encoders[m]
      if not hasattr(encoder, "lipschitz_bound"):
        raise NotImplementedError(f"sound Lipschitz bound: the encoder of modality {m!r} "
                                  f"({type(encoder).__name__}) states no Lipschitz bound")
      example = jnp.zeros((1, *self.input_shapes[m]), jnp.float32)
      with jax.default_matmul_precision("highest"):
        bounds[m] = encoder.lipschitz_bound(example, options)
    return bounds


def as_float32(model: nn.Module) -> nn.Module:
  """`model` computing in float32 throughout: the same module when it does
  already, else a copy whose encoders (or transformer) have `dtype` float32,
  built once per model (`programs.derived`). Its parameters are the same
  (they are float32 in every model `build` makes), so `as_float32(model).apply(
  variables, ...)` evaluates the same parameters in float32: the function the
  float32 Lipschitz bounds of `mmsafe.certify` hold for."""
  if _is_float32(model):
    return model
  return programs.derived(_float32_copy, model)


def _is_float32(module: nn.Module) -> bool:
  modules = [module, *getattr(module, "encoders", {}).values()]
  return all(jnp.dtype(getattr(m, "dtype", jnp.float32)) == jnp.float32 for m in modules)


def _float32_copy(model: nn.Module) -> nn.Module:
  if isinstance(model, MultiModalModel):
    return model.clone(encoders={
        m: encoder.clone(dtype=jnp.float32) if hasattr(encoder, "dtype") else encoder
        for m, encoder in model.encoders.items()})
  return model.clone(dtype=jnp.float32)


def float32_variables(variables: Mapping[str, Any]) -> Any:
  """`variables` with every floating leaf that is not float32 cast to float32."""
  def cast(leaf):
    dtype = jnp.result_type(leaf)
    return (leaf.astype(jnp.float32) if jnp.issubdtype(dtype, jnp.floating)
            and dtype != jnp.float32 else leaf)
  return jax.tree_util.tree_map(cast, variables)


def build(config: Mapping[str, Any], *, num_classes: int | None = None,
          input_shapes: Mapping[str, tuple[int, ...]] | None = None) -> nn.Module:
  """Builds a model from a config (a dict or `ml_collections.ConfigDict`).

  Config fields: `head` ("concat" | "orthogonal"), `architecture`
  ("encoders", the default: a `MultiModalModel`; "transformer": a
  `mmsafe.models.transformer.MultiModalTransformer` configured by the
  `transformer` sub-config, see `transformer.from_config`; `encoders` is
  then ignored), `encoders` (modality ->
  dict(name="mlp"|"cnn"|"resnet18"|"lip_mlp"|"lip_cnn"|"lip_resnet", **module
  attributes); see `mmsafe.models.encoders`), `dtype`
  ("float32" | "bfloat16", for the encoders; the head is always float32),
  optional `head_weight_init` (orthogonal head's initial `a`), optional
  `batch_norm_axis_name` (the `jax.pmap` axis over which encoders with batch
  norm average their training statistics; default None), and
  `num_classes` / `input_shapes` unless given as keyword arguments (the
  dataset usually supplies them).

  The model maps `inputs` (modality -> [B, ...], per-example shapes
  `input_shapes[m]`) to a `ModelOutput`: features modality -> [B, d_m],
  scores modality -> [B, K] and fused logits [B, K]. Head "concat" is the
  joint-training head `h(x) = sum_m W^(m) phi^(m)(x^(m)) + b` (CRMT Sec. 3.1;
  its margins decompose as in eq. 3); "orthogonal" is
  `h~_k = sum_m a^(m)_k W~^(m)_k phi^(m) + b~_k` (CRMT eq. 8).

  Pure: it only validates the config and constructs a Flax module (plain
  Python, nothing to jit). The returned module's `init` / `apply` are pure
  and jit-able (`train` static; input checks are static, on shapes/dtypes).
  """
  config = dict(config)
  num_classes = num_classes if num_classes is not None else config.get("num_classes")
  input_shapes = input_shapes if input_shapes is not None else config.get("input_shapes")
  if not num_classes or num_classes < 2:
    raise ValueError(f"model.num_classes: expected an integer >= 2, got {num_classes!r}")
  if not input_shapes:
    raise ValueError(f"model.input_shapes: expected modality -> shape, got {input_shapes!r}")
  head_kind = _choice("head", config.get("head", "concat"), HEADS)
  dtype = _DTYPES[_choice("dtype", config.get("dtype", "float32"), _DTYPES)]
  architecture = _choice("architecture", config.get("architecture") or "encoders", ARCHITECTURES)
  head = _build_head(config, head_kind, num_classes)
  if architecture == "transformer":
    return transformer.from_config(config.get("transformer") or {}, head=head,
                                   input_shapes=input_shapes, dtype=dtype)
  return MultiModalModel(encoders=_build_encoders(config, input_shapes, dtype), head=head,
                         input_shapes={m: tuple(s) for m, s in input_shapes.items()})


def _choice(field: str, value: Any, choices: tuple[str, ...] | Mapping[str, Any]) -> str:
  """`value` of config field `model.<field>`, checked to be one of `choices` (a tuple, or
  the keys of a registry)."""
  if value not in choices:
    shown = list(choices) if isinstance(choices, tuple) else sorted(choices)
    raise ValueError(f"model.{field}: expected one of {shown}, got {value!r}")
  return value


def _build_head(config: Mapping[str, Any], kind: str, num_classes: int) -> nn.Module:
  """The fusion head `kind` ("concat" | "orthogonal"; the latter with the optional
  `head_weight_init`)."""
  kwargs = {}
  if kind == "orthogonal" and config.get("head_weight_init") is not None:
    kwargs["weight_init"] = config["head_weight_init"]
  return HEADS[kind](num_classes=num_classes, name="head", **kwargs)


def _build_encoders(config: Mapping[str, Any], input_shapes: Mapping[str, tuple[int, ...]],
                    dtype: Any) -> dict[str, nn.Module]:
  """modality -> encoder, from `config["encoders"]` (exactly one per modality)."""
  encoder_configs = dict(config.get("encoders") or {})
  unknown = sorted(set(encoder_configs) - set(input_shapes))
  if unknown:
    raise ValueError(f"model.encoders: unknown modality {unknown}; the data has "
                     f"{sorted(input_shapes)}")
  encoders = {}
  for m in sorted(input_shapes):
    if m not in encoder_configs:
      raise ValueError(f"model.encoders: no encoder configured for modality {m!r} "
                       f"(configured: {sorted(encoder_configs)})")
    encoders[m] = _build_encoder(m, encoder_configs[m], dtype,
                                 config.get("batch_norm_axis_name"))
  return encoders


def _build_encoder(modality: str, encoder_config: Mapping[str, Any], dtype: Any,
                   batch_norm_axis_name: str | None) -> nn.Module:
  """The encoder `encoder_config["name"]` with the other fields as module attributes
  (lists become tuples); batch-norm encoders average over `batch_norm_axis_name`."""
  enc = dict(encoder_config)
  name = enc.pop("name", None)
  if name not in ENCODERS:
    raise ValueError(f"model.encoders[{modality!r}].name: expected one of {sorted(ENCODERS)}, "
                     f"got {name!r}")
  fields = sorted(set(ENCODERS[name].__dataclass_fields__) - {"parent", "name", "dtype"})
  for key, value in enc.items():
    if key not in fields:
      raise ValueError(f"model.encoders[{modality!r}].{key}: not a field of encoder {name!r}; "
                       f"expected one of {fields}")
    if isinstance(value, list):
      enc[key] = tuple(value)
  if batch_norm_axis_name and "axis_name" in ENCODERS[name].__dataclass_fields__:
    enc.setdefault("axis_name", batch_norm_axis_name)
  return ENCODERS[name](dtype=dtype, **enc)
