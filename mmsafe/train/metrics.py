"""Training metrics: the `metrics.jsonl` writer, the TensorBoard event files
beside it, and the per-step metrics kept between log events (saved in
checkpoints, so a resumed run logs the same lines).

`metrics.jsonl` is the machine-readable record; the event files (tensorboardX)
show the same numbers, and evaluators' figures, in `tensorboard --logdir`.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import glob
import io
import json
import math
import numbers
import os
import time

from absl import logging
import jax
import numpy as np
from PIL import Image
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.proto.summary_pb2 import Summary

from mmsafe.files import to_builtin

EVENTS_PREFIX = "events"  # tensorboardX names a file events.out.tfevents.<time>.<host><suffix>


# Metrics the loop writes once training is over ("test/accuracy", ...): a resumed
# run writes them again, so resuming drops them whatever their step.
FINAL_PREFIX = "test/"


def _line_step(line: str) -> int | None:
  """The step of a metrics line; None for a line torn by a killed process or a
  line of final metrics (`FINAL_PREFIX`)."""
  try:
    record = json.loads(line) if line.endswith("\n") else None
  except ValueError:
    return None
  if record is None or any(key.startswith(FINAL_PREFIX) for key in record):
    return None
  return int(record.get("step", 0))


class EventWriter:
  """TensorBoard event files of one writer `name` in `logdir` (tensorboardX).

  Events are written synchronously and flushed at each call: tensorboardX's
  `SummaryWriter` writes from a thread that dies on a write error, after which
  its bounded queue blocks the caller, which would stop training.

  A stream (`replace=False`, the training run's "training") appends a new file per
  run; `purge_step` (a resumed run: its checkpoint's step + 1) marks the events
  of an earlier run at that step and later as orphaned, so TensorBoard hides
  them (tensorboardX's `purge_step`) and shows each step once. A one-shot writer
  (`replace=True`: the test metrics of the selected model, an offline
  evaluation) deletes its earlier files when it writes, so a rerun replaces them.

  A writer that cannot write (a read-only or full disk) logs one warning and
  writes nothing more; it never raises.
  """

  def __init__(self, logdir: str, name: str, *, purge_step: int | None = None,
               replace: bool = False):
    self.logdir, self.name = logdir, name
    self._purge_step, self._replace = purge_step, replace
    self._writer: EventsWriter | None = None
    self._failed = False

  @property
  def files(self) -> list[str]:
    """This writer's event files in `logdir` (of this and earlier runs), oldest first."""
    pattern = f"{EVENTS_PREFIX}.out.tfevents.*.mmsafe-{glob.escape(self.name)}"
    return sorted(glob.glob(os.path.join(glob.escape(self.logdir), pattern)))

  def remove_files(self) -> None:
    """Deletes this writer's event files (a fresh run's stale ones)."""
    self._guarded(lambda: [os.remove(path) for path in self.files])

  # Tags are kept as given ("pgd/multi@0.5", as in metrics.jsonl): tensorboardX's
  # `summary.scalar` would rename them to TensorFlow op names ("pgd/multi_0.5").
  def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """One scalar event per entry at `step`."""
    self._write(step, [Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
                       for tag, value in scalars.items()])

  def images(self, step: int, images: Mapping[str, bytes]) -> None:
    """One image event per PNG (encoded bytes, stored as they are) at `step`."""
    summaries = []
    for tag, png in images.items():
      image = Image.open(io.BytesIO(png))  # (reads the header only)
      summaries.append(Summary(value=[Summary.Value(tag=tag, image=Summary.Image(
          height=image.height, width=image.width, colorspace=len(image.getbands()),
          encoded_image_string=png))]))
    self._write(step, summaries)

  def close(self) -> None:
    if self._writer is not None:
      self._guarded(self._writer.close)
    self._writer = None

  def _write(self, step: int, summaries: list) -> None:
    if summaries and not self._failed:
      self._guarded(lambda: self._write_events(int(step), summaries))

  def _write_events(self, step: int, summaries: list) -> None:
    if self._writer is None:
      self._open()
    for summary in summaries:
      self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
    self._writer.flush()

  def _open(self) -> None:
    """Creates this run's file (after deleting the earlier ones of a one-shot writer)."""
    if self._replace:
      for path in self.files:
        os.remove(path)
    os.makedirs(self.logdir, exist_ok=True)
    # The nanoseconds order files created within one second (TensorBoard reads a
    # directory's files in name order); the name identifies the writer.
    self._writer = EventsWriter(os.path.join(self.logdir, EVENTS_PREFIX),
                                f".{time.time_ns()}.mmsafe-{self.name}")
    if self._purge_step is not None:
      self._writer.write_event(Event(wall_time=time.time(), step=self._purge_step,
                                     session_log=SessionLog(status=SessionLog.START)))

  def _guarded(self, action) -> None:
    """Runs `action`; an OSError disables the writer with one warning."""
    if self._failed:
      return
    try:
      action()
    except OSError as error:
      self._failed = True
      logging.warning("TensorBoard: cannot write the %r event files in %s (%s); writing no "
                      "more of them (metrics.jsonl and the reports hold every number)",
                      self.name, self.logdir, error)
      if self._writer is not None:
        with contextlib.suppress(OSError):  # (what it could not write is dropped)
          self._writer.close()
        self._writer = None


def _numbers(metrics: Mapping[str, object]) -> dict[str, float]:
  """The real-number entries of `metrics` (booleans and strings dropped)."""
  return {key: float(value) for key, value in metrics.items()
          if isinstance(value, (numbers.Real, np.number))
          and not isinstance(value, (bool, np.bool_))}


class MetricsWriter:
  """Appends JSON lines `{"step": ..., **metrics}` to `path`; on resume drops the
  lines past `resume_step`, the final metrics and a last line torn by a killed
  process; a fresh run (`resume_step` None) starts a new file.

  The numbers also go to TensorBoard event files in the same directory
  (`EventWriter` "training", resumed at `resume_step`); a line of test-split
  metrics only (keys "test/...", written once at the end) to the one-shot
  writer "training-test", so that a rerun of a finished run shows them once.
  """

  def __init__(self, path: str, resume_step: int | None):
    self._path = path
    logdir = os.path.dirname(os.path.abspath(path))
    self._events = EventWriter(logdir, "training", purge_step=(
        None if resume_step is None else resume_step + 1))
    self._test_events = EventWriter(logdir, "training-test", replace=True)
    if resume_step is None:
      self._events.remove_files()
      self._test_events.remove_files()
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f
                if (step := _line_step(line)) is not None and step <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    elif resume_step is None and os.path.exists(path):
      os.remove(path)

  def write(self, step: int, **metrics) -> None:
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}, default=to_builtin) + "\n")
    test_only = metrics and all(key.startswith("test/") for key in metrics)
    (self._test_events if test_only else self._events).scalars(step, _numbers(metrics))

  def write_images(self, step: int, images: Mapping[str, bytes]) -> None:
    """PNG figures (tag -> encoded bytes) at `step`, in TensorBoard only."""
    self._events.images(step, images)

  def close(self) -> None:
    self._events.close()
    self._test_events.close()


