"""`av_digits`: audio-visual spoken digits in the spirit of AV-MNIST.

Modalities "audio" (log-mel spectrogram [100, 40, 1] of a spoken digit; see
`mmsafe.data.av_digits_audio`) and "visual" (a handwritten digit image: mfeat
`pix` [16, 15, 1] for `av_digits`, or scikit-learn's `load_digits` [8, 8, 1]
(BSD-3; UCI optdigits, CC BY 4.0) for `av_digits_8x8`). An audio clip and an
image are paired only through their label (seeded, fixed pairing), as in
AV-MNIST.

The audio split is by voice: 360 synthetic train voices (3,600 clips), 40
synthetic validation voices (400 clips) and six human test voices (60 clips)
with the default 400 voices. Each train / validation clip is paired with one
image of the matching split of the image pool (the same stratified 70/10/20
split as mfeat); each test clip with `test_images_per_clip` (default 6)
distinct test images of its digit: 360 test examples by default. Inputs are
standardised with train statistics (`mmsafe.data.dataset`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from mmsafe.checks import select_modalities
from mmsafe.data.av_digits_audio import (DEFAULT_NUM_VOICES, SPLIT_CODES, av_digits_cache_path,
                                         build_av_digits, read_av_cache,
                                         read_av_cache_or_none)
from mmsafe.data.dataset import (NUM_CLASSES, Dataset, check_split, standardized_dataset,
                                 stratified_split)
from mmsafe.data.mfeat import MFEAT_PIX_RANGE, load_mfeat_raw, mfeat_view

AV_MODALITIES: tuple[str, ...] = ("audio", "visual")
AV_VISUAL_SOURCES: tuple[str, ...] = ("mfeat", "sklearn")
DEFAULT_TEST_IMAGES_PER_CLIP = 6
_SKLEARN_DIGITS_RANGE = (0.0, 16.0)

# One split's raw inputs (modality -> [N, ...]), labels [N] and provenance meta.
_SplitArrays = tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]


def _image_pool(visual: str, data_dir) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
  """(raw images float32 [N, H, W, 1], int32 labels [N], raw value range)."""
  if visual == "mfeat":
    views, labels = load_mfeat_raw(data_dir)
    return mfeat_view("pix", views["pix"]), labels, MFEAT_PIX_RANGE
  if visual == "sklearn":
    from sklearn.datasets import load_digits
    digits = load_digits()
    return (digits.images.astype(np.float32)[..., None], digits.target.astype(np.int32),
            _SKLEARN_DIGITS_RANGE)
  raise ValueError(f"visual: expected one of {list(AV_VISUAL_SOURCES)}, got {visual!r}")


def _pair(clip_idx: np.ndarray, clip_labels: np.ndarray, repeats: int, pool_idx: np.ndarray,
          pool_labels: np.ndarray, key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Pairs every clip `repeats` times with images of its label.

  Per class, the images of the split are taken in a seeded random order and
  handed out in turn, so an image repeats only once all images of its class
  have been used. Returns (clip indices, image indices), in a seeded order that
  does not depend on the image pool. `key` seeds both.
  """
  order_rng = np.random.default_rng([*key, 0])
  image_rng = np.random.default_rng([*key, 1])
  clips = np.repeat(clip_idx, repeats)
  labels = np.repeat(clip_labels, repeats)
  images = np.empty_like(clips)
  for c in range(NUM_CLASSES):
    where = np.flatnonzero(labels == c)
    if where.size == 0:
      continue
    candidates = image_rng.permutation(pool_idx[pool_labels[pool_idx] == c])
    if candidates.size == 0:
      raise ValueError(f"av_digits: no image of class {c} in the image split")
    images[where] = candidates[np.arange(where.size) % candidates.size]
  order = order_rng.permutation(clips.size)
  return clips[order], images[order]


