"""Files written whole or not at all: a temporary file next to the target, then a rename.

A process killed mid-write leaves the previous file (or none), never a
truncated one. Used for every JSON, markdown, PNG and cache file mmsafe writes.
"""

from __future__ import annotations

from collections.abc import Callable
import json
import os
import tempfile
from typing import IO, Any

import jax
import numpy as np


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> str:
  """Calls `write(binary_file)` on a temporary file next to `path` (synced to
  disk), then renames it over `path`. Creates the parent directory; returns `path`."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                             dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp creates 0600 files.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
  """Writes `text` (UTF-8) to `path` atomically; returns `path`."""
  return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def to_builtin(value: Any) -> Any:
  """`json.dump`'s `default`: numpy / JAX scalars and arrays, tuples and sets."""
  if isinstance(value, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, (tuple, set)):
    return list(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(payload: Any) -> str:
  """`payload` as indented JSON with sorted keys and a final newline."""
  return json.dumps(payload, indent=2, sort_keys=True, default=to_builtin) + "\n"


def write_json_atomic(path: str | os.PathLike, payload: Any) -> str:
  """Writes `payload` as JSON (`to_json`) to `path` atomically; returns `path`."""
  return write_text_atomic(path, to_json(payload))
