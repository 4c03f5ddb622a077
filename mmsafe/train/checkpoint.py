"""Orbax checkpointing of the whole run: train state, best model, progress,
each verified on restore against a digest recorded at save time.

Saves are atomic (orbax writes to a temporary directory and renames it), so a
run that dies mid-save (kill -9, preemption) leaves the previous checkpoint
intact; the half-written temporary directory is removed when the next run opens
the directory. Saves are asynchronous: `save` returns once the arrays are copied
off the devices (so the caller may donate them), the files are written in the
background (`wait`). On several processes every process calls every method
(orbax writes each array once and synchronises the processes); templates may be
replicated global arrays, which restore with the same sharding.

Integrity, checked by `restore` (any failure raises `DamagedCheckpoint`,
naming the checkpoint's path and what failed):
1. its files: once a save is written (`seal_if_written`, the next save, or
   `wait`), `FILES_MANIFEST` records the checkpoint's step and the size and
   CRC-32 of each of its files, so that damaged files are found before orbax
   reads them (a checkpoint whose writer died before recording them is
   verified by 2 alone);
2. its contents: the progress JSON holds, under `DIGESTS`, the step and a
   CRC-32 of every array (path, dtype, shape and bytes) of the train state and
   of the best model, and of the rest of the progress (`tree_digest`,
   `json_digest`), recomputed after reading.
Both recorded steps must be the directory's name: a checkpoint directory
replaced by a copy of another step is damaged, not restored as the wrong step.
A checkpoint whose files verify (or that has no manifest), that fails to
restore, and whose structure or shapes differ from the templates raises
`CheckpointMismatch` instead, naming the first differing parameter path and
both shapes.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import logging
import os
import sys
from typing import Any
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp

from mmsafe.files import write_json_atomic
from mmsafe.train.state import TrainState

_ARRAY_ITEMS = ("train_state", "best")
FILES_MANIFEST = "files.crc32.json"
_ITEM_METADATA = "_METADATA"  # Orbax's tree metadata of an array item.
DIGESTS = "digests"  # The progress entry holding the checkpoint's digests.


class DamagedCheckpoint(Exception):
  """A checkpoint that cannot be read or fails its digest."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"checkpoint {path}: {reason}")
    self.path, self.reason = path, reason


class CheckpointMismatch(ValueError):
  """A checkpoint whose structure or shapes differ from the run's config."""


class CheckpointNotWritten(OSError):
  """A save that failed (e.g. a full disk); the previous checkpoints are intact."""


