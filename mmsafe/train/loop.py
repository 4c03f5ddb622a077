"""`train_and_evaluate(config, workdir)`: the one Python loop over training steps.

Side effects (files in `workdir`, the progress bar, signal handlers, starting
`jax.distributed`) live here and nowhere else in `mmsafe/`. Layout of a workdir:

    config.json          the run's config (written once the config is valid)
    metrics.jsonl        one JSON line per log/eval event ({"step": ..., ...})
    checkpoints/<step>/  orbax checkpoints: train state, best model, progress
    results.json         final metrics of the model selected on validation

Model selection uses the validation split; the test split is evaluated once,
at the end, on the selected model.

Data parallelism (`config.parallel`: "none" | "jit" | "pmap"; see
`mmsafe.train.parallel`) runs the same steps on all devices of all processes;
`config.batch_size` is the global batch. With several processes (after
`initialize_distributed`), every process runs this loop, loads only its rows of
each global batch, and process 0 alone writes the JSON files.

Preemption: checkpoints are written every `config.checkpoint_every_steps` steps
(0: once per epoch) and at the end of each phase. On SIGTERM the loop finishes
the step in flight, saves a checkpoint and raises `Preempted` (with several
processes, they agree on the step first). Rerunning the same command resumes
from the latest checkpoint: the step (training batches are a pure function of
`(seed, step)`), the RNG and optimizer state, the CRMT phase, the model
selection so far and the not-yet-logged training metrics, so an interrupted run
ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Mapping
import contextlib
import dataclasses
import json
import math
import os
import signal
import tempfile
import time
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from mmsafe import data as data_lib
from mmsafe import methods
from mmsafe import models
from mmsafe.train import parallel as parallel_lib
from mmsafe.train.checkpoint import Checkpointer
from mmsafe.train.optimizer import make_optimizer, make_step2_optimizer, phased
from mmsafe.train.state import TrainState

# Exit status of a run stopped by SIGTERM after saving its checkpoint (128 + 15, what
# a shell reports for a SIGTERM-ed process): the launch scripts requeue on it.
PREEMPTED_EXIT_CODE = 143
SPLIT_ROLES = ("train", "validation", "test")


class Preempted(Exception):
  """`train_and_evaluate` stopped on SIGTERM after saving a checkpoint at `step`."""

  def __init__(self, step: int):
    super().__init__(f"preempted: checkpoint saved at step {step}; rerun the same command "
                     f"to resume")
    self.step = step


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes JSON to `path` via a temporary file and a rename (never half-written)."""
  directory = os.path.dirname(os.path.abspath(path))
  with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as f:
    json.dump(payload, f, indent=2, sort_keys=True, default=_to_builtin)
    tmp = f.name
  os.replace(tmp, path)


def _to_builtin(value):
  if isinstance(value, (np.generic, jax.Array)):
    return np.asarray(value).tolist()
  if isinstance(value, (tuple, set)):
    return list(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _json_line_step(line: str) -> int | None:
  """The step of a metrics line; None for a line torn by a killed process."""
  try:
    return int(json.loads(line).get("step", 0)) if line.endswith("\n") else None
  except ValueError:
    return None


class MetricsWriter:
  """Appends JSON lines to `metrics.jsonl`; on resume drops lines past `step`
  (and a last line torn by a killed process)."""

  def __init__(self, path: str, resume_step: int | None):
    self._path = path
    if resume_step is not None and os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f
                if (step := _json_line_step(line)) is not None and step <= resume_step]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    elif resume_step is None and os.path.exists(path):
      os.remove(path)

  def write(self, step: int, **metrics) -> None:
    with open(self._path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}, default=_to_builtin) + "\n")


class _NullWriter:
  """The metrics writer of processes other than process 0."""

  def write(self, step: int, **metrics) -> None:
    del step, metrics


@dataclasses.dataclass(frozen=True)
class Run:
  """Everything a training run is made of, built from a validated config.

  Attributes:
    splits: "train" / "validation" / "test" datasets.
    model: the `MultiModalModel`.
    method: the `Method` trained.
    optimizers: phase ("step1", and "step2" for two-step methods) -> optax
      transformation; all share one optimizer state (`optimizer.phased`).
    steps_per_epoch: optimizer steps per pass over the training split.
    step1_steps: steps of the first phase; steps after it are step 2.
    total_steps: all steps of the run.
  """

  splits: dict
  model: Any
  method: methods.Method
  optimizers: dict
  steps_per_epoch: int
  step1_steps: int
  total_steps: int

  def phase(self, step: int) -> str:
    return "step1" if step < self.step1_steps else "step2"


