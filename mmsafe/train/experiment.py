"""What a training run is made of, built from a config: data, model, method, stages."""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mmsafe import data as data_lib
from mmsafe import methods
from mmsafe import models
from mmsafe.eval import registry as evaluators_lib
from mmsafe.train import parallel as parallel_lib
from mmsafe.checks import check_integer, check_number
from mmsafe.train.optimizer import make_optimizer, per_stage
from mmsafe.train.stages import TrainingStage, stage_at, training_stages
from mmsafe.train.state import TrainState

SPLIT_ROLES = ("train", "validation", "test")
# The run's integer fields checked before training: name -> (default, minimum).
RUN_INTEGERS = {"seed": (0, 0), "eval_batch_size": (256, 1), "log_every_steps": (0, 0),
                "checkpoint_every_steps": (0, 0), "checkpoint_max_to_keep": (2, 1),
                "preemption_sync_steps": (10, 0)}


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a training run is made of, built from a validated config.

  Attributes:
    config: the config (a plain dict).
    splits: "train" / "validation" / "test" datasets.
    model: the `MultiModalModel`.
    method: the `Method` trained.
    stages: the training stages in order, with their step ranges.
    optimizers: stage name -> optax transformation; all share one optimizer
      state (`optimizer.per_stage`).
    steps_per_epoch: optimizer steps per pass over the training split.
    evaluators: the in-training evaluators of `config.evals`, built (and so
      validated) before anything is written.
    method_settings: the method's settings (`Method.settings`) from
      `config.method_kwargs` plus `steps_per_epoch` (methods whose schedule
      is in epochs count them from the step counter).
  """

  config: dict
  splits: dict
  model: Any
  method: methods.Method
  stages: tuple[TrainingStage, ...]
  optimizers: dict
  steps_per_epoch: int
  evaluators: dict = dataclasses.field(default_factory=dict)
  method_settings: methods.Settings = methods.Settings()

  @property
  def total_steps(self) -> int:
    return self.stages[-1].end_step

  def stage_at(self, step: int) -> TrainingStage:
    return stage_at(self.stages, step)

  def stage_settings(self, stage: TrainingStage) -> methods.Settings:
    """The settings of the method whose objective `stage` runs (a stage listed
    in `config.stages` may come from another method)."""
    if stage.method == self.method.name:
      return self.method_settings
    return methods.get(stage.method).make_settings(
        method_kwargs(self.config, self.steps_per_epoch))

  def objective(self, stage: TrainingStage, batch_norm_axis_name: str | None = None):
    """`stage`'s objective; with `batch_norm_axis_name`, on a model whose batch
    norm averages its statistics over that axis (same parameters)."""
    model = (self.model if batch_norm_axis_name is None else
             build_model(self.config, self.method, self.splits["train"], batch_norm_axis_name))
    return stage.make_objective(model, self.stage_settings(stage))

  def init_train_state(self) -> TrainState:
    """The initial `TrainState` (deterministic in `config.seed`), built by one
    compiled program. The seed's key is an argument, not a constant, so every
    seed of one model runs the same program (read from the persistent
    compilation cache after the first)."""
    key = jax.random.PRNGKey(int(self.config.get("seed", 0)))
    return jax.jit(self._init_train_state)(key)

  def abstract_train_state(self, sharding: jax.sharding.Sharding) -> TrainState:
    """The train state's shapes and dtypes, placed by `sharding` (a checkpoint
    template; nothing is computed or compiled)."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        jax.eval_shape(self.init_train_state))

  def _init_train_state(self, key: jax.Array) -> TrainState:
    init_rng, train_rng = jax.random.split(key)
    example = {m: jnp.zeros((int(self.config["batch_size"]), *shape), jnp.float32)
               for m, shape in self.splits["train"].modality_shapes.items()}
    variables = self.model.init(init_rng, example)
    method_state = (self.method.init_state(self.model, variables, self.method_settings)
                    if self.method.init_state else None)
    return TrainState.create(variables, self.optimizers[self.stages[0].name], train_rng,
                             method_state)


