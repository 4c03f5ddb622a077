"""Which examples each batch holds: the plans of training steps and evaluation passes,
per host, and the in-memory batches they index.

The order of training examples is a pure function of `(seed, epoch)`, so a run
resumed at any step sees exactly the batches an uninterrupted run would have
seen. In-memory arrays: `train_batch`, `eval_batches`. Sources of any kind are
sharded per host by the same index plans (`host_train_indices`,
`shard_indices`, `clip_eval_batches`), as grain datasets of plans
(`train_plans`, `eval_plans`) that `mmsafe.data.loader.grain_batches` reads.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator, Mapping

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The training order of epoch `epoch`: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def take(inputs: Mapping[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> dict:
  """The batch made of examples `index`."""
  return {"inputs": {m: x[index] for m, x in inputs.items()}, "label": labels[index]}


@dataclasses.dataclass(frozen=True)
class ReadArrays:
  """Reads one batch of in-memory arrays: a slice of each (`take`)."""

  inputs: Mapping[str, np.ndarray]
  labels: np.ndarray

  def __call__(self, plan: tuple) -> dict:
    index, _, extra = plan
    batch = take(self.inputs, self.labels, index)
    batch.update(extra)
    return batch


def train_batch(inputs: Mapping[str, np.ndarray], labels: np.ndarray, *, batch_size: int,
                seed: int, step: int) -> dict:
  """Training batch number `step` (0-based, counted over all epochs).

  Each epoch is a fresh permutation; the incomplete last batch of an epoch is
  dropped so every step sees `batch_size` examples (`host_train_indices` with
  one host).
  """
  return take(inputs, labels, host_train_indices(len(labels), batch_size=batch_size, seed=seed,
                                                 step=step))


def eval_batches(inputs: Mapping[str, np.ndarray], labels: np.ndarray, *,
                 batch_size: int) -> Iterator[dict]:
  """Fixed-order batches covering every example once, by the one evaluation rule
  (`eval_plans`): the last one is completed to `batch_size` with copies of example 0
  and carries a boolean `"valid"` [B] marking real examples (first in the batch), so
  a jitted evaluation compiles once and counts each example once. (`"mask"` is
  reserved for per-modality presence masks.) Synchronous: for arrays at hand."""
  read = ReadArrays(inputs, labels)
  for plan in eval_plans(len(labels), batch_size=batch_size):
    yield read(plan)


# ----------------------------------------------------------------------------
# Clip datasets read from TFDS (`mmsafe.data.tfds`): random access, per-host
# sharding, read-time augmentation, normalisation, batching with prefetch.
#
# A *source* is anything with `len()` and `source[i]` returning one stored
# example (`tfds.data_source(...)`, `builder.as_data_source()[split]`, or a list
# of dicts): "visual" (object [T]: JPEG frames at 1 fps), optionally "audio"
# ([F, B] log-mel fbank) and "flow" (object [T, 2]: JPEG u, v), "aspect" (the
# source's display width / height) and "label".
# ----------------------------------------------------------------------------


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The augmentation randomness of example `index` in epoch `epoch`: independent of
  the batch size, the number of hosts and threads."""
  return np.random.default_rng([int(seed), int(epoch), int(index), 1])


def shard_indices(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """Host `process_index`'s contiguous block of `range(num_examples)`: blocks of all
  hosts are disjoint, cover every index and differ in size by at most one."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: expected in [0, {process_count}), got {process_index}")
  start = num_examples * process_index // process_count
  stop = num_examples * (process_index + 1) // process_count
  return np.arange(start, stop)


def host_train_indices(num_examples: int, *, batch_size: int, seed: int, step: int,
                       process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """The examples of this host's part of training batch `step` (0-based over all epochs).

  The global batch of `batch_size * process_count` examples is the slice `step` of
  `epoch_permutation(seed, epoch, num_examples)` (as `train_batch` does on one host)
  and host `process_index` takes its `batch_size`-long block: within an epoch the
  hosts' examples are disjoint and cover all but the `num_examples mod global batch`
  dropped ones, and the global batches do not depend on the number of hosts.
  """
  global_batch = batch_size * process_count
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size: expected batch_size * process_count = {global_batch} "
                     f"at most the {num_examples} training examples")
  epoch, position = divmod(int(step), steps_per_epoch)
  order = epoch_permutation(seed, epoch, num_examples)
  start = position * global_batch + process_index * batch_size
  return order[start:start + batch_size]


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Step -> (this host's example indices, epoch, {}) (`host_train_indices`)."""

  num_examples: int
  batch_size: int
  seed: int
  process_index: int
  process_count: int

  def __call__(self, step: int) -> tuple:
    steps_per_epoch = self.num_examples // (self.batch_size * self.process_count)
    index = host_train_indices(self.num_examples, batch_size=self.batch_size, seed=self.seed,
                               step=step, process_index=self.process_index,
                               process_count=self.process_count)
    return index, int(step) // steps_per_epoch, {}


def shard_options(process_index: int, process_count: int):
  """grain's per-host shard options (checked: `0 <= process_index < process_count`)."""
  import grain  # Imported where used here and below: it takes seconds to import.
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: expected in [0, {process_count}), got {process_index}")
  return grain.sharding.ShardOptions(shard_index=int(process_index),
                                     shard_count=int(process_count), drop_remainder=False)


def train_plans(num_examples: int, *, batch_size: int, seed: int, start_step: int = 0,
                num_steps: int | None = None, process_index: int = 0, process_count: int = 1):
  """The plans of training steps `start_step, ...` (forever, or `num_steps`) of this
  host as a grain `MapDataset` (`TrainPlan`); host from grain's `shard_options`."""
  import grain
  shard = shard_options(process_index, process_count)
  host_train_indices(num_examples, batch_size=batch_size, seed=seed, step=0,
                     process_index=shard.shard_index,
                     process_count=shard.shard_count)  # validates the sizes
  stop = sys.maxsize if num_steps is None else int(start_step) + int(num_steps)
  return grain.MapDataset.range(int(start_step), stop).map(TrainPlan(
      num_examples, batch_size, int(seed), shard.shard_index, shard.shard_count))


def eval_plans(num_examples: int, *, batch_size: int, process_index: int = 0,
               process_count: int = 1) -> list[tuple]:
  """This host's evaluation plans `(indices, 0, {"valid": mask})` (`clip_eval_batches`)."""
  shard = shard_options(process_index, process_count)
  return [(index, 0, {"valid": valid}) for index, valid in clip_eval_batches(
      num_examples, batch_size=batch_size, process_index=shard.shard_index,
      process_count=shard.shard_count)]


def clip_eval_batches(num_examples: int, *, batch_size: int, process_index: int = 0,
                      process_count: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
  """This host's evaluation batches as (indices, valid) pairs: its `shard_indices` block,
  completed (with the block's first example, or example 0) to the same number of
  `batch_size` batches on every host, `valid` marking real examples (the one
  evaluation rule of every source, embedded or clip)."""
  shard = shard_indices(num_examples, process_index, process_count)
  longest = -(-num_examples // process_count)
  num_batches = -(-longest // batch_size)
  fill = shard[0] if len(shard) else 0
  out = []
  for b in range(num_batches):
    position = np.arange(b * batch_size, (b + 1) * batch_size)
    valid = position < len(shard)
    index = np.full((batch_size,), fill, np.int64)
    index[valid] = shard[position[valid]]
    out.append((index, valid))
  return out
