"""`ClipDataset`: one split of a prepared TFDS clip dataset, as the training loop
and the evaluation scripts read it.

A `ClipDataset` is a random-access source of stored examples (so `make_iterator`
and the `clip_*_iterator`s read it directly) that also knows its number of
classes, its read-time preprocessing and the per-example shapes the model sees.
`in_memory` decodes a split (or its first examples) into an embedded-style
`Dataset` for the attacks and the certification, which work on arrays.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import functools

import numpy as np

from mmsafe.data import pipeline
from mmsafe.data.dataset import Dataset, Standardization

# Raw ranges of the stored bytes (frames and quantised flow), for attack boxes.
_BYTE_RANGE = (0.0, 255.0)


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
  preprocessing: pipeline.ClipPreprocessing = pipeline.ClipPreprocessing()

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict:
    return self.source[index]

  @functools.cached_property
  def modality_shapes(self) -> dict[str, tuple[int, ...]]:
    """Modality name -> per-example model-input shape (e.g. visual `[T, S, S, 3]`)."""
    spec = pipeline.clip_output_spec(self.source, self.preprocessing)
    return {m: shape for m, (shape, _) in spec.items()}

  @property
  def stats(self) -> dict[str, Standardization]:
    """The read-time normalisation of each modality as `x = (raw - mean) / std`
    (`pipeline.normalize_inputs`)."""
    return {m: pipeline.clip_standardization(m) for m in self.modality_shapes}


def full_pass(data: Dataset | ClipDataset, *, batch_size: int, num_threads: int = 4
              ) -> Iterator[dict]:
  """Evaluation batches covering every example of `data` once on this process (no
  sharding over hosts), each with a boolean `"valid"` [B]; the last one is padded."""
  if isinstance(data, Dataset):
    return pipeline.eval_batches(data.inputs, data.labels,
                                 batch_size=max(1, min(batch_size, len(data))))
  return _first_examples(data, len(data), batch_size, num_threads)


def in_memory(data: Dataset | ClipDataset, max_examples: int = 0, *, batch_size: int = 64,
              num_threads: int = 4) -> Dataset:
  """The first `max_examples` (0: all) examples of `data` as an in-memory `Dataset`.

  A `ClipDataset` is decoded with its evaluation preprocessing (deterministic);
  the result carries the normalisation as `stats` and the byte range of frames
  and flow as `value_range`, so attacks can keep to valid images.
  """
  if max_examples < 0:
    raise ValueError(f"max_examples: expected >= 0, got {max_examples}")
  n = len(data) if max_examples == 0 else min(max_examples, len(data))
  if isinstance(data, Dataset):
    if n == len(data):
      return data
    return dataclasses.replace(
        data, inputs={m: x[:n] for m, x in data.inputs.items()}, labels=data.labels[:n],
        meta={k: v[:n] for k, v in data.meta.items()})
  inputs: dict[str, list[np.ndarray]] = {m: [] for m in data.modality_shapes}
  labels = []
  with _first_examples(data, n, batch_size, num_threads) as batches:
    for batch in batches:
      valid = batch["valid"]
      for m in inputs:
        inputs[m].append(batch["inputs"][m][valid])
      labels.append(batch["label"][valid])
  stats = data.stats
  return Dataset(name=data.name, split=data.split,
                 inputs={m: np.concatenate(xs) for m, xs in inputs.items()},
                 labels=np.concatenate(labels).astype(np.int32), num_classes=data.num_classes,
                 stats=stats, value_range={m: _BYTE_RANGE for m in stats if m != "audio"})


def modality_means(data: Dataset | ClipDataset, max_examples: int = 0, *, batch_size: int = 64
                   ) -> dict[str, np.ndarray]:
  """Per-modality mean example (model space) over the first `max_examples` (0: all)
  examples, accumulated batch by batch in float64 (bounded memory)."""
  n = len(data) if max_examples <= 0 else min(max_examples, len(data))
  if isinstance(data, Dataset):
    return {m: x[:n].mean(axis=0, dtype=np.float64).astype(np.float32)
            for m, x in data.inputs.items()}
  sums = {m: np.zeros(shape, np.float64) for m, shape in data.modality_shapes.items()}
  with _first_examples(data, n, batch_size) as batches:
    for batch in batches:
      for m in sums:
        sums[m] += batch["inputs"][m][batch["valid"]].sum(axis=0, dtype=np.float64)
  return {m: (total / n).astype(np.float32) for m, total in sums.items()}


def _first_examples(data: ClipDataset, n: int, batch_size: int, num_threads: int = 4
                    ) -> pipeline.BatchIterator:
  """Evaluation batches (with `"valid"`) of the first `n` examples of a `ClipDataset`."""
  source = data.source if n == len(data) else _Prefix(data.source, n)
  return pipeline.clip_eval_iterator(source, batch_size=max(1, min(batch_size, n)),
                                     config=data.preprocessing, num_threads=num_threads)


class _Prefix(Sequence):
  """The first `n` examples of a source."""

  def __init__(self, source: Sequence[dict], n: int):
    self._source, self._n = source, n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index):
    if not 0 <= index < self._n:
      raise IndexError(index)
    return self._source[index]
