"""Loading batches with grain: `grain_batches` maps a dataset of batch plans
(`mmsafe.data.plans`) by a reader (`ReadClips` for clip records,
`mmsafe.data.plans.ReadArrays` for in-memory arrays) with worker threads or
processes and prefetch, into `Batches`, an iterator whose position can be saved
and restored. `train_iterator` and `eval_pass` (`mmsafe.data.source`) load every
source this way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmsafe.data.clips import ClipPreprocessing, clip_output_spec, preprocess_clip
from mmsafe.data.plans import example_rng


class Batches:
  """An iterator over batches loaded by grain, whose position can be saved and restored.

  Wraps the iterator of a grain `IterDataset` (worker threads, optionally worker
  processes); `get_state()` is a JSON-able dict (the first step of the plan, the
  step of the next batch, the workers and grain's own iterator state) that
  `set_state` restores, so a resumed run continues from the exact batch it stopped
  at. Use as an iterator; `close()` (or a `with` block) stops grain's workers.
  Errors raised while loading are re-raised by `next()`.
  """

  def __init__(self, dataset, *, start_step: int, workers: dict):
    self._start_step, self._workers = int(start_step), dict(workers)
    self._iterator = iter(dataset)
    self._step = self._start_step
    self._closed = False

  def __iter__(self) -> "Batches":
    return self

  def __next__(self) -> dict:
    if self._closed:
      raise StopIteration
    try:
      batch = next(self._iterator)
    except BaseException:
      self.close()
      raise
    self._step += 1
    return batch

  @property
  def step(self) -> int:
    """The step (plan index) of the next batch."""
    return self._step

  def get_state(self) -> dict:
    """The position: `{"start_step", "step", "workers", "grain"}` (JSON-able)."""
    return {"start_step": self._start_step, "step": self._step, "workers": self._workers,
            "grain": self._iterator.get_state()}

  def set_state(self, state: dict) -> None:
    """Moves to the position `state` (from `get_state` of an iterator built with the
    same `start_step` and workers).

    Raises:
      ValueError: `state` was saved by an iterator with another start step or workers.
    """
    expected = {"start_step": self._start_step, "workers": self._workers}
    saved = {key: state.get(key) for key in expected}
    if saved != expected:
      raise ValueError(f"data iterator state: expected one saved with {expected}, got {saved}")
    self._iterator.set_state(state["grain"])
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops grain's worker threads and processes."""
    if not self._closed:
      self._closed = True
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()

  def __enter__(self) -> "Batches":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


@dataclasses.dataclass(frozen=True)
class ReadClips:
  """Reads one batch of clips: the examples `index` of `source`, preprocessed (training:
  `example_rng(seed, epoch, index)` each) into preallocated arrays; picklable, so grain's
  worker processes each hold a copy of the source."""

  source: Sequence
  config: ClipPreprocessing
  train: bool
  seed: int = 0

  @functools.cached_property
  def spec(self) -> dict[str, tuple[tuple[int, ...], Any]]:
    return clip_output_spec(self.source, self.config)

  def __call__(self, plan: tuple) -> dict:
    index, epoch, extra = plan
    batch = {"inputs": {m: np.empty((len(index), *shape), dtype)
                        for m, (shape, dtype) in self.spec.items()},
             "label": np.empty((len(index),), np.int32)}
    for slot, i in enumerate(index):
      rng = example_rng(self.seed, epoch, int(i)) if self.train else None
      example = preprocess_clip(self.source[int(i)], train=self.train, rng=rng,
                                config=self.config)
      for m, x in example["inputs"].items():
        batch["inputs"][m][slot] = x
      batch["label"][slot] = example["label"]
    batch.update(extra)
    return batch


def grain_batches(plans, read, *, start_step: int = 0, num_threads: int = 4,
                  prefetch: int = 2, processes: int = 0) -> Batches:
  """Batches `read(plans[k])` for k = 0, 1, ..., loaded by grain: a `MapDataset` of
  batch plans mapped by `read` (`ReadClips` / `ReadArrays`), read by `num_threads`
  threads with `prefetch` batches buffered, or, with `processes > 0`, by that many
  worker processes (grain's `mp_prefetch`, round-robin over batches, so the order
  does not depend on the workers). `plans` is a `MapDataset` (or a sequence)."""
  import grain
  for name, value, low in (("num_threads", num_threads, 0), ("prefetch", prefetch, 0),
                           ("processes", processes, 0)):
    if int(value) < low:
      raise ValueError(f"loader.{name}: expected >= {low}, got {value}")
  dataset = plans if isinstance(plans, grain.MapDataset) else grain.MapDataset.source(plans)
  dataset = dataset.map(read).to_iter_dataset(grain.ReadOptions(
      num_threads=int(num_threads), prefetch_buffer_size=max(int(prefetch), int(num_threads))))
  if processes > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(processes)))
  return Batches(dataset, start_step=start_step,
                 workers={"num_threads": int(num_threads), "processes": int(processes)})
