"""Clip decoding and preprocessing: the stored clip records of `mmsafe.data.tfds`
-> model inputs (`preprocess_clip`: training augmentation or deterministic
evaluation preprocessing, then optionally normalisation), and the per-modality
statistics of clip inputs (`clip_standardization`, `normalize_inputs`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmsafe.data.types import Standardization


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUDIO_MEAN = -4.503877  # AST/CRMT fbank statistics: x -> (x - mean) / (2 * std)
AUDIO_STD = 5.141276
CLIP_MODALITIES = ("visual", "audio", "flow")
PIXEL_UNIT = "pixel/255"  # the input unit of uint8 frames and flow: a stored byte / 255


@dataclasses.dataclass(frozen=True)
class ClipPreprocessing:
  """Read-time preprocessing of clip datasets (defaults: the papers').

  Training: `num_frames` frames, one drawn uniformly within each of
  `num_frames` equal segments ("thirds") of the stored 1-fps frames; each frame
  gets its own random resized crop (area fraction in `crop_scale`, aspect ratio
  log-uniform in `crop_ratio`, both measured in the source's display geometry,
  torchvision's algorithm with its 10 tries and central fallback) resized to
  `image_size` (Pillow bilinear) and a horizontal flip with probability 1/2 when
  `flip`. A frame's flow images get the same crop and flip as its RGB frame (a
  flip negates u). Evaluation: the middle frame of each segment, the whole frame
  resized to `image_size x image_size`, no flip; deterministic.

  Normalisation (`normalize=True`): frames `(x / 255 - IMAGENET_MEAN) / IMAGENET_STD`;
  audio `(x + 4.503877) / (2 * 5.141276)`; flow `q / 127.5 - 1` (= flow / bound).
  With `normalize=False` batches hold uint8 frames/flow and the stored audio
  dtype (4x less host-to-device traffic); apply `normalize_inputs` on device.

  Attributes:
    modalities: the modalities to emit (default: all the records have).
  """

  image_size: int = 224
  num_frames: int = 3
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  normalize: bool = True
  modalities: tuple[str, ...] | None = None


def frame_segments(num_stored: int, num_frames: int) -> list[tuple[int, int]]:
  """`num_frames` contiguous, non-empty `[start, stop)` segments covering `num_stored` frames
  (`floor(k * n / num_frames)` boundaries); fewer stored frames than segments repeat frames."""
  if num_stored <= 0:
    raise ValueError(f"frame_segments: expected at least one stored frame, got {num_stored}")
  bounds = [k * num_stored // num_frames for k in range(num_frames + 1)]
  return [(min(a, num_stored - 1), max(b, min(a, num_stored - 1) + 1))
          for a, b in zip(bounds[:-1], bounds[1:])]


def select_frames(num_stored: int, num_frames: int,
                  rng: np.random.Generator | None = None) -> np.ndarray:
  """One stored-frame index per segment: uniform within it with `rng` (training), its
  middle (`(start + stop - 1) // 2`) without (evaluation)."""
  segments = frame_segments(num_stored, num_frames)
  if rng is None:
    return np.array([(a + b - 1) // 2 for a, b in segments], np.int64)
  return np.array([rng.integers(a, b) for a, b in segments], np.int64)


def random_resized_crop(rng: np.random.Generator, aspect: float,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
                        ) -> tuple[float, float, float, float]:
  """torchvision's RandomResizedCrop parameters for a frame of display aspect
  `aspect` (width / height), as a box `(x0, y0, x1, y1)` in fractions of the frame,
  drawn in continuous coordinates (so a squashed stored frame crops the same region)."""
  aspect = float(aspect) if aspect and np.isfinite(aspect) and aspect > 0 else 1.0
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = aspect * rng.uniform(scale[0], scale[1])
    r = math.exp(rng.uniform(*log_ratio))
    w, h = math.sqrt(target * r), math.sqrt(target / r)
    if 0 < w <= aspect and 0 < h <= 1:
      x0, y0 = rng.uniform(0, aspect - w), rng.uniform(0, 1 - h)
      return (x0 / aspect, y0, (x0 + w) / aspect, y0 + h)
  if aspect < ratio[0]:
    w, h = aspect, aspect / ratio[0]
  elif aspect > ratio[1]:
    w, h = ratio[1], 1.0
  else:
    w, h = aspect, 1.0
  x0, y0 = (aspect - w) / 2, (1 - h) / 2
  return (x0 / aspect, y0, (x0 + w) / aspect, y0 + h)


def decode_view(data: bytes, size: int, box: tuple[float, float, float, float] | None = None,
                flip: bool = False) -> np.ndarray:
  """Decodes a JPEG/PNG frame and returns the `box` region (fractions; None: all of it)
  resized to `size x size` with Pillow's bilinear filter, optionally mirrored: uint8
  `[size, size]` (gray) or `[size, size, 3]`."""
  import io
  from PIL import Image
  with Image.open(io.BytesIO(bytes(data))) as img:
    width, height = img.size
    if box is None:
      view = img if (width, height) == (size, size) else img.resize((size, size), Image.BILINEAR)
    else:
      view = img.resize((size, size), Image.BILINEAR,
                        box=(box[0] * width, box[1] * height, box[2] * width, box[3] * height))
    if flip:
      view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(view)


def clip_modalities(record: Mapping, config: ClipPreprocessing) -> tuple[str, ...]:
  """The modalities emitted for `record` (config.modalities, checked, or all present)."""
  present = tuple(m for m in CLIP_MODALITIES if m in record)
  if config.modalities is None:
    return present
  missing = sorted(set(config.modalities) - set(present))
  if missing:
    raise ValueError(f"ClipPreprocessing.modalities: {missing} not in the dataset's "
                     f"modalities {list(present)}")
  return tuple(config.modalities)


def _scale_shift(x, scale, shift):
  """float32 `x * scale - shift` with per-channel (last axis) `scale`, `shift`.

  numpy arrays take a fast path (the per-channel constants tiled over the width, so
  numpy's inner loops run over contiguous rows instead of 3-element broadcasts, ~15x
  faster); other arrays (jax) use plain broadcasting.
  """
  scale, shift = np.asarray(scale, np.float32), np.asarray(shift, np.float32)
  if isinstance(x, np.ndarray) and x.ndim >= 2:
    width = x.shape[-2] * x.shape[-1]
    reps = x.shape[-2] if scale.size > 1 else width
    y = np.multiply(x.reshape(-1, width), np.tile(scale, reps), dtype=np.float32)
    y -= np.tile(shift, reps)
    return y.reshape(x.shape)
  return x.astype(np.float32) * scale - shift


def clip_standardization(modality: str) -> Standardization:
  """The read-time normalisation of a clip modality as `x = (raw - mean) / std`:
  visual `(x / 255 - IMAGENET_MEAN) / IMAGENET_STD`, flow `x / 127.5 - 1`, audio
  `(x + 4.503877) / (2 * 5.141276)`. Input units (what a user perturbs, the
  units of certified radii): frames and flow in pixel/255 (a stored byte / 255),
  audio in raw fbank units."""
  if modality == "visual":
    return Standardization(mean=255.0 * np.asarray(IMAGENET_MEAN, np.float32),
                           std=255.0 * np.asarray(IMAGENET_STD, np.float32),
                           unit=PIXEL_UNIT, raw_per_unit=255.0)
  if modality == "flow":
    return Standardization(mean=np.float32(127.5), std=np.float32(127.5), unit=PIXEL_UNIT,
                           raw_per_unit=255.0)
  if modality == "audio":
    return Standardization(mean=np.float32(AUDIO_MEAN), std=np.float32(2.0 * AUDIO_STD),
                           unit="raw fbank")
  raise ValueError(f"modality: expected one of {list(CLIP_MODALITIES)}, got {modality!r}")


def normalize_inputs(inputs: Mapping) -> dict:
  """Normalises raw inputs (as emitted with `normalize=False`) to float32 model space
  (`clip_standardization` of each clip modality; other modalities pass through).
  Works on numpy arrays and, with only arithmetic and `astype`, on jax arrays
  under jit."""
  out = dict(inputs)
  for m in CLIP_MODALITIES:
    if m in out:
      s = clip_standardization(m)
      out[m] = _scale_shift(out[m], 1.0 / s.std, s.mean / s.std)
  return out


def preprocess_clip(record: Mapping, *, train: bool, rng: np.random.Generator | None = None,
                    config: ClipPreprocessing = ClipPreprocessing()) -> dict:
  """One stored example -> `{"inputs": {m: array}, "label": int32}` (see `ClipPreprocessing`).

  Shapes: visual `[num_frames, image_size, image_size, 3]`, flow `[num_frames,
  image_size, image_size, 2]`, audio `[F, B, 1]`. Training needs `rng` (all the
  randomness comes from it, so equal generators give equal outputs); evaluation
  uses none.
  """
  if train and rng is None:
    raise ValueError("preprocess_clip: train=True needs an rng")
  modalities = clip_modalities(record, config)
  inputs = {}
  frame_modalities = [m for m in ("visual", "flow") if m in modalities]
  if frame_modalities:
    stored = len(record[frame_modalities[0]])
    chosen = select_frames(stored, config.num_frames, rng if train else None)
    views = []
    for _ in chosen:
      if train:
        box = random_resized_crop(rng, float(record.get("aspect", 1.0)), config.crop_scale,
                                  config.crop_ratio)
        views.append((box, bool(config.flip and rng.random() < 0.5)))
      else:
        views.append((None, False))
    size = config.image_size
    if "visual" in modalities:
      inputs["visual"] = np.stack([decode_view(record["visual"][i], size, box, flip)
                                   for i, (box, flip) in zip(chosen, views)])
    if "flow" in modalities:
      flows = []
      for i, (box, flip) in zip(chosen, views):
        u = decode_view(record["flow"][i][0], size, box, flip)
        v = decode_view(record["flow"][i][1], size, box, flip)
        flows.append(np.stack([255 - u if flip else u, v], axis=-1))
      inputs["flow"] = np.stack(flows)
  if "audio" in modalities:
    inputs["audio"] = np.asarray(record["audio"])[..., None]
  if config.normalize:
    inputs = normalize_inputs(inputs)
  return {"inputs": inputs, "label": np.int32(record["label"])}


def clip_output_spec(source: Sequence, config: ClipPreprocessing
                     ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Per-example output shape and dtype of each modality (from `source[0]`)."""
  if len(source) == 0:
    raise ValueError("source: expected at least one example, got an empty split")
  record = source[0]
  modalities = clip_modalities(record, config)
  f32 = np.float32
  size, t = config.image_size, config.num_frames
  spec = {}
  if "visual" in modalities:
    spec["visual"] = ((t, size, size, 3), f32 if config.normalize else np.uint8)
  if "flow" in modalities:
    spec["flow"] = ((t, size, size, 2), f32 if config.normalize else np.uint8)
  if "audio" in modalities:
    audio = np.asarray(record["audio"])
    spec["audio"] = ((*audio.shape, 1), f32 if config.normalize else audio.dtype)
  return spec
