"""Reading a training run back from its workdir (`train.loop.train_and_evaluate`
wrote it): its config, model, variables and splits, for evaluation, reports
and notebooks."""

from __future__ import annotations

import contextlib
import json
import os

import jax

from mmsafe.train.checkpoint import Checkpointer
from mmsafe.train.experiment import build_experiment


def restore_run(workdir: str, which: str = "best"):
  """Loads a finished or running training run from its workdir.

  Args:
    workdir: a directory written by `train_and_evaluate`.
    which: "best" (the model selected on validation) or "latest".

  Returns:
    (config dict, model, variables, splits dict "train"/"validation"/"test").

  Raises:
    DamagedCheckpoint: the latest checkpoint cannot be read or fails its digest
      (its path is named; nothing falls back silently).
    CheckpointMismatch: the checkpoint's structure differs from config.json's model.
  """
  return restore_run_and_step(workdir, which)[:4]


def restore_run_and_step(workdir: str, which: str = "best"):
  """`restore_run`'s (config, model, variables, splits) and the training step of
  the variables: the step the best model was selected at, or the latest
  checkpoint's step."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"workdir: expected a training run with config.json, found none "
                            f"in {workdir!r}")
  if which not in ("best", "latest"):
    raise ValueError(f"which: expected 'best' or 'latest', got {which!r}")
  with open(config_path) as f:
    config = json.load(f)
  experiment = build_experiment(config)
  # Shapes only (no compilation): the restored arrays land on the first device.
  template = experiment.abstract_train_state(
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  with contextlib.closing(Checkpointer(os.path.join(workdir, "checkpoints"),
                                       read_only=True)) as checkpointer:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"workdir: no checkpoint under {workdir!r}/checkpoints")
    train_state, best, progress = checkpointer.restore(step, template,
                                                       {"variables": template.variables})
  if which == "best":
    return config, experiment.model, best["variables"], experiment.splits, int(
        progress["best_step"])
  return config, experiment.model, train_state.variables, experiment.splits, step
