"""Preemption: SIGTERM stops a run at the next step boundary, after a checkpoint."""

from __future__ import annotations

import signal

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
