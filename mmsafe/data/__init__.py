"""Datasets: small real embedded ones (`mfeat`, `av_digits`), the papers' clip
datasets built with TFDS (`kinetics_sounds`, `ucf101_rgb_flow`, `vggsound`; see
`mmsafe.data.tfds`), the clip dataset made on this machine and built on first
use through the same TFDS path (`av_clips`; `mmsafe.data.av_clips`), and
batching."""

from __future__ import annotations

import dataclasses
import os

from mmsafe.data.av_digits_audio import MissingDependencyError
from mmsafe.data.clip_dataset import ClipDataset
from mmsafe.data.dataset import Dataset
from mmsafe.data.embedded import EMBEDDED_DATASETS, load_embedded
from mmsafe.data.clips import ClipPreprocessing, normalize_inputs, preprocess_clip
from mmsafe.data.loader import Batches
from mmsafe.data.plans import eval_batches, take, train_batch
from mmsafe.data.source import (check_splits, eval_pass, in_memory, modality_means, split_off,
                                train_iterator)
from mmsafe.data.types import SourceInfo, Standardization, validate_batch

TFDS_DATASETS = ("av_clips", "kinetics_sounds", "ucf101_rgb_flow", "vggsound")


def load(name: str, split: str, **kwargs) -> Dataset | ClipDataset:
  """Loads split `split` of dataset `name`.

  Embedded datasets: in-memory arrays (see `Dataset`; kwargs: `modalities`).
  TFDS clip datasets (`TFDS_DATASETS`, optionally with a config:
  "ucf101_rgb_flow/split2"; `split` may be a TFDS slice such as
  "train[95%:]"): a `ClipDataset` of stored examples (`load_tfds`); batch
  either with `train_iterator` / `eval_pass`. `av_clips` is built on first use into `data_dir`
  (default `$MMSAFE_DATA_DIR`; extra kwargs `spec`, `build`, `workers`: see
  `mmsafe.data.av_clips_cache.ensure_av_clips`).
  """
  if name in EMBEDDED_DATASETS:
    return load_embedded(name, split, **kwargs)
  if name == "av_clips":
    from mmsafe.data.av_clips_cache import ensure_av_clips
    options = {k: kwargs.pop(k) for k in ("spec", "build", "workers") if k in kwargs}
    kwargs["data_dir"] = os.fspath(ensure_av_clips(kwargs.pop("data_dir", None), **options))
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
      modalities, ...); unknown names fail. `normalize` defaults to False here:
      batches keep the stored uint8 frames and the dataset's `prepare_inputs`
      normalises them inside the compiled steps.
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
  preprocessing.setdefault("normalize", False)  # uint8 to the device (`prepare_inputs`)
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return ClipDataset(name=name, split=split, source=source,
                     num_classes=int(source.dataset_info.features["label"].num_classes),
                     preprocessing=ClipPreprocessing(**preprocessing))


__all__ = ["EMBEDDED_DATASETS", "TFDS_DATASETS", "Batches", "ClipDataset", "ClipPreprocessing",
           "Dataset", "MissingDependencyError", "SourceInfo", "Standardization", "check_splits",
           "eval_batches", "eval_pass", "in_memory", "load", "load_embedded", "load_tfds",
           "modality_means", "normalize_inputs", "preprocess_clip", "split_off", "take",
           "train_batch", "train_iterator", "validate_batch"]