def build_model(config: Mapping[str, Any], method: methods.Method, train,
                batch_norm_axis_name: str | None = None):
  """The run's model for `method` on the training split `train`; with
  `batch_norm_axis_name`, batch norm averages its statistics over that pmap axis
  (same parameters)."""
  encoders = dict(config["model"].get("encoders") or {})
  model_config = {**dict(config["model"]), "head": method.head,
                  "encoders": {m: encoders.get(m) for m in train.modality_shapes
                               if m in encoders}}
  if batch_norm_axis_name is not None:
    model_config["batch_norm_axis_name"] = batch_norm_axis_name
  return models.build(model_config, num_classes=train.num_classes,
                      input_shapes=train.modality_shapes)


def load_splits(config: Mapping[str, Any]) -> dict:
  """The run's "train" / "validation" / "test" datasets.

  `config.data` holds the loader's options (embedded: `modalities`; clip
  datasets: `data_dir` and `ClipPreprocessing` fields) and, optionally, `splits`:
  role -> the split read for it, e.g. `{"validation": "train[95%:]", "train":
  "train[:95%]"}` for a clip dataset built without a validation list (TFDS
  slices of the shuffled stored order).
  """
  data_kwargs = dict(config.get("data") or {})
  names = {role: role for role in SPLIT_ROLES}
  overrides = dict(data_kwargs.pop("splits", None) or {})
  unknown = sorted(set(overrides) - set(SPLIT_ROLES))
  if unknown:
    raise ValueError(f"data.splits: expected keys among {list(SPLIT_ROLES)}, got {unknown}")
  names.update(overrides)
  return {role: data_lib.load(config["dataset"], names[role], **data_kwargs)
          for role in SPLIT_ROLES}


def setup(config: Mapping[str, Any]) -> Run:
  """Validates the config and builds everything a run needs, touching no file.

  Raises ValueError naming the bad field before anything is written.
  """
  method = methods.get(config["method"])
  if config.get("parallel", "none") not in parallel_lib.MODES:
    raise ValueError(f"parallel: expected one of {list(parallel_lib.MODES)}, got "
                     f"{config.get('parallel')!r}")
  splits = load_splits(config)
  train = splits["train"]
  model = build_model(config, method, train)
  batch_size = int(config["batch_size"])
  if batch_size < 1 or batch_size > len(train):
    raise ValueError(f"batch_size: expected 1..{len(train)} (the training set size), "
                     f"got {batch_size}")
  num_epochs = int(config["num_epochs"])
  if num_epochs < 1:
    raise ValueError(f"num_epochs: expected >= 1, got {num_epochs}")
  steps_per_epoch = len(train) // batch_size
  optimizers = {"step1": make_optimizer(config["optimizer"], steps_per_epoch)}
  step2_epochs = 0
  if method.two_step:
    step2 = dict(config.get("step2") or {})
    if not step2:
      raise ValueError(f"step2: method {method.name!r} has a second step; expected a config "
                       f"section step2 (learning_rate, momentum, weight_decay, num_epochs)")
    step2_epochs = step2.get("num_epochs")
    step2_epochs = num_epochs // 3 if step2_epochs is None else int(step2_epochs)
    if step2_epochs < 1:
      raise ValueError(f"step2.num_epochs: expected >= 1, got {step2_epochs}")
    optimizers["step2"] = make_step2_optimizer(step2, steps_per_epoch)
  return Run(splits=splits, model=model, method=method, optimizers=phased(optimizers),
             steps_per_epoch=steps_per_epoch, step1_steps=num_epochs * steps_per_epoch,
             total_steps=(num_epochs + step2_epochs) * steps_per_epoch)


def method_config(config: Mapping[str, Any], run: Run) -> dict[str, Any]:
  """The method's hyper-parameters: `config.method_kwargs` plus `steps_per_epoch`
  (methods whose schedule is in epochs count them from the step counter)."""
  return {**(config.get("method_kwargs") or {}), "steps_per_epoch": run.steps_per_epoch}


