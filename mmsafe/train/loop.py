"""`train_and_evaluate(config, workdir)`: the one Python loop over training steps.

Side effects (files in `workdir`, the progress bar, signal handlers) live here
and in the small modules it uses (`metrics`, `checkpoint`, `preemption`, `progress`).
Layout of a workdir:

    config.json          the run's config (written once the config is valid)
    metrics.jsonl        one JSON line per log/eval event ({"step": ..., ...})
    events.out.tfevents.*  the same numbers for TensorBoard (`metrics.EventWriter`;
                         training, evaluators and the test metrics), evaluators' figures
    checkpoints/<step>/  orbax checkpoints: train state, best model, progress
    results.json         final metrics of the model selected on validation

The run is a sequence of stages (`mmsafe.train.stages`: each with its
objective, optimizer, epochs and whether model selection restarts); the
method's callbacks update its state when a stage starts and after each epoch.
The loop knows no method by name.

Model selection uses the validation split; the test split is evaluated once,
at the end, on the selected model. `config.evals` adds evaluators
(`mmsafe.eval.registry`) that run every `every_steps` steps and are logged.

Data parallelism (`config.parallel`: "none" | "jit" | "pmap";
`mmsafe.train.parallel`) runs the same steps on all devices of all processes;
`config.batch_size` is the global batch. With several processes (after
`mmsafe.train.distributed.initialize_distributed`), every process runs this
loop, loads only its rows of each global batch, and process 0 alone writes the
JSON files.

Preemption: checkpoints are written at the end of each stage and every
`config.checkpoint_every_steps` steps (0: at the first step boundary
`config.checkpoint_every_seconds` after the previous save). On SIGTERM the loop finishes
the step in flight, saves a checkpoint and raises `Preempted` (with several
processes, they agree on the step first). Rerunning the same command resumes
from the latest checkpoint: the step and the data loader's position (grain's
iterator state; training batches are a pure function of `(seed, step)`), the
RNG and optimizer state, the stage, the model selection so
far and the not-yet-logged training metrics, so an interrupted run ends
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import dataclasses
import os
import time
from typing import Any

from absl import flags
from absl import logging
import jax
import numpy as np
from tqdm.auto import tqdm

from mmsafe import data as data_lib
from mmsafe import methods
from mmsafe.eval import registry
from mmsafe.eval import report
from mmsafe.files import write_json_atomic
from mmsafe.train import distributed
from mmsafe.train import metrics as metrics_lib
from mmsafe.train import parallel as parallel_lib
from mmsafe.train import workdir as workdir_lib
from mmsafe.train.checkpoint import Checkpointer
from mmsafe.train.experiment import Experiment, build_experiment
from mmsafe.train.preemption import CheckpointCadence, Preempted, SigtermFlag
from mmsafe.train.progress import DAMAGED_DIR, is_better, restore_or_init
from mmsafe.train.stages import TrainingStage


@dataclasses.dataclass
class _Context:
  """What the loop's helpers share: the experiment, its layout and its writers."""

  experiment: Experiment
  parallel: parallel_lib.DataParallel
  eval_step: Any
  eval_batch_size: int
  loader: dict
  writer: Any
  evaluators: dict
  postfix: dict = dataclasses.field(default_factory=dict)


def train_and_evaluate(config: Mapping[str, Any], workdir: str, *, fresh: bool = False
                       ) -> dict[str, Any]:
  """Trains `config.method` on `config.dataset` through its stages, evaluating on
  validation each epoch, checkpointing to `workdir` and resuming from it when
  it holds the same run. Model selection: best validation accuracy, ties to the
  lower validation loss (`is_better`), restarting with stages that ask for it.

  The workdir has one writer (`workdir.WorkdirLock`, held by process 0). A
  workdir that holds a run with a different config is refused
  (`workdir.check_same_run`) unless `fresh`, which deletes that run first (and
  refuses a directory that holds anything but a run: `workdir.check_fresh`).

  Returns the final results (also written to `workdir/results.json`).

  Raises:
    Preempted: on SIGTERM, after saving a checkpoint (see the module docstring).
    WorkdirInUse: another live process writes `workdir`.
    ValueError: a bad config, a workdir holding another run, or `fresh` on a
      directory holding more than a run (nothing written).
    DamagedCheckpoint: no checkpoint of the workdir verifies.
  """
  experiment = build_experiment(config)
  context = _make_context(experiment)
  if fresh:
    workdir_lib.check_fresh(workdir)  # Before the lock writes into it.
  lock = (workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0
          else contextlib.nullcontext())
  with lock:
    if fresh:
      if jax.process_index() == 0:
        workdir_lib.clear_workdir(workdir)
      distributed.sync_processes("mmsafe_fresh_workdir")
    else:
      workdir_lib.check_same_run(workdir, experiment.config)
    return _run(context, workdir)


