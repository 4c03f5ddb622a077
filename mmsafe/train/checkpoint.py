"""Orbax checkpointing of the whole run: train state, best model, progress.

Saves are atomic (orbax writes to a temporary directory and renames it), so a
run that dies mid-save (kill -9, preemption) leaves the previous checkpoint
intact; the half-written temporary directory is removed when the next run opens
the directory. Saves are asynchronous: `save` returns once the arrays are copied
off the devices (so the caller may donate them), the files are written in the
background (`wait`). On several processes every process calls every method
(orbax writes each array once and synchronises the processes); templates may be
replicated global arrays, which restore with the same sharding.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from mmsafe.train.state import TrainState


class Checkpointer:
  """Keeps the latest `max_to_keep` checkpoints of a run under `directory`.

  Each checkpoint holds three items: "train_state" (a `TrainState`), "best"
  (the variables of the model with the best validation accuracy so far) and
  "progress" (a JSON dict: best validation accuracy, its step, the stage, ...).
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._manager = ocp.CheckpointManager(
        directory if "://" in directory else os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, train_state: TrainState, best: Any, progress: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardSave(train_state),
        best=ocp.args.StandardSave(best),
        progress=ocp.args.JsonSave(progress)), force=True)

  def restore(self, step: int, train_state: TrainState, best: Any
              ) -> tuple[TrainState, Any, dict]:
    """Restores checkpoint `step` into the structure of the given templates."""
    abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        train_state=ocp.args.StandardRestore(abstract(train_state)),
        best=ocp.args.StandardRestore(abstract(best)),
        progress=ocp.args.JsonRestore()))
    return restored["train_state"], restored["best"], dict(restored["progress"])

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