def init_train_state(run: Run, seed: int, batch_size: int,
                     method_kwargs: Mapping[str, Any]) -> TrainState:
  """The run's initial `TrainState` (deterministic in `seed`)."""
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  example = {m: np.zeros((batch_size, *shape), np.float32)
             for m, shape in run.splits["train"].modality_shapes.items()}
  variables = jax.jit(run.model.init)(init_rng, example)
  method_state = (run.method.init_state(run.model, variables, method_kwargs)
                  if run.method.init_state else None)
  return TrainState.create(variables, run.optimizers["step1"], train_rng, method_state)


def host_batch_size(parallel: parallel_lib.DataParallel, global_size: int) -> int:
  """The rows of a global batch this process loads: a contiguous block, the one
  `make_iterator` gives host `jax.process_index()`."""
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

  `batch_size` is the global evaluation batch (a multiple of the devices); with
  `parallel`, `eval_step` and `variables` are in its compiled / training form and
  this process loads its shard of the split (`make_iterator`, with the `loader`
  options of clip datasets).
  """
  parallel = parallel or parallel_lib.DataParallel("none")
  batches = data_lib.make_iterator(dataset, train=False,
                                   batch_size=host_batch_size(parallel, batch_size),
                                   **dict(loader or {}))
  totals = {"correct": 0.0, "loss_sum": 0.0, "count": 0.0}
  for batch in batches:
    sums = parallel.host(eval_step(variables, parallel.put_batch(batch, batch_size)))
    for key in totals:
      totals[key] += float(sums[key])
  return {"accuracy": totals["correct"] / totals["count"],
          "loss": totals["loss_sum"] / totals["count"]}


class _SigtermFlag:
  """While active, SIGTERM sets `self.raised` instead of killing the process (the
  loop saves and stops at the next step boundary); the previous handler comes back
  on exit. Outside the main thread (no signal handlers there) it does nothing."""

  def __init__(self):
    self.raised = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __enter__(self) -> "_SigtermFlag":
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None
                           ) -> bool:
  """Starts `jax.distributed` when the run spans several processes; call it before
  any other JAX computation.

  Args:
    mode: "off" (never), "on" (always: `jax.distributed.initialize` with the given
      arguments, auto-detected on TPU pods, SLURM, Open MPI, ... when omitted) or
      "auto" (when the arguments or the environment say the run has several
      processes: `parallel.distributed_cluster`).
    coordinator_address, num_processes, process_id: `jax.distributed.initialize`'s.

  CPU processes exchange collectives through gloo. Returns whether it started.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed: expected 'auto', 'on' or 'off', got {mode!r}")
  if mode == "off":
    return False
  if mode == "auto" and coordinator_address is None and parallel_lib.distributed_cluster(
      os.environ, tpu_vm=os.path.exists("/dev/accel0")) is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def train_and_evaluate(config: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """Trains `config.method` on `config.dataset`, evaluating on validation each
  epoch, checkpointing to `workdir` and resuming from it when it holds a run.

  Two-step methods (CRMT) run `num_epochs` epochs of step 1, then
  `step2.num_epochs` (default `num_epochs // 3`) epochs of step 2; the phase
  follows from the step counter, so a run stopped in step 2 resumes in step 2.
  Model selection (best validation accuracy, ties to the lower validation
  loss: `is_better`) restarts when step 2 begins, so a two-step method
  reports a model that went through step 2.

  Returns the final results (also written to `workdir/results.json`).

  Raises:
    Preempted: on SIGTERM, after saving a checkpoint (see the module docstring).
  """
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  run = setup(config)
  train = run.splits["train"]
  seed = int(config.get("seed", 0))
  batch_size = int(config["batch_size"])
  par = parallel_lib.DataParallel.create(config.get("parallel", "none"))
  par.check_batch_size("batch_size", batch_size)
  eval_batch_size = par.round_batch_size(int(config.get("eval_batch_size", 256)))
  log_every = int(config.get("log_every_steps", 0)) or run.steps_per_epoch
  checkpoint_every = int(config.get("checkpoint_every_steps", 0)) or run.steps_per_epoch
  sync_every = max(1, int(config.get("preemption_sync_steps", 10)))
  primary = jax.process_index() == 0

  method_kwargs = method_config(config, run)
  host_state = init_train_state(run, seed, batch_size, method_kwargs)
  state = par.canonical(host_state)
  best = {"variables": par.canonical(host_state.variables)}
  os.makedirs(workdir, exist_ok=True)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                              max_to_keep=int(config.get("checkpoint_max_to_keep", 2)))
  progress = {"best_validation_accuracy": -1.0, "best_validation_loss": None, "best_step": 0,
              "step2_prepared": False}
  resume_step = checkpointer.latest_step()
  if resume_step is not None:
    state, best, progress = checkpointer.restore(resume_step, state, best)
  pending = _pending_from_json(progress.pop("pending_metrics", {}))
  if primary:
    write_json_atomic(os.path.join(workdir, "config.json"), config)
  writer = (MetricsWriter(os.path.join(workdir, "metrics.jsonl"), resume_step) if primary
            else _NullWriter())

  train_model = (run.model if par.axis_name is None
                 else build_model(config, run.method, train, par.axis_name))
  objectives = {"step1": run.method(train_model, method_kwargs)}
  if run.method.two_step:
    objectives["step2"] = run.method.step2(train_model, method_kwargs)
  train_steps = {phase: par.compile_train_step(objective, run.optimizers[phase])
                 for phase, objective in objectives.items()}
  eval_step = par.compile_eval_step(run.model)
  train_state = par.to_train(state)
  del state, host_state
  start_step = int(par.host(train_state.step))
  loader = dict(config.get("loader") or {})
  train_batches = data_lib.make_iterator(train, train=True, seed=seed, start_step=start_step,
                                         batch_size=host_batch_size(par, batch_size), **loader)
  postfix: dict[str, str] = {}
  start_time = time.time()
  with contextlib.closing(train_batches), _SigtermFlag() as sigterm, tqdm(
      total=run.total_steps, initial=start_step, desc=f"{config['method']} on "
      f"{config['dataset']}", unit="step", dynamic_ncols=True, disable=not primary) as bar:
    for step in range(start_step, run.total_steps):
      phase = run.phase(step)
      if run.method.on_epoch_end and step == 0:
        train_state = _end_of_epoch(run, par, train_state, method_kwargs, epoch=0,
                                    batch_size=eval_batch_size)
      if phase == "step2" and not progress["step2_prepared"]:
        host = par.host(train_state)
        host = host.replace(state={**host.state, **run.method.prepare_step2(
            run.model, host.variables, train, method_kwargs, batch_size=eval_batch_size)})
        train_state = par.to_train(par.canonical(host))
        progress = {**progress, "step2_prepared": True, "best_validation_accuracy": -1.0,
                    "best_validation_loss": None}
      batch = next(train_batches)
      if config.get("check_batches", True):
        data_lib.validate_batch(batch, run.model.input_shapes, train.num_classes)
      train_state, metrics = train_steps[phase](train_state, par.put_batch(batch, batch_size))
      pending.append(metrics)
      done = step + 1
      end_of_phase = done in (run.step1_steps, run.total_steps)
      if done % log_every == 0 or end_of_phase:
        summary = _mean_metrics([par.metrics_to_host(m) for m in pending], step=done)
        pending = []
        writer.write(done, phase=phase, **{f"train/{k}": v for k, v in summary.items()})
        postfix["loss"] = f"{summary['loss']:.4f}"
        bar.set_postfix(postfix)
      if done % run.steps_per_epoch == 0 or end_of_phase:
        val = evaluate(eval_step, train_state.variables, run.splits["validation"],
                       eval_batch_size, par, loader)
        writer.write(done, epoch=done // run.steps_per_epoch, phase=phase,
                     **{f"validation/{k}": v for k, v in val.items()})
        postfix["val_acc"] = f"{val['accuracy']:.3f}"
        bar.set_postfix(postfix)
        if is_better(val, progress):
          progress = {**progress, "best_validation_accuracy": val["accuracy"],
                      "best_validation_loss": val["loss"], "best_step": done}
          # A copy: the train step donates (reuses) the buffers of train_state.
          best = {"variables": par.from_train(train_state.variables)}
        if run.method.on_epoch_end and phase == "step1":
          train_state = _end_of_epoch(run, par, train_state, method_kwargs,
                                      epoch=done // run.steps_per_epoch,
                                      batch_size=eval_batch_size)
      # Several processes agree on the step to stop at (a collective, every
      # `sync_every` steps); one process reads its own flag every step.
      preempted = ((jax.process_count() == 1 or done % sync_every == 0
                    or done == run.total_steps) and par.any_process(sigterm.raised))
      if done % checkpoint_every == 0 or end_of_phase or preempted:
        pending = [par.metrics_to_host(m) for m in pending]
        checkpointer.save(done, par.checkpoint_view(train_state), best,
                          {**progress, "pending_metrics": _pending_to_json(pending)})
      bar.update(1)
      if preempted and done < run.total_steps:
        checkpointer.close()
        raise Preempted(done)
  checkpointer.close()

  test = evaluate(eval_step, par.to_train(best["variables"]), run.splits["test"],
                  eval_batch_size, par, loader)
  results = {
      "method": config["method"], "dataset": config["dataset"], "seed": seed,
      "steps": run.total_steps, "best_step": progress["best_step"],
      "validation_accuracy": progress["best_validation_accuracy"],
      "test_accuracy": test["accuracy"], "test_loss": test["loss"],
      "train_seconds_this_run": time.time() - start_time,
  }
  writer.write(run.total_steps, **{f"test/{k}": v for k, v in test.items()})
  if primary:
    write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results


