"""Files written whole or not at all: a temporary file next to the target, then a rename.

A process killed mid-write leaves the previous file (or none), never a
truncated one. Used for every JSON, markdown, PNG and cache file mmsafe writes.
`process_alive` tells whether the process that left a lock or a temporary
directory still runs.
"""

from __future__ import annotations

from collections.abc import Callable
import errno
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


def check_writable(directory: str | os.PathLike, field: str) -> None:
  """Checks that files can be created in `directory` (or, when it does not exist
  yet, in its nearest existing ancestor, where it would be created) by creating
  and removing a temporary file; creates nothing else. A full disk may still
  fail a larger write later.

  Raises:
    OSError naming `field`, the directory and the cause (e.g. a read-only file
    system, no permission, a file where a directory is expected).
  """
  probe = os.path.abspath(os.fspath(directory))
  try:
    while not os.path.isdir(probe):
      if os.path.lexists(probe):
        raise NotADirectoryError(errno.ENOTDIR, f"{probe} is not a directory")
      probe = os.path.dirname(probe)
    fd, tmp = tempfile.mkstemp(prefix=".write_probe.", suffix=".tmp", dir=probe)
    os.close(fd)
    os.remove(tmp)
  except OSError as e:
    raise type(e)(e.errno, f"{field}: cannot write to {os.fspath(directory)!r} "
                           f"({e.strerror})") from None


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


def read_result(path: str | os.PathLike, settings: Any) -> Any | None:
  """The "result" of a JSON cache written by `write_result` under exactly these
  `settings` (compared as JSON values), else None (absent or stale)."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    cached = json.load(f)
  return cached["result"] if cached.get("settings") == json.loads(to_json(settings)) else None


def write_result(path: str | os.PathLike, settings: Any, result: Any) -> Any:
  """Keeps `result` with the `settings` it was computed under (atomically);
  returns `result`."""
  write_json_atomic(path, {"settings": settings, "result": result})
  return result


def process_alive(pid: int) -> bool:
  """Whether process `pid` exists on this host (another user's process counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