def _run(context: _Context, workdir: str) -> dict[str, Any]:
  """Restores or initialises the run in `workdir` (owned by this job), trains it
  and evaluates the selected model on the test split."""
  experiment = context.experiment
  config = experiment.config
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              max_to_keep=int(config.get("checkpoint_max_to_keep", 2)))
  # Closed on every exit (pending saves finish), so no orbax thread outlives a failure.
  with contextlib.closing(checkpointer):
    state, best, progress, resume_step = restore_or_init(
        experiment, context.parallel, checkpointer, os.path.join(workdir, DAMAGED_DIR))
    if jax.process_index() == 0:
      write_json_atomic(os.path.join(workdir, "config.json"), config)
    context.writer = (metrics_lib.MetricsWriter(os.path.join(workdir, "metrics.jsonl"),
                                                resume_step)
                      if jax.process_index() == 0 else metrics_lib.NullWriter())
    pending = metrics_lib.pending_from_json(progress.pending_metrics)
    start_time = time.time()
    state, best, progress = _train(context, checkpointer, state, best, progress, pending)
  test = evaluate(context.eval_step, best["variables"], experiment.splits["test"],
                  context.eval_batch_size, context.parallel, context.loader)
  results = {
      "method": config["method"], "dataset": config["dataset"],
      "seed": int(config.get("seed", 0)), "steps": experiment.total_steps,
      "best_step": progress.best_step,
      "validation_accuracy": progress.best_validation_accuracy, "test_accuracy": test["accuracy"],
      "test_loss": test["loss"], "train_seconds_this_run": time.time() - start_time}
  context.writer.write(experiment.total_steps, **{f"test/{k}": v for k, v in test.items()})
  context.writer.close()
  if jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results


def _make_context(experiment: Experiment) -> _Context:
  """The device layout, compiled eval step and evaluators of a run (all checked
  before anything is written, as is the splits' agreement: `data.check_splits`)."""
  config = experiment.config
  data_lib.check_splits(experiment.splits)
  if int((config.get("loader") or {}).get("processes", 0)) > 0:
    _let_grain_workers_read_flags()
  parallel = parallel_lib.DataParallel.create(config.get("parallel", "none"))
  parallel.check_batch_size("batch_size", int(config["batch_size"]))
  return _Context(experiment=experiment, parallel=parallel,
                  eval_step=parallel.compile_eval_step(
                      experiment.model, experiment.splits["train"].prepare_inputs),
                  eval_batch_size=parallel.round_batch_size(
                      int(config.get("eval_batch_size", 256))),
                  loader=dict(config.get("loader") or {}), writer=metrics_lib.NullWriter(),
                  evaluators=experiment.evaluators)


