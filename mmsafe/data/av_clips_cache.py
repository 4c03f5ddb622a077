"""`av_clips` built on first use: a complete, checksummed TFDS dataset, or nothing.

`ensure_av_clips` returns the TFDS data directory holding a verified build of
`av_clips` for a `ClipsSpec`, building it when it is missing, damaged or of
another spec. A build runs in a temporary directory next to the cache
(`<data_dir>/.av_clips_build.<pid>.*`; one left by a killed build is removed
by the next build): the manual directory is written there
(`mmsafe.data.av_clips.write_manual_dir`), the `AvClips` TFDS builder
(`mmsafe.data.tfds.av_clips`, the Kinetics-Sounds path) writes its
array_record files there, a checksum file (SHA-256 of every file, the format
version and the spec) is added and verified, and only then is the dataset
directory renamed into `<data_dir>/av_clips/default/1.0.0`. A failure at any
point leaves no dataset directory behind (the temporary directory is removed);
a damaged or stale one is moved aside in one rename before the new one takes
its place. Skipped clips raise one warning each, naming the file, and are
counted in the dataset's `metadata.json` (`mmsafe.data.tfds.skip_summary`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from mmsafe.data.av_clips import ClipsSpec, write_manual_dir
from mmsafe.data.cache import DAMAGE_ERRORS, default_data_dir, sha256_file
from mmsafe.files import process_alive, write_text_atomic

AV_CLIPS_FORMAT_VERSION = 1
CHECKSUM_FILE = "av_clips_checksums.json"
BUILD_PREFIX = ".av_clips_build."  # + "<pid>.<random>": a build's temporary directory


def dataset_dir(root: str | os.PathLike) -> Path:
  """Where the TFDS data directory `root` keeps the av_clips dataset files."""
  from mmsafe.data.tfds.av_clips import CONFIG, AvClips
  return Path(root) / AvClips.name / CONFIG.name / str(AvClips.VERSION)


def _spec_json(spec: ClipsSpec) -> dict:
  """`spec` as JSON-able values (tuples as lists, as they read back)."""
  return json.loads(json.dumps(dataclasses.asdict(spec)))


def file_checksums(directory: Path) -> dict[str, str]:
  """Relative path -> SHA-256 of every file under `directory` but the checksum file."""
  return {str(p.relative_to(directory)): sha256_file(p)
          for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUM_FILE}


def verified(directory: Path, spec: ClipsSpec) -> bool:
  """Whether `directory` holds a complete build of `spec` whose files match its checksums."""
  try:
    with open(directory / CHECKSUM_FILE, encoding="utf-8") as f:
      saved = json.load(f)
    return (saved["format_version"] == AV_CLIPS_FORMAT_VERSION
            and saved["spec"] == _spec_json(spec)
            and saved["files"] == file_checksums(directory))
  except (FileNotFoundError, *DAMAGE_ERRORS, TypeError):
    return False


def _warn_skip(split: str, clip: str, reason: str | None) -> None:
  """The builder's progress callback: one warning per skipped clip, naming its file."""
  if reason is not None:
    warnings.warn(f"av_clips: skipped {split} clip {clip} ({reason}); it is counted in the "
                  f"dataset's metadata.json", RuntimeWarning, stacklevel=2)


def _prepare(manual_dir: Path, out: Path, workers: int | None) -> Path:
  """Builds av_clips from `manual_dir` into the TFDS data directory `out`; returns the
  dataset's directory."""
  import tensorflow_datasets as tfds

  from mmsafe.data.tfds.av_clips import AvClips
  builder = AvClips(data_dir=os.fspath(out), num_workers=workers, progress=_warn_skip)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return Path(builder.data_dir)


def _remove_stale_builds(root: Path) -> None:
  """Removes the temporary directories of builds whose process is gone (killed)."""
  for path in root.glob(f"{BUILD_PREFIX}*"):
    pid = path.name[len(BUILD_PREFIX):].split(".", 1)[0]
    if pid.isdigit() and not process_alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)



def _install(built: Path, final: Path, trash: Path) -> None:
  """Renames `built` to `final`, first moving a previous `final` into `trash`."""
  final.parent.mkdir(parents=True, exist_ok=True)
  if final.exists():
    os.replace(final, trash / "previous")
  os.replace(built, final)


def build_av_clips(data_dir: str | os.PathLike | None = None, spec: ClipsSpec = ClipsSpec(), *,
                   workers: int | None = None, sounds_dir: str | os.PathLike | None = None,
                   manual_dir: str | os.PathLike | None = None) -> Path:
  """Builds av_clips into the TFDS data directory `data_dir` (default `$MMSAFE_DATA_DIR`,
  see `default_data_dir`) and returns that directory.

  Args:
    spec: the clips to make (`ClipsSpec`; recorded and checked on every load).
    workers: clips made and processed in parallel (default: the CPU count).
    sounds_dir: the Asterisk sounds (default /usr/share/asterisk/sounds).
    manual_dir: build from this manual directory (Kinetics-Sounds layout) instead of
      writing one; its clips are then recorded as clips of `spec`.

  Raises:
    FileNotFoundError / ValueError naming the manual directory when it has no usable
    clip; MissingDependencyError when espeak-ng or the Asterisk sounds are missing.
  """
  root = default_data_dir(data_dir)
  root.mkdir(parents=True, exist_ok=True)
  _remove_stale_builds(root)
  with tempfile.TemporaryDirectory(prefix=f"{BUILD_PREFIX}{os.getpid()}.", dir=root) as tmp:
    tmp = Path(tmp)
    if manual_dir is None:
      manual_dir = tmp / "manual"
      write_manual_dir(manual_dir, spec, data_dir=data_dir, workers=workers,
                       sounds_dir=sounds_dir)
    built = _prepare(Path(manual_dir), tmp / "tfds", workers)
    write_text_atomic(built / CHECKSUM_FILE, json.dumps(
        {"format_version": AV_CLIPS_FORMAT_VERSION, "spec": _spec_json(spec),
         "files": file_checksums(built)}, indent=1, sort_keys=True))
    if not verified(built, spec):
      raise RuntimeError(f"av_clips: the build in {built} does not match its checksums")
    _install(built, dataset_dir(root), tmp)
  return root


def ensure_av_clips(data_dir: str | os.PathLike | None = None, spec: ClipsSpec = ClipsSpec(), *,
                    build: bool = True, **options) -> Path:
  """The TFDS data directory holding a verified build of `spec`, built first when
  it is missing, damaged or of another spec (if `build`; `options`: `build_av_clips`'s).

  Raises:
    FileNotFoundError when there is no verified build and `build` is False.
  """
  root = default_data_dir(data_dir)
  if verified(dataset_dir(root), spec):
    return root
  if not build:
    raise FileNotFoundError(f"av_clips: no complete, verified build of {spec} in "
                            f"{dataset_dir(root)}; build it with `python -m "
                            f"experiments.build_data --dataset=av_clips`")
  return build_av_clips(data_dir, spec, **options)
