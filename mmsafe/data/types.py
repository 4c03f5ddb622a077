"""The types every data module shares: a modality's `Standardization`, a split's
`SourceInfo`, and the check of one batch (`validate_batch`).

Batches are plain numpy pytrees `{"inputs": {m: [B, ...]}, "label": int32[B]}`
(evaluation batches also carry a boolean `"valid"` [B]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from mmsafe.checks import check_inputs, check_labels


@dataclasses.dataclass(frozen=True)
class Standardization:
  """Per-feature or per-channel affine normalisation: `x = (raw - mean) / std`.

  `mean` and `std` broadcast against one example (shape `[D]` for vectors,
  `[1, 1, C]` for images/spectrograms) and against a batch `[N, ...]`.

  `unit` names the input unit a user perturbs the modality in (the units of
  certified radii, `mmsafe.certify.units`) and `raw_per_unit` how many stored
  raw values make one such unit: "raw" and 1 for features stored as they are
  (mfeat, av_digits, audio fbank), "pixel/255" and 255 for uint8 frames.
  """

  mean: np.ndarray
  std: np.ndarray
  unit: str = "raw"
  raw_per_unit: float = 1.0

  def normalize(self, raw: np.ndarray) -> np.ndarray:
    """Raw values -> model space (float32)."""
    return ((np.asarray(raw, np.float32) - self.mean) / self.std).astype(np.float32)

  def denormalize(self, x: np.ndarray) -> np.ndarray:
    """Model space -> raw values (float32)."""
    return (np.asarray(x, np.float32) * self.std + self.mean).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What is known of a split before reading it.

  Attributes:
    num_classes: the number of classes.
    shapes: modality -> per-example model-input shape.
    dtypes: modality -> dtype of the loaded batches (uint8 for raw clip frames).
    stats: modality -> `Standardization` from raw values to model space.
    value_range: modality -> raw-space (low, high) of bounded modalities (attack boxes).
  """

  num_classes: int
  shapes: Mapping[str, tuple[int, ...]]
  dtypes: Mapping[str, Any]
  stats: Mapping[str, Standardization]
  value_range: Mapping[str, tuple[float, float]]


def validate_batch(batch: Mapping, input_shapes: Mapping[str, tuple[int, ...]],
                   num_classes: int, *, raw_inputs: bool = False) -> None:
  """Fails fast on a malformed batch, naming the field, expected and actual value.

  Checks: the "inputs" and "label" keys, integer labels `[B]` in `[0, num_classes)`,
  the inputs as `mmsafe.checks.check_inputs` does (every modality present, no extras,
  per-example shapes, floating dtypes, batch size B) and finite values. With
  `raw_inputs` (clips normalised on the device) uint8 inputs are accepted too.
  """
  for key in ("inputs", "label"):
    if key not in batch:
      raise ValueError(f"batch: missing key {key!r}; expected keys 'inputs' and 'label', "
                       f"got {sorted(batch)}")
  labels = np.asarray(batch["label"])
  check_labels(labels, num_classes, field="batch['label']")
  inputs = {m: np.asarray(x) for m, x in batch["inputs"].items()}
  # uint8 raw inputs are checked for their shapes on a float32 stand-in (no copy).
  shaped = {m: np.broadcast_to(np.float32(0), x.shape) if raw_inputs and x.dtype == np.uint8
            else x for m, x in inputs.items()}
  check_inputs(shaped, input_shapes, batch_size=labels.shape[0], field="batch['inputs']")
  for m in input_shapes:
    if np.issubdtype(inputs[m].dtype, np.floating):
      _check_finite(inputs[m], f"batch['inputs'][{m!r}]")


def _check_finite(x: np.ndarray, field: str) -> None:
  """Raises ValueError naming `field`, the count of NaN/Inf entries and the first bad example."""
  finite = np.isfinite(x)
  if not finite.all():
    bad = int(np.argwhere(~finite.reshape(x.shape[0], -1).all(axis=1))[0, 0])
    raise ValueError(f"{field}: expected finite values, got {int((~finite).sum())} NaN/Inf "
                     f"entries (first in example {bad})")