class NullWriter:
  """The metrics writer of processes other than process 0."""

  def write(self, step: int, **metrics) -> None:
    del step, metrics

  def write_images(self, step: int, images: Mapping[str, bytes]) -> None:
    del step, images

  def close(self) -> None:
    pass


def mean_metrics(pending: list[dict], step: int) -> dict[str, float]:
  """Means of per-step metrics (host values); raises on a non-finite loss."""
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *pending)
  summary = {k: float(np.mean(v)) for k, v in stacked.items()}
  if not math.isfinite(summary["loss"]):
    raise FloatingPointError(f"non-finite training loss {summary['loss']} at step {step}")
  return summary


def pending_to_json(pending: list[dict]) -> dict:
  """Not-yet-logged per-step metrics (host values) -> JSON (exact: dtype + values)."""
  if not pending:
    return {}
  return {k: {"dtype": str(np.asarray(pending[0][k]).dtype),
              "values": [np.asarray(m[k]).item() for m in pending]} for k in pending[0]}


def pending_from_json(payload: Mapping) -> list[dict]:
  """The inverse of `pending_to_json`."""
  if not payload:
    return []
  length = len(next(iter(payload.values()))["values"])
  return [{k: np.asarray(v["values"][i], dtype=v["dtype"]) for k, v in payload.items()}
          for i in range(length)]
