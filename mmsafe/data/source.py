"""The one source type: every dataset split (an embedded in-memory `Dataset`, a TFDS
`ClipDataset`) is a random-access source with one `SourceInfo` record, read in
batches through grain.

A source has `len()`, an `info` (`SourceInfo`), `reader(train=..., seed=...,
normalized=...)` (a picklable function from a batch plan `(indices, epoch, extra)`
to a batch, see `mmsafe.data.loader.grain_batches`) and `prepare_inputs` (None, or
the map to model space applied inside the compiled steps). Everything here works on any
source: `train_iterator` (this host's training batches), `eval_pass` (the one way
to read an evaluation split: this host's rows, or with `process_count=1` every
example on this process), `in_memory`, `modality_means`, `check_splits`.

Evaluation batching, one rule for every consumer: batches of a fixed size whose
last one is completed with copies of the first example of the pass and carries a
boolean `"valid"` [B] marking real examples (first in the batch); consumers
count only valid rows.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import numpy as np

from mmsafe.data.clip_dataset import ClipDataset
from mmsafe.data.clips import ClipPreprocessing
from mmsafe.data.dataset import Dataset
from mmsafe.data.loader import Batches, grain_batches
from mmsafe.data.plans import eval_plans, train_plans


def check_splits(splits: Mapping[str, Any], reference: str = "train") -> None:
  """Checks that every split agrees with split `reference` on the class count and the
  modalities' shapes and dtypes (before training builds a model for `reference`).

  Raises:
    ValueError naming the split and the field (`data.splits.<role>.num_classes`,
    `....shapes[m]`, `....dtypes[m]`), the expected and the actual value.
  """
  expected = splits[reference].info
  for role, split in splits.items():
    info = split.info
    field = f"data.splits.{role}"
    if info.num_classes != expected.num_classes:
      raise ValueError(f"{field}.num_classes: expected {expected.num_classes} (as the "
                       f"{reference} split), got {info.num_classes}")
    if sorted(info.shapes) != sorted(expected.shapes):
      raise ValueError(f"{field}: expected modalities {sorted(expected.shapes)} (as the "
                       f"{reference} split), got {sorted(info.shapes)}")
    for m, shape in expected.shapes.items():
      if tuple(info.shapes[m]) != tuple(shape):
        raise ValueError(f"{field}.shapes[{m!r}]: expected {tuple(shape)} (as the {reference} "
                         f"split), got {tuple(info.shapes[m])}")
      if np.dtype(info.dtypes[m]) != np.dtype(expected.dtypes[m]):
        raise ValueError(f"{field}.dtypes[{m!r}]: expected {np.dtype(expected.dtypes[m])} (as "
                         f"the {reference} split), got {np.dtype(info.dtypes[m])}")


def split_off(data, fraction: float, *, seed: int, field: str = "fraction"):
  """`(kept, heldout)`: `data` cut at random (permutation seeded by `seed`) into
  `round(fraction * len(data))` examples of split "heldout" and the rest, each in
  the original order (e.g. the slice of the training split a method holds out).

  Raises:
    ValueError naming `field` when the slice or the rest would be empty.
  """
  n = len(data)
  count = int(round(float(fraction) * n))
  if not 0 < count < n:
    raise ValueError(f"{field}: expected a fraction of the {n} examples of split "
                     f"{data.split!r} leaving both parts non-empty, got {fraction}")
  order = np.random.default_rng(seed).permutation(n)
  return (data.select(np.sort(order[count:]), data.split),
          data.select(np.sort(order[:count]), "heldout"))


def train_iterator(data, *, batch_size: int, seed: int = 0, start_step: int = 0,
                   num_steps: int | None = None, process_index: int | None = None,
                   process_count: int | None = None, config: ClipPreprocessing | None = None,
                   num_threads: int = 4, prefetch: int = 2, processes: int = 0) -> Batches:
  """This host's training batches of source `data` (or of a sequence of stored clip
  records) from `start_step`, forever or `num_steps`, loaded by grain
  (`loader.grain_batches`; its position is `get_state()`): the per-host example
  indices of `plans.host_train_indices`, read with the source's training
  augmentation. `batch_size` is per host; `process_index` / `process_count`
  default to JAX's; `config` replaces a clip source's preprocessing (records:
  default `ClipPreprocessing()`). Workers: `num_threads` threads or `processes`
  processes, `prefetch` batches buffered."""
  data = _as_source(data, config)
  process_index, process_count = _hosts(process_index, process_count)
  plans = train_plans(len(data), batch_size=batch_size, seed=seed, start_step=start_step,
                      num_steps=num_steps, process_index=process_index,
                      process_count=process_count)
  return grain_batches(plans, data.reader(train=True, seed=seed), start_step=start_step,
                       num_threads=num_threads, prefetch=prefetch, processes=processes)


def eval_pass(data, *, batch_size: int, max_examples: int = 0, normalized: bool = True,
              process_index: int | None = None, process_count: int | None = None,
              config: ClipPreprocessing | None = None, num_threads: int = 4, prefetch: int = 2,
              processes: int = 0) -> Batches:
  """The one way to read an evaluation split: this host's batches covering the first
  `max_examples` (0: all) examples of source `data` (or of a sequence of stored
  clip records) once, each with `"valid"` (the module's batching rule).

  Hosts: each reads its contiguous block (`plans.shard_indices`), as many
  batches on every host; `process_index` / `process_count` default to JAX's,
  and `process_count=1` reads every example on this process. Reduce what is
  computed from a host's batches over hosts (`mmsafe.train.distributed`).
  `normalized`: batches in model space (float32), or, False, as the source
  stores them (clip frames stay uint8; the source's `prepare_inputs` maps them
  inside the compiled steps). `config`, workers: as `train_iterator`.
  """
  data = _as_source(data, config)
  process_index, process_count = _hosts(process_index, process_count)
  plans = eval_plans(_count(data, max_examples), batch_size=max(1, batch_size),
                     process_index=process_index, process_count=process_count)
  return grain_batches(plans, data.reader(train=False, normalized=normalized),
                       num_threads=num_threads, prefetch=prefetch, processes=processes)


def _as_source(data, config: ClipPreprocessing | None):
  """`data` as a source: a sequence of stored clip records is wrapped in a
  `ClipDataset`; `config` replaces a clip source's preprocessing."""
  if not hasattr(data, "reader"):
    return ClipDataset(name="records", split="records", source=data, num_classes=0,
                       preprocessing=config or ClipPreprocessing())
  return data if config is None else dataclasses.replace(data, preprocessing=config)


def _hosts(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """`(process_index, process_count)`, each defaulting to JAX's."""
  if process_index is None or process_count is None:
    import jax  # only here: reading a source needs no JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def in_memory(data, max_examples: int = 0, *, batch_size: int = 64,
              num_threads: int = 4) -> Dataset:
  """The first `max_examples` (0: all) examples of `data` as an in-memory `Dataset` in
  model space, with the source's `stats` and raw `value_range` (so attacks can keep
  to valid inputs) and its per-example `meta` when it has one. An in-memory
  `Dataset` asked for all of it is returned as is."""
  n = _count(data, max_examples)
  if isinstance(data, Dataset) and n == len(data):
    return data
  inputs: dict[str, list[np.ndarray]] = {m: [] for m in data.info.shapes}
  labels = []
  with eval_pass(data, batch_size=min(batch_size, n), max_examples=n, process_count=1,
                 process_index=0, num_threads=num_threads) as batches:
    for batch in batches:
      valid = batch["valid"]
      for m in inputs:
        inputs[m].append(batch["inputs"][m][valid])
      labels.append(batch["label"][valid])
  info = data.info
  return Dataset(name=data.name, split=data.split,
                 inputs={m: np.concatenate(xs) for m, xs in inputs.items()},
                 labels=np.concatenate(labels).astype(np.int32), num_classes=info.num_classes,
                 stats=dict(info.stats), value_range=dict(info.value_range),
                 meta={k: v[:n] for k, v in getattr(data, "meta", {}).items()})


def modality_means(data, max_examples: int = 0, *, batch_size: int = 64
                   ) -> dict[str, np.ndarray]:
  """Per-modality mean example (model space) over the first `max_examples` (0: all)
  examples, accumulated batch by batch in float64 (bounded memory)."""
  n = _count(data, max_examples)
  sums = {m: np.zeros(shape, np.float64) for m, shape in data.info.shapes.items()}
  with eval_pass(data, batch_size=min(batch_size, n), max_examples=n, process_index=0,
                 process_count=1) as batches:
    for batch in batches:
      for m in sums:
        sums[m] += batch["inputs"][m][batch["valid"]].sum(axis=0, dtype=np.float64)
  return {m: (total / n).astype(np.float32) for m, total in sums.items()}


def _count(data, max_examples: int) -> int:
  """`min(max_examples, len(data))`, or `len(data)` for 0; fails on an empty source."""
  if max_examples < 0:
    raise ValueError(f"max_examples: expected >= 0, got {max_examples}")
  if len(data) == 0:
    raise ValueError(f"data: expected at least one example in split {data.split!r} of "
                     f"{data.name!r}, got none")
  return len(data) if max_examples == 0 else min(max_examples, len(data))
