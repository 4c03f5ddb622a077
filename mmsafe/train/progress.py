"""Where a training run stands and how it restarts: `Progress` (the stage, the model
selection so far, the unlogged training metrics and the data loader's position,
checkpointed as JSON beside the train state), the model-selection rule
(`is_better`) and `restore_or_init` (the newest checkpoint of a workdir that
verifies, damaged newer ones moved to `DAMAGED_DIR`, or a fresh run) used by
`mmsafe.train.loop.train_and_evaluate`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

from absl import logging
import jax

from mmsafe.train import distributed
from mmsafe.train import parallel as parallel_lib
from mmsafe.train.checkpoint import Checkpointer, DamagedCheckpoint
from mmsafe.train.experiment import Experiment

DAMAGED_DIR = "checkpoints_damaged"


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where a run stands, checkpointed as JSON beside the train state.

  Attributes:
    stage: the stage in progress (None before the first step).
    best_validation_accuracy, best_validation_loss, best_step: the model
      selection so far (`is_better`; -1.0 / None / 0 before the first epoch).
    pending_metrics: the training metrics not yet logged at the checkpoint
      (`metrics.pending_to_json`).
    data_iterator: the training loader's position at the checkpoint
      (`Batches.get_state`), or None.
  """

  stage: str | None = None
  best_validation_accuracy: float = -1.0
  best_validation_loss: float | None = None
  best_step: int = 0
  pending_metrics: dict = dataclasses.field(default_factory=dict)
  data_iterator: dict | None = None

  @classmethod
  def from_json(cls, saved: Mapping[str, Any]) -> "Progress":
    """The progress of a checkpoint's JSON; ValueError naming unknown entries."""
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"checkpoint progress: unknown entries {unknown}; expected those of "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    return cls(**saved)


def is_better(validation: Mapping[str, float], progress: Progress) -> bool:
  """The model-selection rule: higher validation accuracy, and on a tie lower
  validation cross-entropy. (Accuracy saturates on small validation splits,
  e.g. av_digits' synthetic voices reach 1.0 within two epochs; the tie rule
  then keeps training rather than the first epoch that got there.)"""
  best = progress.best_validation_accuracy
  if validation["accuracy"] != best:
    return validation["accuracy"] > best
  best_loss = progress.best_validation_loss
  return best_loss is None or validation["loss"] < best_loss


def restore_or_init(experiment: Experiment, parallel, checkpointer: Checkpointer,
                    damaged_dir: str):
  """(state, best, progress, resume step or None): the newest checkpoint of the
  workdir that verifies (restored into a shape-only template), or a fresh run.

  Damaged checkpoints newer than it are moved to `damaged_dir`, each with a
  warning naming it and why it was skipped.

  Raises:
    DamagedCheckpoint: the workdir holds checkpoints and none verifies.
    CheckpointMismatch: a checkpoint's structure differs from the config's model.
  """
  steps = checkpointer.all_steps()
  if not steps:
    state = parallel.put(experiment.init_train_state())
    best = {"variables": parallel.put(parallel.get(state.variables))}
    return state, best, Progress(), None
  template = experiment.abstract_train_state(parallel_lib.replicated_sharding(parallel.mesh))
  damaged = []
  for step in steps:
    try:
      state, best, saved = checkpointer.restore(step, template,
                                                {"variables": template.variables})
      break
    except DamagedCheckpoint as error:
      damaged.append((step, error))
  else:
    raise DamagedCheckpoint(checkpointer.directory, "no checkpoint verifies: " + "; ".join(
        f"{step}: {error.reason}" for step, error in damaged)
        + ". Rerun with a fresh workdir (or --fresh) to start over")
  for bad_step, error in damaged:
    moved = checkpointer.quarantine(bad_step, damaged_dir) if jax.process_index() == 0 else ""
    logging.warning("skipped damaged checkpoint %s (%s); moved to %s; resuming from step %d",
                    error.path, error.reason, moved, step)
  if damaged:
    distributed.sync_processes("mmsafe_quarantine")
    checkpointer.reload()
  return state, best, Progress.from_json(saved), step