class Checkpointer:
  """Keeps the latest `max_to_keep` checkpoints of a run under `directory`.

  Each checkpoint holds three items: "train_state" (a `TrainState`), "best"
  (the variables of the model with the best validation accuracy so far) and
  "progress" (a JSON dict: best validation accuracy, its step, the stage, ...,
  and the digests of all three).
  """

  def __init__(self, directory: str, max_to_keep: int = 2, *, read_only: bool = False):
    """`read_only`: for readers of a run (evaluation), which neither create the
    directory nor remove a writer's half-written temporary checkpoints, and
    refuse to save. (Orbax's own `read_only` option is not used: it warns on
    every reader, and a manager that never saves, creates nor cleans up
    writes nothing.)"""
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self.read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep,
            save_interval_steps=0 if read_only else 1, create=not read_only,
            cleanup_tmp_directories=not read_only),
        item_handlers={"train_state": ocp.StandardCheckpointHandler(),
                       "best": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})
    self._unsealed: int | None = None
    self._save_errors = _BackgroundSaveErrors()

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps held, newest first."""
    return sorted(self._manager.all_steps(), reverse=True)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, train_state: TrainState, best: Any, progress: dict) -> None:
    """Starts saving checkpoint `step` (after sealing the previous one); returns
    once the arrays are copied off the devices."""
    if self.read_only:
      raise ValueError(f"checkpoint {self.path(step)}: this checkpointer only reads")
    self._seal()
    digests = {"algorithm": "crc32", "step": step, "train_state": tree_digest(train_state),
               "best": tree_digest(best), "progress": json_digest(progress)}
    self._save_errors.hold()
    self._manager.save(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state),
        best=ocp.args.StandardSave(best),
        progress=ocp.args.JsonSave({**progress, DIGESTS: digests})), force=True)
    self._unsealed = step

  def seal_if_written(self) -> None:
    """Seals the pending save if its files are written (does not block); the loop
    calls it every step, so that a checkpoint goes unsealed for about one step.
    With several processes (whose waits synchronise) only `save` and `wait` seal."""
    if (self._unsealed is not None and jax.process_count() == 1
        and not self._manager.is_saving_in_progress()):
      self._seal()

  def _seal(self) -> None:
    """Waits for the pending save, then records its step and the size and CRC-32
    of each of its files (`FILES_MANIFEST`; process 0, local directories), so
    that a restore finds damaged files before orbax reads them. A save that
    failed (e.g. a full disk) raises `CheckpointNotWritten` naming the
    checkpoint and the cause; orbax removes its temporary directory at the
    next open."""
    step, self._unsealed = self._unsealed, None
    try:
      self._manager.wait_until_finished()  # Raises a failure of the background save.
    except Exception as e:
      self._save_errors.keep()  # The failed save's threads may log until the process ends.
      where = self.path(step) if step is not None else self.directory
      raise CheckpointNotWritten(f"checkpoint {where}: not written ({type(e).__name__}: "
                                 f"{' '.join(str(e).split())})") from e
    self._save_errors.release()
    if (step is None or jax.process_index() != 0 or "://" in self.directory
        or not os.path.isdir(self.path(step))):
      return
    write_json_atomic(os.path.join(self.path(step), FILES_MANIFEST),
                      {"step": step, "files": _file_checksums(self.path(step))})

  def restore(self, step: int, train_state: TrainState, best: Any
              ) -> tuple[TrainState, Any, dict]:
    """Restores and verifies checkpoint `step` into the structure of the given
    templates (arrays or `jax.ShapeDtypeStruct`s, which give the sharding).

    Raises:
      CheckpointMismatch: its structure or shapes differ from the templates.
      DamagedCheckpoint: it cannot be read, or it fails its digest.
    """
    templates = {"train_state": train_state, "best": best}
    failure, files_damaged = None, False
    with _abandoned_reads_dropped():
      try:
        try:
          self._verify_files(step)
        except DamagedCheckpoint:
          files_damaged = True
          raise
        abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(abstract(tree))
               for name, tree in templates.items()},
            progress=ocp.args.JsonRestore()))
        progress = dict(restored["progress"])
        digests = progress.pop(DIGESTS, None)
        self._verify_digests(step, restored, progress, digests)
      except DamagedCheckpoint as e:
        failure = e.reason
      except Exception as e:  # Orbax, tensorstore and JSON raise many types.
        failure = f"cannot be read ({_first_line(e)})"
      if failure is not None:
        gc.collect()  # Orbax's abandoned reads, while their reports are dropped.
    if failure is not None:
      if not files_damaged:  # A changed model reads as damage too.
        self._check_structure(step, templates)
      raise DamagedCheckpoint(self.path(step), failure)
    return restored["train_state"], restored["best"], progress

  def _verify_files(self, step: int) -> None:
    """Raises DamagedCheckpoint for a checkpoint whose files differ from its
    `FILES_MANIFEST`, or whose recorded step is not `step` (a checkpoint whose
    writer died before sealing it has no manifest: its digests still verify it)."""
    path = self.path(step)
    manifest = os.path.join(path, FILES_MANIFEST)
    if not os.path.exists(manifest):
      return
    try:
      with open(manifest) as f:
        recorded = json.load(f)
      recorded_step, files = recorded["step"], dict(recorded["files"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DamagedCheckpoint(path, f"{FILES_MANIFEST} cannot be read ({_first_line(e)})"
                              ) from None
    _check_step(path, step, recorded_step)
    actual = _file_checksums(path)
    for name, (size, crc) in sorted(files.items()):
      if name not in actual:
        raise DamagedCheckpoint(path, f"file {name} is missing")
      if actual[name][0] != size:
        raise DamagedCheckpoint(path, f"file {name} has {actual[name][0]} bytes, recorded {size}")
      if actual[name][1] != crc:
        raise DamagedCheckpoint(path, f"file {name} fails its checksum")

  def _verify_digests(self, step: int, restored: Any, progress: dict,
                      digests: dict | None) -> None:
    """Raises DamagedCheckpoint unless the restored items match their recorded digests."""
    if not isinstance(digests, dict):
      raise DamagedCheckpoint(self.path(step), "records no digests (written without "
                              "integrity checks, or its progress was replaced)")
    _check_step(self.path(step), step, digests.get("step"))
    actual = {"train_state": tree_digest(restored["train_state"]),
              "best": tree_digest(restored["best"]), "progress": json_digest(progress)}
    for name, digest in actual.items():
      if digests.get(name) != digest:
        raise DamagedCheckpoint(self.path(step), f"{name!r} fails its digest (recorded "
                                f"{digests.get(name)}, read {digest})")

  def _check_structure(self, step: int, templates: dict[str, Any]) -> None:
    """Raises CheckpointMismatch unless the checkpoint's arrays have the
    templates' paths and shapes (DamagedCheckpoint when its metadata is missing
    or unreadable)."""
    for name in _ARRAY_ITEMS:  # (orbax would describe the rest of the tree as missing)
      if "://" not in self.directory and not os.path.isfile(
          os.path.join(self.path(step), name, _ITEM_METADATA)):
        raise DamagedCheckpoint(self.path(step), f"file {name}/{_ITEM_METADATA} is missing")
    try:
      metadata = self._manager.item_metadata(step)
      stored = {name: _shapes(metadata[name]) for name in _ARRAY_ITEMS}
    except Exception as e:  # Missing or damaged metadata files.
      raise DamagedCheckpoint(self.path(step),
                              f"metadata cannot be read ({_first_line(e)})") from None
    for name in _ARRAY_ITEMS:
      difference = _first_difference(stored[name], _shapes(templates[name]))
      if difference:
        raise CheckpointMismatch(
            f"checkpoint {self.path(step)}: does not match the run's config: {name}/"
            f"{difference} (was the model, the method or the dataset changed?)")

  def quarantine(self, step: int, directory: str) -> str:
    """Moves checkpoint `step` out of the run into `directory`; returns its new path."""
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, str(step))
    suffix = 0
    while os.path.exists(target):
      suffix += 1
      target = os.path.join(directory, f"{step}.{suffix}")
    os.replace(self.path(step), target)
    return target

  def reload(self) -> None:
    """Rereads the steps held (after `quarantine`, on every process)."""
    self._manager.reload()

  def wait(self) -> None:
    """Waits until the pending save is written and sealed."""
    self._seal()

  def close(self) -> None:
    """Waits for the pending save and closes the manager (not after a failed
    save, whose abandoned threads would each print a traceback as its event
    loops close)."""
    try:
      self._seal()
    finally:
      if not self._save_errors.failed:
        self._manager.close()
        self._save_errors.release()


class _BackgroundSaveErrors(logging.Filter):
  """Silences a failed background save while a save is pending (`hold` ...
  `release`), and for good once one failed (`keep`): orbax logs a traceback
  from each of its threads, and each write still in flight reports "Event
  loop is closed" (as an unraisable exception) once orbax closed its event
  loop, now or while the process shuts down; `wait_until_finished` raises the
  failure itself, which the caller reports once (`experiments.cli`: one line)."""

  _logger = logging.getLogger("absl")  # Orbax logs through absl.

  def __init__(self):
    super().__init__()
    self._kept = False
    self._hook = None

  @property
  def failed(self) -> bool:
    return self._kept

  def hold(self) -> None:
    if self._hook is None:
      self._logger.addFilter(self)
      self._hook = sys.unraisablehook
      sys.unraisablehook = self._unraisable

  def keep(self) -> None:
    self._kept = True

  def release(self) -> None:
    if self._hook is not None and not self._kept:
      self._logger.removeFilter(self)
      sys.unraisablehook, self._hook = self._hook, None

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname

  def _unraisable(self, report) -> None:
    if not (report.exc_type is RuntimeError and str(report.exc_value) == "Event loop is closed"):
      self._hook(report)


@contextlib.contextmanager
def _abandoned_reads_dropped():
  """Silences orbax's abandoned reads of a damaged checkpoint: when one array
  fails, orbax leaves the other reads pending, and each would print a traceback
  when collected ("exception was never retrieved", "Exception ignored in
  <coroutine>"), burying the one error that names the checkpoint. Collect them
  (`gc.collect`) inside."""
  logger = logging.getLogger("asyncio")
  drop = lambda record: "exception was never retrieved" not in record.getMessage()
  logger.addFilter(drop)
  hook = sys.unraisablehook
  sys.unraisablehook = lambda report: None if inspect.iscoroutine(report.object) else hook(report)
  try:
    yield
  finally:
    sys.unraisablehook = hook
    logger.removeFilter(drop)


def _check_step(path: str, step: int, recorded: Any) -> None:
  """DamagedCheckpoint unless the step recorded in checkpoint `path` is `step`,
  its directory's name."""
  if recorded != step:
    raise DamagedCheckpoint(path, f"holds step {recorded}, not {step} (its directory's name): "
                                  f"a copy of another checkpoint?")


def _file_checksums(directory: str) -> dict[str, list]:
  """Relative path -> [size, CRC-32] of every file under `directory` but the manifest."""
  checksums = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, directory)
      if relative == FILES_MANIFEST or name.startswith(f".{FILES_MANIFEST}."):
        continue
      crc = 0
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
          crc = zlib.crc32(block, crc)
      checksums[relative] = [os.path.getsize(path), f"{crc:08x}"]
  return checksums