def is_better(validation: Mapping[str, float], progress: Mapping[str, Any]) -> bool:
  """The model-selection rule: higher validation accuracy, and on a tie lower
  validation cross-entropy. (Accuracy saturates on small validation splits,
  e.g. av_digits' synthetic voices reach 1.0 within two epochs; the tie rule
  then keeps training rather than the first epoch that got there.)"""
  best = progress["best_validation_accuracy"]
  if validation["accuracy"] != best:
    return validation["accuracy"] > best
  best_loss = progress.get("best_validation_loss")
  return best_loss is None or validation["loss"] < best_loss


def _end_of_epoch(run: Run, par, train_state, method_kwargs, *, epoch: int, batch_size: int):
  """Applies the method's `on_epoch_end` state update (e.g. GB's blending weights)."""
  host = par.host(train_state)
  update = run.method.on_epoch_end(run.model, method_kwargs, host.variables, host.state,
                                   run.splits, epoch=epoch, batch_size=batch_size)
  if not update:
    return train_state
  return par.to_train(par.canonical(host.replace(state={**host.state, **update})))


def _mean_metrics(pending: list[dict], step: int) -> dict[str, float]:
  """Means of the pending per-step metrics (host values); raises on a non-finite loss."""
  stacked = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *pending)
  summary = {k: float(np.mean(v)) for k, v in stacked.items()}
  if not math.isfinite(summary["loss"]):
    raise FloatingPointError(f"non-finite training loss {summary['loss']} at step {step}")
  return summary


