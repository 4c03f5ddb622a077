"""Datasets: small real embedded ones (`mfeat`, `av_digits`), the papers' clip
datasets built with TFDS (`kinetics_sounds`, `ucf101_rgb_flow`, `vggsound`; see
`mmsafe.data.tfds`), and batching."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses

from mmsafe.data.av_digits_audio import MissingDependencyError
from mmsafe.data.clip_dataset import ClipDataset, full_pass, in_memory, modality_means
from mmsafe.data.dataset import Dataset, Standardization
from mmsafe.data.embedded import EMBEDDED_DATASETS, load_embedded
from mmsafe.data.pipeline import (ClipPreprocessing, clip_eval_batches, clip_eval_iterator,
                                  clip_train_iterator, eval_batches, host_train_indices,
                                  normalize_inputs, preprocess_clip, take, train_batch,
                                  validate_batch)

TFDS_DATASETS = ("kinetics_sounds", "ucf101_rgb_flow", "vggsound")


def load(name: str, split: str, **kwargs) -> Dataset | ClipDataset:
  """Loads split `split` of dataset `name`.

  Embedded datasets: in-memory arrays (see `Dataset`; kwargs: `modalities`).
  TFDS clip datasets (`TFDS_DATASETS`, optionally with a config:
  "ucf101_rgb_flow/split2"; `split` may be a TFDS slice such as
  "train[95%:]"): a `ClipDataset` of stored examples (`load_tfds`); batch
  either with `make_iterator`.
  """
  if name in EMBEDDED_DATASETS:
    return load_embedded(name, split, **kwargs)
  if name.split("/")[0] in TFDS_DATASETS:
    return load_tfds(name, split, **kwargs)
  raise ValueError(f"dataset: expected one of {sorted(EMBEDDED_DATASETS) + list(TFDS_DATASETS)}, "
                   f"got {name!r}")


def load_tfds(name: str, split: str, *, data_dir: str | None = None,
              **preprocessing) -> ClipDataset:
  """The prepared TFDS dataset `name` ("name" or "name/config") split `split` as a
  `ClipDataset` over `tfds.data_source` (random access, no TensorFlow).

  Args:
    data_dir: where `experiments/prepare.py` wrote it (default: TFDS's,
      `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    **preprocessing: `ClipPreprocessing` fields (image_size, num_frames,
      modalities, ...); unknown names fail.
  """
  import tensorflow_datasets as tfds

  import mmsafe.data.tfds  # noqa: F401  (registers the builders)
  fields = {f.name for f in dataclasses.fields(ClipPreprocessing)}
  unknown = sorted(set(preprocessing) - fields)
  if unknown:
    raise ValueError(f"data: unknown option(s) {unknown} for clip dataset {name!r}; expected "
                     f"data_dir or ClipPreprocessing fields {sorted(fields)}")
  if preprocessing.get("modalities") is not None:
    preprocessing["modalities"] = tuple(preprocessing["modalities"])
  for key in ("crop_scale", "crop_ratio"):
    if key in preprocessing:
      preprocessing[key] = tuple(preprocessing[key])
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return ClipDataset(name=name, split=split, source=source,
                     num_classes=int(source.dataset_info.features["label"].num_classes),
                     preprocessing=ClipPreprocessing(**preprocessing))


def make_iterator(data: Dataset | Sequence[dict], *, train: bool, batch_size: int,
                  seed: int = 0, start_step: int = 0, num_steps: int | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  config: ClipPreprocessing | None = None, num_threads: int = 4,
                  prefetch: int = 2, processes: int = 0) -> Iterator[dict]:
  """Batches of this host for training (`train=True`: from `start_step`, forever or
  `num_steps`) or evaluation (one pass, with `"valid"`), from `load(...)`'s result.

  `batch_size` is per host; `process_index` / `process_count` default to JAX's.
  TFDS sources go through `clip_train_iterator` / `clip_eval_iterator` (with
  `config`, default: a `ClipDataset`'s own or `ClipPreprocessing()`, `num_threads` or
  `processes`, `prefetch`); embedded `Dataset`s are sliced in memory with the same per-host
  example indices (with one host, exactly `train_batch` / `eval_batches`).
  """
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if config is None:
    config = data.preprocessing if isinstance(data, ClipDataset) else ClipPreprocessing()
  if isinstance(data, Dataset):
    return _in_memory_iterator(data, train=train, batch_size=batch_size, seed=seed,
                               start_step=start_step, num_steps=num_steps,
                               process_index=process_index, process_count=process_count)
  if train:
    return clip_train_iterator(data, batch_size=batch_size, seed=seed, start_step=start_step,
                               num_steps=num_steps, process_index=process_index,
                               process_count=process_count, config=config,
                               num_threads=num_threads, prefetch=prefetch, processes=processes)
  return clip_eval_iterator(data, batch_size=batch_size, process_index=process_index,
                            process_count=process_count, config=config,
                            num_threads=num_threads, prefetch=prefetch, processes=processes)


def _in_memory_iterator(data: Dataset, *, train: bool, batch_size: int, seed: int,
                        start_step: int, num_steps: int | None, process_index: int,
                        process_count: int) -> Iterator[dict]:
  """`make_iterator` for an in-memory `Dataset`: slices of its arrays."""
  if not train:
    for index, valid in clip_eval_batches(len(data), batch_size=batch_size,
                                          process_index=process_index,
                                          process_count=process_count):
      batch = take(data.inputs, data.labels, index)
      batch["valid"] = valid
      yield batch
    return
  step = start_step
  while num_steps is None or step < start_step + num_steps:
    yield take(data.inputs, data.labels,
               host_train_indices(len(data), batch_size=batch_size, seed=seed, step=step,
                                  process_index=process_index, process_count=process_count))
    step += 1


__all__ = ["EMBEDDED_DATASETS", "TFDS_DATASETS", "ClipDataset", "ClipPreprocessing", "Dataset",
           "MissingDependencyError", "Standardization", "eval_batches", "full_pass", "in_memory",
           "load", "load_embedded", "load_tfds", "make_iterator", "modality_means",
           "normalize_inputs", "preprocess_clip", "take", "train_batch", "validate_batch"]
