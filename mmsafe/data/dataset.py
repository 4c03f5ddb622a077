"""`Dataset`: one split of a dataset held in memory, its `Standardization`, and the
seeded stratified splits of the embedded datasets (`mmsafe.data.embedded`).

Normalisation: every modality is standardised with statistics of the *train*
split only, so zero is the train mean in normalised space (attacks and
missing-modality fills rely on this). Vector views are standardised per
feature (mean/std of shape [D]); images and spectrograms per channel (one
mean/std over all pixels/frames/bins, stored with shape [1, 1, C]) so that
spatial/spectral structure is preserved. `Dataset.stats` holds the statistics
(`normalize` / `denormalize` map between raw and model space) and
`Dataset.value_range` the raw-space range of bounded modalities.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
import zlib

import numpy as np

from mmsafe.data.plans import ReadArrays
from mmsafe.data.types import SourceInfo, Standardization

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)
NUM_CLASSES = 10  # both embedded datasets classify the digits 0-9


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split of an embedded dataset, in memory.

  Attributes:
    name: dataset name (one of `EMBEDDED_DATASETS`).
    split: "train", "validation" or "test".
    inputs: modality name -> float32 `[N, ...]`, standardised with train statistics.
    labels: int32 `[N]` in `[0, num_classes)`.
    num_classes: number of classes (10).
    stats: modality name -> `Standardization` (train-split statistics).
    value_range: modality name -> (low, high) raw-space range, for bounded
      modalities only (e.g. pix: (0, 6); audio: (floor, 0)).
    meta: per-example int/str arrays `[N]` describing provenance (mfeat:
      "index" = row of the UCI files; av_digits: "voice", "clip_index",
      "image_index" = index into the image pool).
  """

  name: str
  split: str
  inputs: Mapping[str, np.ndarray]
  labels: np.ndarray
  num_classes: int
  stats: Mapping[str, Standardization]
  value_range: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  meta: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def modality_shapes(self) -> dict[str, tuple[int, ...]]:
    """Modality name -> per-example shape (without the leading N)."""
    return {m: tuple(int(d) for d in x.shape[1:]) for m, x in self.inputs.items()}

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def prepare_inputs(self) -> None:
    """The map of batches to model space inside the compiled steps: none, the
    arrays are standardised already."""
    return None

  @property
  def info(self):
    """The split's `mmsafe.data.types.SourceInfo`."""
    return SourceInfo(num_classes=self.num_classes, shapes=self.modality_shapes,
                      dtypes={m: x.dtype for m, x in self.inputs.items()},
                      stats=dict(self.stats), value_range=dict(self.value_range))

  def reader(self, *, train: bool, seed: int = 0, normalized: bool = False):
    """Batch plans -> batches: slices of the arrays (model space already; `train`,
    `seed` and `normalized` change nothing)."""
    del train, seed, normalized
    return ReadArrays(self.inputs, self.labels)

  def select(self, indices: np.ndarray, split: str) -> "Dataset":
    """The examples at `indices` (and their meta) as split `split`."""
    return dataclasses.replace(self, split=split,
                               inputs={m: x[indices] for m, x in self.inputs.items()},
                               labels=self.labels[indices],
                               meta={k: v[indices] for k, v in self.meta.items()})

  def normalized_range(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """`value_range[modality]` mapped to model space: (low, high) arrays that
    broadcast against one example (for box constraints on attacks)."""
    if modality not in self.value_range:
      raise ValueError(f"modality: expected one with a known raw range "
                       f"{sorted(self.value_range)}, got {modality!r}")
    low, high = self.value_range[modality]
    s = self.stats[modality]
    return ((low - s.mean) / s.std).astype(np.float32), ((high - s.mean) / s.std).astype(np.float32)


def fit_standardization(raw: np.ndarray) -> Standardization:
  """Train statistics: per feature for `[N, D]`, per channel for `[N, H, W, C]`."""
  x = np.asarray(raw, np.float64)
  axes = tuple(range(x.ndim - 1)) if x.ndim > 2 else (0,)
  mean = x.mean(axis=axes, keepdims=True)[0]
  std = x.std(axis=axes, keepdims=True)[0]
  std = np.where(std > 1e-8, std, 1.0)
  return Standardization(mean.astype(np.float32), std.astype(np.float32))


def standardized_dataset(name: str, split: str, raw: Mapping[str, np.ndarray],
                         train_raw: Mapping[str, np.ndarray], labels: np.ndarray,
                         value_range: Mapping[str, tuple[float, float]],
                         meta: Mapping[str, np.ndarray]) -> Dataset:
  """The `Dataset` of raw arrays `raw` (modality -> `[N, ...]`), standardised with the
  statistics of `train_raw`; `value_range` may name modalities `raw` lacks."""
  stats = {m: fit_standardization(train_raw[m]) for m in raw}
  inputs = {m: stats[m].normalize(raw[m]) for m in raw}
  return Dataset(name=name, split=split, inputs=inputs,
                 labels=np.asarray(labels, np.int32), num_classes=NUM_CLASSES, stats=stats,
                 value_range={m: value_range[m] for m in raw if m in value_range},
                 meta=dict(meta))


def with_noise(dataset: Dataset, noise: Mapping[str, float]) -> Dataset:
  """`dataset` with modality m made less informative by noise of strength
  `noise[m]` (a controlled modality imbalance).

  In raw units, every feature gets independent Gaussian noise with
  `noise[m]` times its train standard deviation; the result is standardised
  again, so in model space `x' = (x + sigma z) / sqrt(1 + sigma^2)` with
  `z ~ N(0, I)` (unit variance per feature as before; the signal's share of
  it falls to `1 / (1 + sigma^2)`). The draw is fixed per (dataset, split,
  modality, example position), so every method and seed sees the same data.
  The modality's raw value range no longer holds and is dropped.
  """
  noise = dict(noise)
  unknown = sorted(set(noise) - set(dataset.inputs))
  if unknown:
    raise ValueError(f"noise: expected modalities among {sorted(dataset.inputs)}, got "
                     f"{unknown}")
  inputs, stats = dict(dataset.inputs), dict(dataset.stats)
  value_range = dict(dataset.value_range)
  for m, sigma in sorted(noise.items()):
    if not (isinstance(sigma, (int, float)) and np.isfinite(sigma) and sigma >= 0):
      raise ValueError(f"noise[{m!r}]: expected a finite strength >= 0, got {sigma!r}")
    if sigma == 0:
      continue
    rng = np.random.default_rng(zlib.crc32(f"{dataset.name}/{dataset.split}/{m}".encode()))
    scale = float(np.sqrt(1.0 + sigma ** 2))
    z = rng.standard_normal(inputs[m].shape).astype(np.float32)
    inputs[m] = ((inputs[m] + sigma * z) / scale).astype(np.float32)
    stats[m] = dataclasses.replace(stats[m], std=(stats[m].std * scale).astype(np.float32))
    value_range.pop(m, None)
  return dataclasses.replace(dataset, inputs=inputs, stats=stats, value_range=value_range)


def check_split(split: str) -> None:
  """Raises ValueError unless `split` is one of `SPLITS`."""
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def stratified_split(labels: np.ndarray, seed: int,
                     fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
  """Seeded stratified split: split name -> indices into `labels` (shuffled order).

  Within every class, a seeded permutation gives `round(f_train * n)` train,
  `round(f_val * n)` validation and the rest test examples. The result is a
  pure function of (labels, seed, fractions); splits are disjoint and cover
  all indices.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng([int(seed), 0x5EED])
  parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_train = int(round(fractions[0] * idx.size))
    n_val = int(round(fractions[1] * idx.size))
    parts["train"].append(idx[:n_train])
    parts["validation"].append(idx[n_train:n_train + n_val])
    parts["test"].append(idx[n_train + n_val:])
  return {s: rng.permutation(np.concatenate(parts[s])).astype(np.int64) for s in SPLITS}