def _pending_to_json(pending: list[dict]) -> dict:
  """Not-yet-logged per-step metrics (host values) -> JSON (exact: dtype + values)."""
  if not pending:
    return {}
  return {k: {"dtype": str(np.asarray(pending[0][k]).dtype),
              "values": [np.asarray(m[k]).item() for m in pending]} for k in pending[0]}


def _pending_from_json(payload: Mapping) -> list[dict]:
  """The inverse of `_pending_to_json`."""
  if not payload:
    return []
  length = len(next(iter(payload.values()))["values"])
  return [{k: np.asarray(v["values"][i], dtype=v["dtype"]) for k, v in payload.items()}
          for i in range(length)]


def restore_run(workdir: str, which: str = "best"):
  """Loads a finished or running training run from its workdir.

  Args:
    workdir: a directory written by `train_and_evaluate`.
    which: "best" (the model selected on validation) or "latest".

  Returns:
    (config dict, model, variables, splits dict "train"/"validation"/"test").
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"workdir: expected a training run with config.json, found none "
                            f"in {workdir!r}")
  if which not in ("best", "latest"):
    raise ValueError(f"which: expected 'best' or 'latest', got {which!r}")
  with open(config_path) as f:
    config = json.load(f)
  run = setup(config)
  template = init_train_state(run, int(config.get("seed", 0)), int(config["batch_size"]),
                              method_config(config, run))
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"workdir: no checkpoint under {workdir!r}/checkpoints")
  train_state, best, _ = checkpointer.restore(step, template, {"variables": template.variables})
  checkpointer.close()
  variables = best["variables"] if which == "best" else train_state.variables
  return config, run.model, variables, run.splits