def tree_digest(tree: Any) -> str:
  """CRC-32 over every array leaf of `tree`: its path, dtype, shape and bytes
  (this process's first shard: the whole array for replicated arrays). A
  checksum against accidental damage (truncation, flipped bits), not tampering;
  about 7 GB/s on one CPU core."""
  crc = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if isinstance(leaf, jax.Array):
      leaf = leaf.addressable_data(0)
    value = np.ascontiguousarray(np.asarray(leaf))
    crc = zlib.crc32(f"{_path_name(path)}|{value.dtype.str}|{value.shape}|".encode(), crc)
    crc = zlib.crc32(value.view(np.uint8).reshape(-1).data if value.size else b"", crc)
  return f"{crc:08x}"


def json_digest(value: Any) -> str:
  """CRC-32 of `value` as canonical JSON."""
  return f"{zlib.crc32(json.dumps(value, sort_keys=True).encode()):08x}"


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """Path name -> shape of every leaf with a shape (arrays or their metadata)."""
  return {_path_name(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def _first_difference(stored: dict[str, tuple], expected: dict[str, tuple]) -> str | None:
  """The first path (in sorted order) whose shape differs or that one side lacks."""
  for name in sorted(set(stored) | set(expected)):
    if name not in stored:
      return f"{name} (shape {expected[name]}) is missing from the checkpoint"
    if name not in expected:
      return f"{name} (shape {stored[name]}) is in the checkpoint but not in the config's model"
    if stored[name] != expected[name]:
      return (f"{name} has shape {stored[name]} in the checkpoint, {expected[name]} "
              f"from the config")
  return None


def _path_name(path: tuple) -> str:
  """'train/params/Dense_0/kernel': a key path's keys, attribute names and indices."""
  parts = []
  for key in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        parts.append(str(getattr(key, attribute)))
        break
  return "/".join(parts)


def _first_line(error: Exception, limit: int = 200) -> str:
  """The error's type and first line, without tensorstore's spec dump."""
  text = (str(error).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
  return f"{type(error).__name__}: {text[:limit]}"