def build_experiment(config: Mapping[str, Any]) -> Experiment:
  """Validates the config and builds everything a run needs, touching no file.

  Raises ValueError naming the bad field before anything is written.
  """
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  method = methods.get(config["method"])
  if config.get("parallel", "none") not in parallel_lib.MODES:
    raise ValueError(f"parallel: expected one of {list(parallel_lib.MODES)}, got "
                     f"{config.get('parallel')!r}")
  seed = check_run_fields(config)
  batch_size = check_integer(config.get("batch_size"), "batch_size", 1)
  settings = method.make_settings(method_kwargs(config))
  splits = hold_out(load_splits(config), method, settings, seed)
  train = splits["train"]
  if batch_size > len(train):
    raise ValueError(f"batch_size: expected 1..{len(train)} (the training set size), "
                     f"got {batch_size}")
  steps_per_epoch = len(train) // batch_size
  stages = training_stages(config, method, steps_per_epoch)
  for listed in {stage.method for stage in stages} - {method.name}:
    methods.get(listed).make_settings(method_kwargs(config))
  optimizers = per_stage({
      stage.name: make_optimizer(stage.optimizer, steps_per_epoch, field=stage.optimizer_field)
      for stage in stages})
  model = build_model(config, method, train)
  evaluators = evaluators_lib.build_evaluators(config.get("evals"), model=model, splits=splits,
                                               seed=seed, run_config=config)
  return Experiment(config=config, splits=splits, model=model, method=method, stages=stages,
                    optimizers=optimizers, steps_per_epoch=steps_per_epoch,
                    evaluators=evaluators,
                    method_settings=method.make_settings(method_kwargs(config, steps_per_epoch)))


def check_run_fields(config: Mapping[str, Any]) -> int:
  """Checks the run's integer fields (`RUN_INTEGERS`: at least one checkpoint
  kept, cadences >= 0, ...) and `checkpoint_every_seconds` (finite, > 0);
  returns the seed."""
  for name, (default, minimum) in RUN_INTEGERS.items():
    check_integer(config.get(name, default), name, minimum)
  check_number(config.get("checkpoint_every_seconds", 60.0), "checkpoint_every_seconds", 0.0,
               inclusive=False)
  return int(config.get("seed", 0))


def method_kwargs(config: Mapping[str, Any], steps_per_epoch: int | None = None
                  ) -> dict[str, Any]:
  """`config.method_kwargs`, plus `steps_per_epoch` when given (set by the loop)."""
  kwargs = dict(config.get("method_kwargs") or {})
  return kwargs if steps_per_epoch is None else {**kwargs, "steps_per_epoch": steps_per_epoch}


def hold_out(splits: Mapping[str, Any], method: methods.Method, settings: methods.Settings,
             seed: int) -> dict:
  """`splits` with the slice of "train" that `method` holds out moved to split
  "heldout" (`Method.heldout_fraction_kwarg`, a field of `settings`; a random
  slice, the same for every run with the same seed), or `splits` unchanged."""
  name = method.heldout_fraction_kwarg
  if name is None:
    return dict(splits)
  train, heldout = data_lib.split_off(splits["train"], getattr(settings, name), seed=seed,
                                      field=f"method_kwargs.{name}")
  return {**splits, "train": train, "heldout": heldout}


def build_model(config: Mapping[str, Any], method: methods.Method, train,
                batch_norm_axis_name: str | None = None):
  """The run's model for `method` on the training split `train`; with
  `batch_norm_axis_name`, batch norm averages its statistics over that axis
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
  try:
    return {role: data_lib.load(config["dataset"], names[role], **data_kwargs)
            for role in SPLIT_ROLES}
  except ValueError as e:
    if str(e).split(":", 1)[0] in data_kwargs:  # A loader's error about a data field.
      raise ValueError(f"data.{e}") from e
    raise
