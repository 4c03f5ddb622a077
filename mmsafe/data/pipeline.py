"""Host-side batching of in-memory datasets and of TFDS clip datasets, and batch validation.

Batches are plain numpy pytrees `{"inputs": {m: [B, ...]}, "label": int32[B]}`.
The order of training examples is a pure function of
`(seed, epoch)`, so a run resumed at any step sees exactly the batches an
uninterrupted run would have seen.

In-memory arrays: `train_batch`, `eval_batches`. Clip datasets built by
`mmsafe.data.tfds` (random access through `tfds.data_source`): `clip_train_iterator`
and `clip_eval_iterator` shard the index space per host (`host_train_indices`,
`shard_indices`), apply `preprocess_clip` (training augmentation or
deterministic evaluation preprocessing, then optionally normalisation) and load
batches with grain (`grain_batches`: worker threads or processes, prefetch, a
checkpointable position). `make_iterator` (`mmsafe.data`) loads in-memory
arrays through the same grain pipeline.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mmsafe.checks import check_inputs, check_labels
from mmsafe.data.dataset import Standardization


def validate_batch(batch: Mapping, input_shapes: Mapping[str, tuple[int, ...]],
                   num_classes: int, *, raw_inputs: bool = False) -> None:
  """Fails fast on a malformed batch, naming the field, expected and actual value.

  Checks: the "inputs" and "label" keys, integer labels `[B]` in `[0, num_classes)`,
  the inputs as `mmsafe.checks.check_inputs` does (every modality present, no extras,
  per-example shapes, floating dtypes, batch size B) and finite values. With
  `raw_inputs` (clips normalised on the device) uint8 inputs are accepted too.
  """
  for key in ("inputs", "label"):
    if key not in batch:
      raise ValueError(f"batch: missing key {key!r}; expected keys 'inputs' and 'label', "
                       f"got {sorted(batch)}")
  labels = np.asarray(batch["label"])
  check_labels(labels, num_classes, field="batch['label']")
  inputs = {m: np.asarray(x) for m, x in batch["inputs"].items()}
  # uint8 raw inputs are checked for their shapes on a float32 stand-in (no copy).
  shaped = {m: np.broadcast_to(np.float32(0), x.shape) if raw_inputs and x.dtype == np.uint8
            else x for m, x in inputs.items()}
  check_inputs(shaped, input_shapes, batch_size=labels.shape[0], field="batch['inputs']")
  for m in input_shapes:
    if np.issubdtype(inputs[m].dtype, np.floating):
      _check_finite(inputs[m], f"batch['inputs'][{m!r}]")


def _check_finite(x: np.ndarray, field: str) -> None:
  """Raises ValueError naming `field`, the count of NaN/Inf entries and the first bad example."""
  finite = np.isfinite(x)
  if not finite.all():
    bad = int(np.argwhere(~finite.reshape(x.shape[0], -1).all(axis=1))[0, 0])
    raise ValueError(f"{field}: expected finite values, got {int((~finite).sum())} NaN/Inf "
                     f"entries (first in example {bad})")


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The training order of epoch `epoch`: a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def take(inputs: Mapping[str, np.ndarray], labels: np.ndarray, index: np.ndarray) -> dict:
  """The batch made of examples `index`."""
  return {"inputs": {m: x[index] for m, x in inputs.items()}, "label": labels[index]}


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


def clip_train_iterator(source: Sequence, *, batch_size: int, seed: int, start_step: int = 0,
                        num_steps: int | None = None, process_index: int = 0,
                        process_count: int = 1,
                        config: ClipPreprocessing = ClipPreprocessing(),
                        num_threads: int = 4, prefetch: int = 2,
                        processes: int = 0) -> Batches:
  """Training batches of this host from step `start_step` on (forever, or `num_steps`).

  `batch_size` is per host. Batch `step` holds `host_train_indices(...)` examples,
  each augmented with `example_rng(seed, epoch, index)`: a pure function of
  (seed, step, process_index, process_count), so a resumed run sees the same data.
  Workers: `num_threads` threads, or `processes` processes (see `grain_batches`).
  """
  plans = train_plans(len(source), batch_size=batch_size, seed=seed, start_step=start_step,
                      num_steps=num_steps, process_index=process_index,
                      process_count=process_count)
  return grain_batches(plans, ReadClips(source, config, train=True, seed=int(seed)),
                       start_step=start_step, num_threads=num_threads, prefetch=prefetch,
                       processes=processes)


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


def clip_eval_iterator(source: Sequence, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1,
                       config: ClipPreprocessing = ClipPreprocessing(),
                       num_threads: int = 4, prefetch: int = 2,
                       processes: int = 0) -> Batches:
  """Evaluation batches of this host (deterministic preprocessing), each with a boolean
  `"valid"` [B]; every host yields the same number of batches (`clip_eval_batches`)."""
  clip_output_spec(source, config)  # fails fast on an empty source or absent modalities
  plans = eval_plans(len(source), batch_size=batch_size, process_index=process_index,
                     process_count=process_count)
  return grain_batches(plans, ReadClips(source, config, train=False), num_threads=num_threads,
                       prefetch=prefetch, processes=processes)
