"""Preemption: SIGTERM stops a run at the next step boundary, after a checkpoint;
the checkpoint cadence."""

from __future__ import annotations

from collections.abc import Callable
import signal
import time

import jax

# Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + 15, what
# a shell reports for a SIGTERM-ed process): the launch scripts requeue on it.
PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
  """`train_and_evaluate` stopped on SIGTERM after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint saved at step {step}; rerun the same command "
                     f"to resume")
    self.step = step


class SigtermFlag:
  """While active, SIGTERM sets `self.raised` instead of killing the process (the
  loop saves and stops at the next step boundary); the previous handler comes back
  on exit. Outside the main thread (no signal handlers there) it does nothing."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __enter__(self) -> "SigtermFlag":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class CheckpointCadence:
  """When the loop saves: at the end of every stage, on preemption, and every
  `every_steps` steps, or, with `every_steps` 0, at the first step boundary
  `every_seconds` after the previous save (so short epochs do not pay a save
  each). Several processes agree on a time-based save at the sync steps
  (`agree`: a collective or-ing a flag over processes)."""

  def __init__(self, *, every_steps: int, every_seconds: float, sync_every: int,
               agree: Callable[[bool], bool]):
    if every_steps < 0 or every_seconds <= 0:
      raise ValueError(f"checkpoint_every_steps / checkpoint_every_seconds: expected >= 0 / "
                       f"> 0, got {every_steps} / {every_seconds}")
    self.every_steps, self.every_seconds = every_steps, every_seconds
    self.sync_every, self.agree = sync_every, agree
    self.last_save = time.monotonic()

  def due(self, done: int, forced: bool) -> bool:
    """Whether to save after step `done` (`forced`: end of stage or preemption)."""
    if forced:
      return True
    if self.every_steps:
      return done % self.every_steps == 0
    if jax.process_count() > 1 and done % self.sync_every:
      return False
    return self.agree(time.monotonic() - self.last_save >= self.every_seconds)

  def saved(self) -> None:
    self.last_save = time.monotonic()
