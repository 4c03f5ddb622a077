"""The embedded datasets' cache directory and the helpers around its files.

Cache directory: the `data_dir` argument, else `$MMSAFE_DATA_DIR`, else
`~/.cache/mmsafe`. Files are written to a temporary name and atomically
renamed (`mmsafe.files.write_atomic`), so an interrupted download or build
never leaves a corrupt cache; a file damaged anyway (emptied, truncated,
overwritten) reads as missing (`read_cached`) and is built again. A file read
back is remembered in memory (`FileMemo`) until it changes on disk.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DamagedCacheError(RuntimeError):
  """A cache file that reads back but fails its check (checksum, format)."""


#: What reading a damaged cache file raises: a 0-byte `.npz` raises EOFError, a
#: truncated one BadZipFile or zlib.error, missing members KeyError, garbage
#: ValueError (`np.load`, JSON) or OSError.
DAMAGE_ERRORS: tuple[type[BaseException], ...] = (
    DamagedCacheError, EOFError, KeyError, OSError, ValueError, zipfile.BadZipFile, zlib.error)


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """`data_dir`, else `$MMSAFE_DATA_DIR`, else `~/.cache/mmsafe` (not created)."""
  if data_dir is not None:
    return Path(data_dir).expanduser()
  env = os.environ.get("MMSAFE_DATA_DIR")
  if env:
    return Path(env).expanduser()
  return Path("~/.cache/mmsafe").expanduser()


def sha256_file(path: Path) -> str:
  """The hex SHA-256 digest of the file at `path`."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_key(path: Path) -> tuple[str, int, int]:
  """(resolved path, size, mtime): changes whenever the file is replaced."""
  st = path.stat()
  return (str(path.resolve()), st.st_size, st.st_mtime_ns)


class FileMemo:
  """Remembers what `load(path)` returned for the last file loaded, until that file
  changes (`file_key`); a failed load changes nothing."""

  def __init__(self):
    self._key: tuple[str, int, int] | None = None
    self._value: Any = None

  def get(self, path: Path, load: Callable[[Path], Any]) -> Any:
    """`load(path)`, or the remembered result when `path` is the file last loaded."""
    key = file_key(path)
    if key != self._key:
      value = load(path)
      self._key, self._value = key, value
    return self._value


def read_cached(path: Path, read: Callable[[Path], Any],
                valid: Callable[[Any], bool] | None = None) -> Any | None:
  """`read(path)`, or None when the file is missing, damaged (`read` or `valid`
  raises one of `DAMAGE_ERRORS`) or not `valid`: then the caller builds it again."""
  if not path.is_file():
    return None
  try:
    value = read(path)
    if valid is not None and not valid(value):
      return None
  except DAMAGE_ERRORS:
    return None
  return value
