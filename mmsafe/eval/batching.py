"""Running a compiled per-batch program over a split, and per-example flags.

Every evaluator measures by running one compiled program `fn(variables,
inputs, labels, key, value) -> (bad [B], extra [B])` over batches of its split
(`over_batches`) or of a subset of its examples (`over_rows`): batch i of a
task gets `fold_in(task_key(seed, kind, task), i)`, so an evaluator's numbers
depend on its seed, its kind and its task number only (the same whether it
runs alone or in the robustness suite).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmsafe.data.plans import eval_batches

Array = jax.Array
Progress = Callable[[int], None] | None
MULTI = "multi"  # scope name of the multi-modal (all modalities, joint budget) attacks
# Each kind draws its randomness from the seed with its own index folded in.
KIND_INDEX = {"clean": 0, "fgm": 1, "pgd": 2, "missing": 3, "decoupling": 4, "sweep": 5}


def task_key(seed: int, kind: str, index: int) -> Array:
  """The key of task number `index` of `kind` (the seed, the kind's index and the
  task's folded in)."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), KIND_INDEX[kind])
  return jax.random.fold_in(key, index)


def encode_flags(flags: np.ndarray) -> str:
  """bool [N] as a hex string of its packed bits (compact in JSON; `decode_flags`)."""
  return np.packbits(np.asarray(flags, bool)).tobytes().hex()


def decode_flags(text: str, num_examples: int) -> np.ndarray:
  """The bool [num_examples] that `encode_flags` encoded."""
  packed = np.frombuffer(bytes.fromhex(text), np.uint8)
  if packed.size != -(-num_examples // 8):
    raise ValueError(f"flags: expected {-(-num_examples // 8)} bytes for {num_examples} "
                     f"examples, got {packed.size}")
  return np.unpackbits(packed)[:num_examples].astype(bool)


def balanced_batch_size(num_examples: int, batch_size: int) -> int:
  """The size of the fewest equal batches of at most `batch_size` covering
  `num_examples` (the last one padded by fewer rows than there are batches)."""
  num_batches = math.ceil(num_examples / max(min(batch_size, num_examples), 1))
  return math.ceil(num_examples / max(num_batches, 1))


def over_batches(fn: Callable, variables: Any, inputs: Mapping[str, np.ndarray],
                 labels: np.ndarray, *, batch_size: int, key: Array, value: Any = 0.0,
                 progress: Progress = None) -> tuple[np.ndarray, np.ndarray]:
  """Runs `fn(variables, inputs, labels, key, value) -> (bad [B], extra [B])` over
  batches of a split (batch i gets `fold_in(key, i)`), calling `progress(1)`
  after each. The split is cut into the fewest batches of at most
  `batch_size`, all of one size (`balanced_batch_size`): one compilation per
  program, and at most one padded row per batch (400 examples in batches of
  at most 256: two batches of 200, not 256 + 144 with two compilations, nor
  512 rows).

  Returns:
    (bad bool [N], extra float64 [N]) of the real examples.
  """
  return _over(fn, variables, eval_batches(
      inputs, labels, batch_size=balanced_batch_size(len(labels), batch_size)),
               key=key, value=value, progress=progress)


def _over(fn: Callable, variables: Any, batches, *, key: Array, value: Any,
          progress: Progress = None) -> tuple[np.ndarray, np.ndarray]:
  """`over_batches` on the given batches (each with its `"valid"` rows first)."""
  bad_parts, extra_parts = [], []
  for index, batch in enumerate(batches):
    size = int(batch["valid"].sum())  # the real examples come first
    bad, extra = fn(variables, batch["inputs"], jnp.asarray(batch["label"], jnp.int32),
                    jax.random.fold_in(key, index), value)
    bad_parts.append(np.asarray(bad)[:size])
    extra_parts.append(np.asarray(extra, np.float64)[:size])
    if progress is not None:
      progress(1)
  return np.concatenate(bad_parts), np.concatenate(extra_parts)


def subset_batch_size(num_rows: int, full_batch_size: int) -> int:
  """The batch size for `num_rows` examples of a split batched by `full_batch_size`
  (`balanced_batch_size` of the whole split): the smallest of `full_batch_size`,
  its halves, quarters, ... (down to 8 rows) that covers the rows in as few
  batches as `full_batch_size` does. Subsets of any size then compile for a
  handful of shapes, and at most half of a batch is padding."""
  num_batches = math.ceil(num_rows / full_batch_size)
  needed = math.ceil(num_rows / max(num_batches, 1))
  size = full_batch_size
  while math.ceil(size / 2) >= max(needed, 8):
    size = math.ceil(size / 2)
  return size


def over_rows(fn: Callable, variables: Any, inputs: Mapping[str, np.ndarray],
              labels: np.ndarray, rows: np.ndarray, *, batch_size: int, key: Array,
              value: Any = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """`over_batches` on the examples `rows` (int indices) of a split batched by
  `batch_size`, in batches of `subset_batch_size`.

  Returns:
    (bad bool [len(rows)], extra float64 [len(rows)]).
  """
  if len(rows) == 0:
    return np.zeros(0, bool), np.zeros(0, np.float64)
  size = subset_batch_size(len(rows), balanced_batch_size(len(labels), batch_size))
  return _over(fn, variables, eval_batches({m: x[rows] for m, x in inputs.items()},
                                           labels[rows], batch_size=size),
               key=key, value=value)