def _let_grain_workers_read_flags() -> None:
  """grain's worker processes (`loader.processes > 0`) read absl flags; outside an
  absl program (a notebook, pytest) they are marked parsed with their defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _train(context: _Context, checkpointer: Checkpointer, state, best, progress, pending):
  """The steps from the state's step to the end of the last stage."""
  experiment, parallel = context.experiment, context.parallel
  config = experiment.config
  batch_size = int(config["batch_size"])
  log_every = int(config.get("log_every_steps", 0)) or experiment.steps_per_epoch
  sync_every = max(1, int(config.get("preemption_sync_steps", 10)))
  cadence = CheckpointCadence(
      every_steps=int(config.get("checkpoint_every_steps", 0)),
      every_seconds=float(config.get("checkpoint_every_seconds", 60.0)),
      sync_every=sync_every, agree=parallel.any_process)
  train = experiment.splits["train"]
  train_steps = {stage.name: parallel.compile_train_step(
      experiment.objective(stage, parallel.batch_norm_axis_name),
      experiment.optimizers[stage.name], train.prepare_inputs) for stage in experiment.stages}
  start_step = int(parallel.get(state.step))
  batches = _train_batches(context, start_step, progress.data_iterator)
  with contextlib.closing(batches), SigtermFlag() as sigterm, tqdm(
      total=experiment.total_steps, initial=start_step, unit="step", dynamic_ncols=True,
      desc=f"{config['method']} on {config['dataset']}",
      disable=jax.process_index() != 0) as bar:
    for step in range(start_step, experiment.total_steps):
      stage = experiment.stage_at(step)
      if progress.stage != stage.name:
        state, progress = _start_stage(context, stage, state, progress)
      batch = next(batches)
      if config.get("check_batches", True):
        data_lib.validate_batch(batch, experiment.model.input_shapes, train.num_classes,
                                raw_inputs=train.prepare_inputs is not None)
      state, metrics = train_steps[stage.name](state, parallel.put_batch(batch, batch_size))
      pending.append(metrics)
      done = step + 1
      end_of_stage = done == stage.end_step
      if done % log_every == 0 or end_of_stage:
        pending = _log_training(context, stage, done, pending, bar)
      if done % experiment.steps_per_epoch == 0 or end_of_stage:
        state, best, progress = _end_of_epoch(context, stage, done, state, best, progress, bar)
      _run_evaluators(context, done, state)
      # Several processes agree on the step to stop at (a collective, every
      # `sync_every` steps); one process reads its own flag every step.
      preempted = ((jax.process_count() == 1 or done % sync_every == 0
                    or done == experiment.total_steps) and parallel.any_process(sigterm.raised))
      if cadence.due(done, forced=end_of_stage or preempted):
        pending = [parallel.get(m) for m in pending]
        checkpointer.save(done, state, best, dataclasses.asdict(dataclasses.replace(
            progress, pending_metrics=metrics_lib.pending_to_json(pending),
            data_iterator=batches.get_state())))
        cadence.saved()
      checkpointer.seal_if_written()
      bar.update(1)
      if preempted and done < experiment.total_steps:
        raise Preempted(done)
  return state, best, progress


def _train_batches(context: _Context, start_step: int, saved: dict | None
                   ) -> data_lib.Batches:
  """This process's training batches from `start_step` on: at the position `saved`
  in the checkpoint (`Batches.get_state`) when its loader workers are today's, else
  planned from `start_step` (the same batches: they are a function of the step)."""
  config = context.experiment.config
  size = host_batch_size(context.parallel, int(config["batch_size"]))
  make = lambda first: data_lib.train_iterator(
      context.experiment.splits["train"], seed=int(config.get("seed", 0)), start_step=first,
      batch_size=size, **context.loader)
  if saved is None:
    return make(start_step)
  if saved.get("step") != start_step:
    raise ValueError(f"data iterator state: expected the position of the checkpoint's step "
                     f"{start_step}, got step {saved.get('step')}")
  batches = make(int(saved["start_step"]))
  try:
    batches.set_state(saved)
  except ValueError as error:
    batches.close()
    logging.warning("data position not restored (%s); batches planned from step %d",
                    error, start_step)
    return make(start_step)
  return batches


def _start_stage(context: _Context, stage: TrainingStage, state, progress):
  """Runs the callbacks' `on_stage_start` and restarts model selection if the
  stage asks for it."""
  state = _apply_callbacks(context, state, lambda cb, ctx: cb.on_stage_start(stage.name, ctx))
  progress = dataclasses.replace(progress, stage=stage.name)
  if stage.restart_selection:
    progress = dataclasses.replace(progress, best_validation_accuracy=-1.0,
                                   best_validation_loss=None)
  return state, progress


def _apply_callbacks(context: _Context, state, call):
  """`call(callback, CallbackContext)` for each of the method's callbacks, on host
  values; their method-state updates replace the state's entries."""
  experiment, parallel = context.experiment, context.parallel
  reduce_over_split = distributed.split_reducer(experiment.splits,
                                                batch_size=context.eval_batch_size)
  for callback in experiment.method.callbacks:
    host_state = parallel.get(state.state)
    update = call(callback, methods.CallbackContext(
        model=experiment.model, variables=parallel.get(state.variables), state=host_state,
        split_names=tuple(experiment.splits), config=experiment.method_settings,
        reduce_over_split=reduce_over_split))
    if update:
      state = state.replace(state=parallel.put({**host_state, **update}))
  return state


