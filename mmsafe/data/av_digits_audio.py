"""The audio of `av_digits` (`mmsafe.data.av_digits`): spoken digits as log-mel
spectrograms, computed once into a cache file by `build_av_digits`.

* train / validation audio: speech synthesised with Debian's `espeak-ng`
  (GPL-3; its output is not encumbered). A *voice* is a (language,
  variant, speed, pitch) tuple; languages cycle over English (en-us, en-gb,
  en-gb-x-rp), Spanish (es, es-419), French (fr-fr, fr-be, fr-ch), Italian
  and Russian -- the languages of the test voices -- and each voice speaks
  the ten digits in its own language. With the default 400 voices: 360
  train voices (3,600 clips) and 40 held-out validation voices (400 clips).
* test audio: real human recordings `digits/<d>.wav` of six professional
  voices from Debian's Asterisk sound packages (CC BY-SA 3.0; read from the
  installed packages, never redistributed): en_US_f_Allison,
  es_MX_f_Allison, fr_CA_f_June, it_IT_m_Carlo, ru_RU_f_IvrvoiceRU
  (asterisk-core-sounds-{en,es,fr,it,ru}-wav) and it_IT_f_Menardi
  (asterisk-prompt-it-menardi-wav). Test voices never occur in training.

Every clip becomes a log-mel spectrogram [100, 40] (1.0 s, 10 ms shift, 40 mel
bins over 100-3800 Hz; see `mmsafe.data.audio`). Build the cache with
`python -m experiments.build_data --dataset=av_digits`; a missing cache is
built automatically on first load (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from mmsafe.data import audio as audio_lib
from mmsafe.data.cache import FileMemo, default_data_dir, read_cached
from mmsafe.data.dataset import NUM_CLASSES
from mmsafe.files import write_atomic

AV_FORMAT_VERSION = 1
DEFAULT_NUM_VOICES = 400
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
#: The cache's `split` codes.
SPLIT_CODES: Mapping[str, int] = MappingProxyType({"train": 0, "validation": 1, "test": 2})
_BUILD_SEED = 20240517  # fixes the synthetic voices; not a user knob

ProgressFn = Callable[[int, int], None]

_CACHE_MEMO = FileMemo()


class MissingDependencyError(RuntimeError):
  """A system tool or data package needed to build a dataset is not installed."""


@dataclasses.dataclass(frozen=True)
class SynthVoice:
  """One espeak-ng voice: `espeak-ng -v <language>[+<variant>] -s <speed> -p <pitch>`."""

  language: str
  variant: str
  speed: int
  pitch: int

  @property
  def name(self) -> str:
    """`espeak:<language>[+<variant>]:s<speed>:p<pitch>`, the cache's `voice` field."""
    v = f"{self.language}+{self.variant}" if self.variant else self.language
    return f"espeak:{v}:s{self.speed}:p{self.pitch}"

  def command(self, executable: str, text: str) -> list[str]:
    """The command line that speaks `text` as a WAV file on stdout."""
    v = f"{self.language}+{self.variant}" if self.variant else self.language
    return [executable, "-v", v, "-s", str(self.speed), "-p", str(self.pitch), "--stdout", text]


class _Clip(NamedTuple):
  """One clip of the cache: how to compute its spectrogram, and its cache fields."""

  spectrogram: Callable[[], np.ndarray]
  label: int
  split: int
  voice: str


def _which(name: str) -> str | None:
  """`shutil.which` (a seam for tests)."""
  return shutil.which(name)


def _espeak() -> str:
  """The espeak-ng executable; raises naming the Debian package when it is missing."""
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


def _synth_spectrogram(executable: str, voice: SynthVoice, digit: int,
                       config: audio_lib.LogMelConfig) -> np.ndarray:
  """`voice` speaking `digit`, as a log-mel spectrogram."""
  cmd = voice.command(executable, str(digit))
  proc = subprocess.run(cmd, capture_output=True, check=False)
  if proc.returncode != 0 or len(proc.stdout) <= 44:
    raise RuntimeError(f"av_digits: `{' '.join(cmd)}` failed (exit {proc.returncode}): "
                       f"{proc.stderr.decode(errors='replace')[-500:]}")
  x, rate = audio_lib.read_wav(proc.stdout)
  return audio_lib.spectrogram(x, rate, config)


