"""The one source type: every dataset split (an embedded in-memory `Dataset`, a TFDS
`ClipDataset`) is a random-access source with one `SourceInfo` record, read in
batches through grain.

A source has `len()`, an `info` (`SourceInfo`), `reader(train=..., seed=...,
normalized=...)` (a picklable function from a batch plan `(indices, epoch, extra)`
to a batch, see `mmsafe.data.loader.grain_batches`) and `prepare_inputs` (None, or
the map to model space applied inside the compiled steps). Everything here works on any
source: `full_pass` (one process, every example once), `host_pass` (this host's
rows), `in_memory`, `modality_means`, `check_splits`.

Evaluation batching, one rule for every consumer: batches of a fixed size whose
last one is completed with copies of the first example of the pass and carries a
boolean `"valid"` [B] marking real examples (first in the batch); consumers
count only valid rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mmsafe.data.dataset import Dataset
from mmsafe.data.loader import Batches, grain_batches
from mmsafe.data.plans import eval_plans


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


def full_pass(data, *, batch_size: int, max_examples: int = 0, num_threads: int = 4
              ) -> Batches:
  """Evaluation batches in model space (float32) covering the first `max_examples`
  (0: all) examples of `data` once on this process (no sharding over hosts), each
  with `"valid"` (the module's batching rule)."""
  n = _count(data, max_examples)
  plans = eval_plans(n, batch_size=max(1, min(batch_size, n)))
  return grain_batches(plans, data.reader(train=False, normalized=True),
                       num_threads=num_threads)


def host_pass(data, *, batch_size: int, process_index: int | None = None,
              process_count: int | None = None, num_threads: int = 4) -> Batches:
  """This host's evaluation batches in model space (float32): its contiguous block of
  `data` (`mmsafe.data.plans.shard_indices`), as many batches on every host, with
  `"valid"`.
  Host defaults: JAX's. Reduce what is computed from them over hosts
  (`mmsafe.train.distributed`)."""
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  plans = eval_plans(len(data), batch_size=max(1, min(batch_size, len(data))),
                     process_index=process_index, process_count=process_count)
  return grain_batches(plans, data.reader(train=False, normalized=True),
                       num_threads=num_threads)


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
  with full_pass(data, batch_size=batch_size, max_examples=n,
                 num_threads=num_threads) as batches:
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
  with full_pass(data, batch_size=batch_size, max_examples=n) as batches:
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
