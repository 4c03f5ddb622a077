"""`ClipDataset`: one split of a prepared TFDS clip dataset, as the training loop
and the evaluation scripts read it.

A `ClipDataset` is a random-access source of stored examples (`mmsafe.data.source`:
`len`, `info`, `reader`, `prepare_inputs`) that also knows its read-time
preprocessing. `mmsafe.data.in_memory` decodes a split (or its first examples)
into an embedded-style `Dataset` for the attacks and the certification, which
work on arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools

import numpy as np

from mmsafe.data import clips, loader
from mmsafe.data.types import SourceInfo, Standardization

# Raw ranges of the stored bytes (frames and quantised flow), for attack boxes.
_BYTE_RANGE = (0.0, 255.0)


@dataclasses.dataclass(frozen=True)
class Rows:
  """The records at `indices` of a random-access `source` (picklable, for grain's
  worker processes)."""

  source: Sequence[dict]
  indices: np.ndarray

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    return self.source[int(self.indices[index])]


@dataclasses.dataclass(frozen=True)
class ClipDataset:
  """One split of a TFDS clip dataset (`kinetics_sounds`, `ucf101_rgb_flow`, `vggsound`).

  Attributes:
    name: TFDS name, with its config ("ucf101_rgb_flow/split1").
    split: the TFDS split spec read ("train", "train[:95%]", "test", ...).
    source: random access to the stored examples (`tfds.data_source(...)`).
    num_classes: the number of classes of the label feature.
    preprocessing: how examples become model inputs (`ClipPreprocessing`).
  """

  name: str
  split: str
  source: Sequence[dict]
  num_classes: int
  preprocessing: clips.ClipPreprocessing = clips.ClipPreprocessing()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return self.source[index]

  @functools.cached_property
  def modality_shapes(self) -> dict[str, tuple[int, ...]]:
    """Modality name -> per-example model-input shape (e.g. visual `[T, S, S, 3]`)."""
    spec = clips.clip_output_spec(self.source, self.preprocessing)
    return {m: shape for m, (shape, _) in spec.items()}

  @property
  def prepare_inputs(self) -> Callable[[dict], dict] | None:
    """The map of batches to model space inside the compiled steps:
    `clips.normalize_inputs` when batches hold raw uint8 frames (`normalize=False`,
    `load_tfds`'s default), else none."""
    return None if self.preprocessing.normalize else clips.normalize_inputs

  @property
  def stats(self) -> dict[str, Standardization]:
    """The read-time normalisation of each modality as `x = (raw - mean) / std`
    (`clips.normalize_inputs`)."""
    return {m: clips.clip_standardization(m) for m in self.modality_shapes}

  @functools.cached_property
  def info(self) -> SourceInfo:
    """The split's `SourceInfo`: frames and flow have the raw range of bytes."""
    spec = clips.clip_output_spec(self.source, self.preprocessing)
    return SourceInfo(num_classes=self.num_classes,
                      shapes={m: shape for m, (shape, _) in spec.items()},
                      dtypes={m: np.dtype(dtype) for m, (_, dtype) in spec.items()},
                      stats=self.stats,
                      value_range={m: _BYTE_RANGE for m in spec if m != "audio"})

  def select(self, indices: np.ndarray, split: str) -> "ClipDataset":
    """The examples at `indices` as split `split` (a view of the same records)."""
    return dataclasses.replace(self, split=split, source=Rows(self.source, indices))

  def reader(self, *, train: bool, seed: int = 0, normalized: bool = False
             ) -> loader.ReadClips:
    """Batch plans -> batches of preprocessed clips (`loader.ReadClips`; training
    augmentation seeded by `seed`); `normalized`: in model space on the host,
    whatever `preprocessing.normalize` says."""
    config = (dataclasses.replace(self.preprocessing, normalize=True) if normalized
              else self.preprocessing)
    return loader.ReadClips(self.source, config, train=train, seed=int(seed))