def _log_training(context: _Context, stage: TrainingStage, done: int, pending: list, bar
                  ) -> list:
  """Writes the mean of the pending training metrics; returns the new (empty) pending."""
  summary = metrics_lib.mean_metrics([context.parallel.get(m) for m in pending], step=done)
  context.writer.write(done, stage=stage.name, **{f"train/{k}": v for k, v in summary.items()})
  context.postfix["loss"] = f"{summary['loss']:.4f}"
  bar.set_postfix(context.postfix)
  return []


def _end_of_epoch(context: _Context, stage: TrainingStage, done: int, state, best, progress,
                  bar):
  """Validation, model selection and the callbacks' `on_epoch_end`."""
  experiment = context.experiment
  epoch = done // experiment.steps_per_epoch
  val = evaluate(context.eval_step, state.variables, experiment.splits["validation"],
                 context.eval_batch_size, context.parallel, context.loader)
  context.writer.write(done, epoch=epoch, stage=stage.name,
                       **{f"validation/{k}": v for k, v in val.items()})
  context.postfix["val_acc"] = f"{val['accuracy']:.3f}"
  bar.set_postfix(context.postfix)
  if is_better(val, progress):
    progress = dataclasses.replace(progress, best_validation_accuracy=val["accuracy"],
                                   best_validation_loss=val["loss"], best_step=done)
    # A copy: the train step donates (reuses) the buffers of the state.
    best = {"variables": _copy(state.variables)}
  state = _apply_callbacks(context, state,
                           lambda cb, ctx: cb.on_epoch_end(stage.name, epoch, ctx))
  return state, best, progress


@jax.jit
def _copy(tree):
  """A copy of `tree` in new buffers (one compiled program per structure)."""
  return jax.tree_util.tree_map(jax.numpy.copy, tree)


def _run_evaluators(context: _Context, done: int, state) -> None:
  """Runs the evaluators due at step `done` and logs their scalar metrics (and
  their figures, to TensorBoard)."""
  due = {name: ev for name, ev in context.evaluators.items()
         if ev.every_steps and done % ev.every_steps == 0}
  if not due:
    return
  variables = context.parallel.get(state.variables)
  for name, evaluator in due.items():
    metrics = evaluator.run(variables)
    scalars = registry.scalar_metrics(metrics)
    context.writer.write(done, **{f"{name}/{k}": v for k, v in scalars.items()})
    if jax.process_index() == 0:
      context.writer.write_images(done, report.figures(evaluator.type, metrics, prefix=name))


def host_batch_size(parallel: parallel_lib.DataParallel, global_size: int) -> int:
  """The rows of a global batch this process loads: a contiguous block, the one
  `data.train_iterator` / `data.eval_pass` give host `jax.process_index()`."""
  rows = parallel.rows(global_size)
  size = global_size // jax.process_count()
  if not np.array_equal(rows, np.arange(size) + jax.process_index() * size):
    raise ValueError(f"parallel: this process holds rows {rows.tolist()} of a global batch of "
                     f"{global_size}; expected the contiguous block {jax.process_index()} of "
                     f"size {size} (devices not ordered by process)")
  return size


def evaluate(eval_step, variables, dataset, batch_size: int,
             parallel: parallel_lib.DataParallel | None = None,
             loader: Mapping[str, Any] | None = None) -> dict[str, float]:
  """Accuracy and mean cross-entropy of `variables` on a whole split.

  `batch_size` is the global evaluation batch (a multiple of the devices),
  capped at the split's size rounded up to the devices, so a small split is
  one batch, not one padded to `batch_size`; `eval_step` is compiled for
  `parallel` (`DataParallel.compile_eval_step`) and this process loads its
  shard of the split (`data.eval_pass`, as the source stores it, with the
  `loader` options of clip datasets).
  """
  parallel = parallel or parallel_lib.DataParallel.create("none")
  batch_size = min(batch_size, parallel.round_batch_size(len(dataset)))
  batches = data_lib.eval_pass(dataset, normalized=False,
                               batch_size=host_batch_size(parallel, batch_size),
                               **dict(loader or {}))
  totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
  for batch in batches:
    sums = parallel.get(eval_step(variables, parallel.put_batch(batch, batch_size)))
    for key in totals:
      totals[key] += float(sums[key])
  return {"accuracy": totals["correct"] / totals["count"],
          "loss": totals["loss_sum"] / totals["count"]}
