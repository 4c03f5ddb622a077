"""The data that crosses every seam: `ModelOutput` and the head parameters it carries.

Everything downstream of a model (objectives in `mmsafe.methods`, bounds in
`mmsafe.certify`, attacks in `mmsafe.attacks`) reads a `ModelOutput` and nothing
model-specific, so it works for any encoder and any number of modalities.
"""

from __future__ import annotations

from typing import Literal

import flax.struct
import jax

Array = jax.Array
HeadKind = Literal["concat", "orthogonal"]


@flax.struct.dataclass
class HeadParams:
  """Parameters of the fusion head, as the bounds need them.

  Attributes:
    kind: "concat" (joint training, CRMT eq. 3) or "orthogonal" (CRMT eq. 8).
    bias: [K] bias `b` (concat) or `b~` (orthogonal).
    kernels: modality -> [d_m, K]. For "concat" this is `W^(m)^T`, so the
      uni-modal contribution is `s^(m) = phi^(m) @ kernels[m]`; for
      "orthogonal" it is `W~^(m)^T` with orthonormal columns, so the
      uni-modal score is `u^(m) = phi^(m) @ kernels[m]`.
    weights: modality -> [K] per-class modality weights `a^(m)` (orthogonal
      head only; an empty dict for "concat").
  """

  kind: str = flax.struct.field(pytree_node=False)
  bias: Array
  kernels: dict[str, Array]
  weights: dict[str, Array]

  @property
  def num_classes(self) -> int:
    return self.bias.shape[-1]


@flax.struct.dataclass
class ModelOutput:
  """What `model.apply(variables, inputs)` returns.

  Attributes:
    features: modality -> [B, d_m] encoder features `phi^(m)(x^(m))` (float32).
    scores: modality -> [B, K]. Concat head: contributions
      `s^(m) = W^(m) phi^(m)` (no bias), so `logits = sum_m s^(m) + b`.
      Orthogonal head: uni-modal scores `u^(m) = W~^(m) phi^(m)`, so
      `logits = sum_m a^(m) * u^(m) + b~` (CRMT eq. 8).
    logits: [B, K] fused logits `h(x)`.
    head: the head's parameters (`HeadParams`).
  """

  features: dict[str, Array]
  scores: dict[str, Array]
  logits: Array
  head: HeadParams

  @property
  def modalities(self) -> tuple[str, ...]:
    """Modality names in the canonical (sorted) order used across mmsafe."""
    return tuple(sorted(self.scores))

  @property
  def num_classes(self) -> int:
    return self.logits.shape[-1]