def _split_arrays(split: str, cache: Mapping[str, np.ndarray], images: np.ndarray,
                  image_labels: np.ndarray, image_split: Mapping[str, np.ndarray],
                  modalities: Sequence[str], seed: int, repeats: int) -> _SplitArrays:
  """Split `split`'s clips, each paired `repeats` times with an image of its digit."""
  clip_labels = cache["label"].astype(np.int32)
  clips = np.flatnonzero(cache["split"] == SPLIT_CODES[split])
  key = (int(seed), 0xA7D, SPLIT_CODES[split])
  c, i = _pair(clips, clip_labels[clips], repeats, image_split[split], image_labels, key)
  raw = {}
  if "audio" in modalities:
    raw["audio"] = cache["audio"][c].astype(np.float32)[..., None]
  if "visual" in modalities:
    raw["visual"] = images[i]
  raw = {m: raw[m] for m in modalities}
  meta = {"voice": cache["voice"][c], "clip_index": c, "image_index": i}
  return raw, clip_labels[c], meta


def _audio_cache(data_dir: str | os.PathLike | None, num_voices: int, build: bool,
                 sounds_dir: str | os.PathLike | None) -> dict[str, np.ndarray]:
  """The audio cache's arrays, built first when it is missing, damaged or stale (if
  `build`)."""
  path = av_digits_cache_path(data_dir, num_voices)
  arrays = read_av_cache_or_none(path)
  if arrays is not None:
    return arrays
  if not build:
    raise FileNotFoundError(f"av_digits: cache {path} is missing, damaged or stale; build it "
                            f"with `python -m experiments.build_data --dataset=av_digits "
                            f"--num_voices={num_voices}`")
  build_av_digits(data_dir, num_voices=num_voices, force=True, sounds_dir=sounds_dir)
  return read_av_cache(path)


def load_av_digits(split: str, *, visual: str = "mfeat",
                   modalities: str | Sequence[str] | None = None,
                   data_dir: str | os.PathLike | None = None, seed: int = 0,
                   num_voices: int = DEFAULT_NUM_VOICES,
                   test_images_per_clip: int = DEFAULT_TEST_IMAGES_PER_CLIP,
                   build: bool = True, sounds_dir: str | os.PathLike | None = None) -> Dataset:
  """Split `split` of av_digits (see the module docstring).

  Shapes: audio `[N, 100, 40, 1]`; visual `[N, 16, 15, 1]` (visual="mfeat")
  or `[N, 8, 8, 1]` (visual="sklearn"); float32. Default sizes: 3,600 train,
  400 validation, 360 test. `seed` selects the image split and the
  audio-image pairing; the audio split (by voice) is fixed. The audio cache is
  built on first use unless `build=False` (then a missing cache raises
  FileNotFoundError).
  """
  check_split(split)
  modalities = select_modalities(modalities, AV_MODALITIES, what="av_digits modality")
  if visual not in AV_VISUAL_SOURCES:
    raise ValueError(f"visual: expected one of {list(AV_VISUAL_SOURCES)}, got {visual!r}")
  if test_images_per_clip < 1:
    raise ValueError(f"test_images_per_clip: expected >= 1, got {test_images_per_clip}")
  cache = _audio_cache(data_dir, num_voices, build, sounds_dir)
  floor = float(json.loads(str(cache["info"]))["floor"])
  images, image_labels, image_range = _image_pool(visual, data_dir)
  image_split = stratified_split(image_labels, seed)

  def arrays(s: str) -> _SplitArrays:
    """Split `s`'s arrays (test clips are paired `test_images_per_clip` times)."""
    repeats = test_images_per_clip if s == "test" else 1
    return _split_arrays(s, cache, images, image_labels, image_split, modalities, seed, repeats)

  train = arrays("train")
  raw, labels, meta = train if split == "train" else arrays(split)
  name = "av_digits" if visual == "mfeat" else "av_digits_8x8"
  return standardized_dataset(name, split, raw, train[0], labels,
                              {"audio": (floor, 0.0), "visual": image_range}, meta)