def _human_spectrogram(path: Path, config: audio_lib.LogMelConfig) -> np.ndarray:
  """The recording at `path`, as a log-mel spectrogram."""
  x, rate = audio_lib.read_wav_file(path)
  return audio_lib.spectrogram(x, rate, config)


def _synth_clips(executable: str, voices: Sequence[SynthVoice], num_validation: int,
                 config: audio_lib.LogMelConfig) -> list[_Clip]:
  """The ten digits of every synthetic voice (voice-major); the last `num_validation`
  voices are validation voices, the others train voices."""
  first_validation = len(voices) - num_validation
  return [_Clip(functools.partial(_synth_spectrogram, executable, voice, d, config), d,
                SPLIT_CODES["validation" if v >= first_validation else "train"], voice.name)
          for v, voice in enumerate(voices) for d in range(NUM_CLASSES)]


def _human_clips(human: Mapping[str, Sequence[Path]],
                 config: audio_lib.LogMelConfig) -> list[_Clip]:
  """The ten digits of every human test voice (voice-major)."""
  return [_Clip(functools.partial(_human_spectrogram, paths[d], config), d,
                SPLIT_CODES["test"], f"asterisk:{voice}")
          for voice, paths in human.items() for d in range(NUM_CLASSES)]


def _spectrograms(clips: Sequence[_Clip], workers: int | None,
                  progress: ProgressFn | None) -> list[np.ndarray]:
  """Every clip's spectrogram, in order, computed by `workers` threads."""
  workers = workers or min(4, 2 * (os.cpu_count() or 1))
  specs = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    jobs = [pool.submit(clip.spectrogram) for clip in clips]
    for i, job in enumerate(jobs):
      specs.append(job.result())
      if progress is not None:
        progress(i + 1, len(jobs))
  return specs


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
    force: rebuild even if the cache exists (a damaged or stale cache is
      always rebuilt).
    sounds_dir: root of the Asterisk sounds (default /usr/share/asterisk/sounds).

  Raises:
    MissingDependencyError: espeak-ng or an Asterisk sound package is not
      installed (the message names the Debian package to install).
  """
  path = av_digits_cache_path(data_dir, num_voices)
  if not force and av_cache_ok(path):
    return path
  exe = _espeak()
  human = _asterisk_clips(Path(sounds_dir) if sounds_dir is not None else ASTERISK_SOUNDS_DIR)
  version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                           check=False).stdout.strip()
  config = audio_lib.LogMelConfig()
  n_val = num_validation_voices(num_voices)
  clips = (_synth_clips(exe, synth_voices(num_voices, espeak_variants(exe)), n_val, config)
           + _human_clips(human, config))
  info = {"format_version": AV_FORMAT_VERSION, "espeak_version": version,
          "num_voices": num_voices, "num_validation_voices": n_val,
          "human_voices": list(human), "spectrogram": dataclasses.asdict(config),
          "floor": config.floor}
  arrays = {"audio": np.stack(_spectrograms(clips, workers, progress)).astype(np.float16),
            "label": np.asarray([c.label for c in clips], np.int8),
            "split": np.asarray([c.split for c in clips], np.int8),
            "voice": np.asarray([c.voice for c in clips]),
            "info": np.asarray(json.dumps(info, sort_keys=True))}
  write_atomic(path, lambda f: np.savez_compressed(f, **arrays))
  return path


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
  """Every array of the `.npz` at `path`."""
  with np.load(path, allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def read_av_cache(path: Path) -> dict[str, np.ndarray]:
  """The arrays of the audio cache at `path` (see `build_av_digits`), read once per file."""
  return _CACHE_MEMO.get(path, _read_arrays)


def _current_format(arrays: Mapping[str, np.ndarray]) -> bool:
  """Whether the cache `arrays` are of the current format version."""
  return json.loads(str(arrays["info"])).get("format_version") == AV_FORMAT_VERSION


def read_av_cache_or_none(path: Path) -> dict[str, np.ndarray] | None:
  """The audio cache's arrays, or None when it is missing, damaged or stale
  (`mmsafe.data.cache.read_cached`): then it is to be built again."""
  return read_cached(path, read_av_cache, _current_format)


def av_cache_ok(path: Path) -> bool:
  """Whether `path` is a readable audio cache of the current format version."""
  return read_av_cache_or_none(path) is not None
