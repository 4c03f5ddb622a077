"""What the clip datasets' builders share: configs, list parsing, the base builder.

A builder reads a *manual directory* (the user's own copy of the videos plus
class and split lists), processes every listed clip in a thread pool (the
work is in ffmpeg subprocesses, Pillow, kaldi-native-fbank and OpenCV, which
all release the GIL) and writes `array_record` files with plain
`tfds.features.Tensor` features, so neither writing nor reading needs
TensorFlow.

Clips whose media cannot be used (missing file, unreadable/corrupt file, no
video or audio stream, too short, flow failure; or listed twice) are
*skipped*, never fatal: they are counted and listed per split in the dataset's
`metadata.json` (`skip_summary` reads it back). Only a split left with no clip
at all stops the build (TFDS cannot write an empty split), with a ValueError
counting the reasons. Problems with the lists
themselves (missing manual directory or list file, a malformed line, an
unknown class, a class list of the wrong length) raise immediately with the
path, line and value at fault.

Builder constructor keywords besides TFDS's own (`data_dir`, `config`,
`version`): `num_workers` (clips processed in parallel; default: all CPUs) and
`progress` (called as `progress(split, clip_id, skip_reason_or_None)` once per
listed clip, for progress bars). The file format defaults to `array_record`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from mmsafe.data.tfds.media import MediaError

Progress = Callable[[str, str, "str | None"], None]


@dataclasses.dataclass
class ClipConfig(tfds.core.BuilderConfig):
  """Options shared by every clip dataset (defaults: the papers' preprocessing).

  Attributes:
    num_classes: expected number of classes (the class list must have exactly this many).
    frame_size: stored frames are squashed to `frame_size x frame_size` (the
      source's display aspect ratio is stored too, so random resized crops can
      be drawn in the source's geometry). 224 makes evaluation preprocessing
      the identity on the stored frame.
    max_frames: at most this many 1-fps frames are stored; longer clips are
      sampled uniformly at `max_frames / duration` fps instead.
    min_frames: clips with fewer frames are skipped as too short (3: one per third).
    jpeg_quality: frames (and flow) are stored as JPEG at this quality.
  """

  num_classes: int = 0
  frame_size: int = 224
  max_frames: int = 10
  min_frames: int = 3
  jpeg_quality: int = 90


@dataclasses.dataclass(frozen=True)
class Clip:
  """One listed clip: `path` relative to the media root (also the example key and
  `clip_id`), `label` (0-based), and `source` ("file:line" of the list entry)."""

  path: str
  label: int
  source: str


@dataclasses.dataclass(frozen=True)
class Skip:
  """A skipped clip: its path, the kind of problem and details (e.g. ffmpeg's message)."""

  clip: str
  kind: str
  detail: str


def require_file(path: str | os.PathLike, what: str) -> str:
  """`path` as a string if it is a file, else FileNotFoundError naming it and `what` it is."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what}: expected a file at {os.fspath(path)}")
  return os.fspath(path)


def read_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
  """(1-based line number, stripped text) of the non-empty, non-comment ('#') lines."""
  with open(path, encoding="utf-8-sig") as f:
    return [(i, line.strip()) for i, line in enumerate(f, 1)
            if line.strip() and not line.lstrip().startswith("#")]


def read_class_list(path: str | os.PathLike, num_classes: int) -> list[str]:
  """`classes.txt`: one class name per line; line order defines label ids 0..K-1.

  Raises:
    FileNotFoundError for a missing file; ValueError for duplicates or a count
    other than `num_classes` (naming the file).
  """
  names = [text for _, text in read_lines(require_file(path, "class list"))]
  check_class_names(names, num_classes, os.fspath(path))
  return names


def check_class_names(names: Sequence[str], num_classes: int, where: str) -> None:
  """Raises ValueError (naming `where`) unless `names` are `num_classes` distinct names."""
  duplicates = sorted(n for n, c in collections.Counter(names).items() if c > 1)
  if duplicates:
    raise ValueError(f"{where}: duplicate class names {duplicates[:5]}")
  if len(names) != num_classes:
    raise ValueError(f"{where}: expected {num_classes} classes, got {len(names)} "
                     f"(set the builder config's num_classes to use another class list)")


def read_split_list(path: str | os.PathLike, class_index: Mapping[str, int]) -> list[Clip]:
  """A split list: lines `<relative media path> <class name>`, separated by the first run
  of whitespace (paths contain no whitespace; class names may contain spaces/commas).

  Raises:
    FileNotFoundError for a missing file; ValueError naming the file, line and
    class for a line without a class or with a class not in `class_index`.
  """
  clips = []
  for number, text in read_lines(require_file(path, "split list")):
    parts = text.split(None, 1)
    where = f"{os.fspath(path)}:{number}"
    if len(parts) != 2:
      raise ValueError(f"{where}: expected '<relative media path> <class name>', got {text!r}")
    clips.append(Clip(parts[0], lookup_class(class_index, parts[1].strip(), where), where))
  return clips


def lookup_class(class_index: Mapping[str, int], name: str, where: str) -> int:
  """The label of class `name`, or ValueError naming `where` and the unknown class."""
  if name not in class_index:
    close = [c for c in class_index if c.lower() == name.lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{where}: unknown class {name!r}{hint}; the class list has "
                     f"{len(class_index)} classes")
  return class_index[name]


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], num_workers: int
                ) -> Iterator[tuple[Any, Any]]:
  """Yields `(item, fn(item))` in input order, computing up to `2 * num_workers`
  items ahead in a thread pool; a `MediaError` is yielded as the result instead
  of raised. Other exceptions propagate."""

  def call(item):
    try:
      return fn(item)
    except MediaError as e:
      return e

  if num_workers <= 1:
    for item in items:
      yield item, call(item)
    return
  executor = concurrent.futures.ThreadPoolExecutor(num_workers, thread_name_prefix="clip")
  try:
    iterator = iter(items)
    pending = collections.deque((item, executor.submit(call, item))
                                for item in itertools.islice(iterator, 2 * num_workers))
    while pending:
      item, future = pending.popleft()
      for nxt in itertools.islice(iterator, 1):
        pending.append((nxt, executor.submit(call, nxt)))
      yield item, future.result()
  finally:
    executor.shutdown(wait=True, cancel_futures=True)


def check_manual_dir(path: str | os.PathLike | None, name: str, layout: str) -> str:
  """`path` as a string if it is a non-empty directory, else FileNotFoundError naming it
  and showing the expected `layout`."""
  if not path or not os.path.isdir(path) or not os.listdir(path):
    raise FileNotFoundError(
        f"{name}: manual directory {os.fspath(path) if path else '(not set)'} does not exist or "
        f"is empty; pass --manual_dir (tfds.download.DownloadConfig(manual_dir=...)) pointing "
        f"to a directory laid out as:\n{layout}")
  return os.fspath(path)


def manual_dir_of(dl_manager, name: str, layout: str) -> str:
  """The download manager's manual directory, checked by `check_manual_dir`."""
  return check_manual_dir(getattr(dl_manager, "_manual_dir", None), name, layout)


class ClipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the clip datasets: subclasses define `_info`, `read_lists` and `process_clip`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: JPEG frames at 1 fps (+ log-mel audio / TV-L1 flow)."}
  LAYOUT = ""  # the manual directory's layout, shown in errors

  def __init__(self, *, num_workers: int | None = None, progress: Progress | None = None,
               **kwargs):
    kwargs.setdefault("file_format", "array_record")
    self._num_workers = int(num_workers or os.cpu_count() or 1)
    self._progress = progress
    super().__init__(**kwargs)

  # To be defined by subclasses.
  def read_lists(self, manual_dir: str) -> tuple[list[str], dict[str, list[Clip]]]:
    """(class names, {split: listed clips}) from the manual directory's lists."""
    raise NotImplementedError

  def process_clip(self, manual_dir: str, clip: Clip) -> dict[str, Any]:
    """The features of one clip except "label" and "clip_id"; raises MediaError to skip."""
    raise NotImplementedError

  # Shared machinery.
  def _split_generators(self, dl_manager):
    manual_dir = manual_dir_of(dl_manager, self.name, self.LAYOUT)
    names, lists = self.read_lists(manual_dir)
    label = self.info.features["label"]
    if list(label.names) != list(names):
      label.names = names
    self.info.metadata.setdefault("skipped", {})
    self.info.metadata.setdefault("listed", {})
    return {split: self._generate_examples(manual_dir, split, clips)
            for split, clips in lists.items()}

  def _generate_examples(self, manual_dir: str, split: str, clips: Sequence[Clip]):
    skipped: list[Skip] = []
    seen: set[str] = set()
    unique = []
    for clip in clips:
      if clip.path in seen:
        skipped.append(Skip(clip.path, "duplicate", f"listed again at {clip.source}"))
        self._report(split, clip.path, "duplicate")
      else:
        seen.add(clip.path)
        unique.append(clip)
    process = lambda clip: self.process_clip(manual_dir, clip)
    written = 0
    for clip, result in ordered_map(process, unique, self._num_workers):
      if isinstance(result, MediaError):
        skipped.append(Skip(clip.path, result.kind, result.detail))
        self._report(split, clip.path, result.kind)
        continue
      self._report(split, clip.path, None)
      written += 1
      yield clip.path, {**result, "label": clip.label, "clip_id": clip.path}
    if not written:  # TFDS cannot write an empty split: say why instead
      kinds = dict(collections.Counter(s.kind for s in skipped))
      examples = "; ".join(f"{s.clip}: {s.kind}: {s.detail}" for s in skipped[:3])
      raise ValueError(f"{self.name}: all {len(clips)} listed clips of split {split!r} were "
                       f"skipped ({kinds}); no usable clip in manual directory {manual_dir}, "
                       f"e.g. {examples}")
    self.info.metadata["listed"][split] = len(clips)
    self.info.metadata["skipped"][split] = [[s.clip, s.kind, s.detail] for s in skipped]

  def _report(self, split: str, clip: str, reason: str | None) -> None:
    if self._progress is not None:
      self._progress(split, clip, reason)


def skip_summary(info: tfds.core.DatasetInfo) -> dict[str, dict[str, Any]]:
  """Per split: {"listed": n, "written": m, "skipped": {kind: count}, "clips": [Skip, ...]}
  from a prepared dataset's info (`builder.info` or `data_source.dataset_info`)."""
  meta = info.metadata or {}
  out = {}
  for split, listed in (meta.get("listed") or {}).items():
    skips = [Skip(*entry) for entry in (meta.get("skipped") or {}).get(split, [])]
    written = info.splits[split].num_examples if split in info.splits else 0
    out[split] = {"listed": int(listed), "written": int(written),
                  "skipped": dict(collections.Counter(s.kind for s in skips)), "clips": skips}
  return out


def frame_numbers(num_native_frames: int, fps: float, max_frames: int) -> np.ndarray:
  """Native frame numbers sampled at 1 fps that have a successor frame (for flow):
  `round(i * fps)` for i = 0, 1, ... while <= num_native_frames - 2; more than
  `max_frames` of them are thinned uniformly to `max_frames`."""
  if fps <= 0 or num_native_frames < 2:
    return np.zeros((0,), np.int64)
  count = int(np.floor((num_native_frames - 2) / fps + 1e-9)) + 1
  numbers = np.rint(np.arange(count) * fps).astype(np.int64)
  numbers = numbers[numbers <= num_native_frames - 2]
  if len(numbers) > max_frames:
    numbers = numbers[np.rint(np.linspace(0, len(numbers) - 1, max_frames)).astype(np.int64)]
  return numbers
