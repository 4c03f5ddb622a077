"""Training stages: which objective and optimizer each range of steps runs.

A method declares its stages (`mmsafe.methods.Stage`); the config gives each
its optimizer and epochs. By default a method's stage reads the config section
it names: "optimizer" with the top-level `num_epochs`, or another section
(e.g. "step2") holding its own `num_epochs` (None: a third of `num_epochs`)
beside the optimizer fields. `config.stages` may instead list the stages
explicitly, each a dict

    {"name": "finetune", "objective": "<method>/<stage>", "optimizer": "<section>" or {...},
     "num_epochs": 10, "restart_selection": True}

(`objective` is "<method>/<stage>" or "<method>" for a method's first stage;
`optimizer` a config section or the optimizer's fields, `trainable` included;
a new stage list needs no change outside the config).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any

from mmsafe import methods
from mmsafe.checks import check_integer

_STAGE_KEYS = ("name", "objective", "optimizer", "num_epochs", "restart_selection")


@dataclasses.dataclass(frozen=True)
class TrainingStage:
  """One stage of a run, resolved from the method and the config.

  Attributes:
    name: the stage's name in logs and checkpoints.
    make_objective: `(model, settings) -> loss_fn`.
    optimizer: `make_optimizer`'s config (with `trainable`).
    optimizer_field: where the config holds it (a section, e.g. "step2", or
      "stages[<i>].optimizer"), for error messages.
    num_epochs: epochs of the stage.
    restart_selection: whether model selection restarts when it begins.
    start_step, end_step: the run's steps `[start_step, end_step)` it covers.
  """

  name: str
  make_objective: methods.registry.MakeObjective
  optimizer: dict
  num_epochs: int
  restart_selection: bool
  method: str
  optimizer_field: str = "optimizer"
  start_step: int = 0
  end_step: int = 0


def _section(config: Mapping[str, Any], name: str, stage: str) -> dict:
  section = config.get(name)
  if not section:
    raise ValueError(f"{name}: stage {stage!r} of method {config['method']!r} reads its "
                     f"optimizer from this config section; expected a section with "
                     f"learning_rate, ..., got {section!r}")
  return dict(section)


def _epochs(value: Any, default: int, field: str) -> int:
  """`value` (None: `default`) checked to be an integer >= 1."""
  return check_integer(default if value is None else value, field, 1)


def _declared(config: Mapping[str, Any], method: str, stage: methods.Stage) -> TrainingStage:
  """A method's stage with the optimizer and epochs of its config section."""
  optimizer = _section(config, stage.optimizer, stage.name)
  base_epochs = _epochs(config["num_epochs"], 0, "num_epochs")
  if stage.optimizer == "optimizer":
    num_epochs = base_epochs
  else:
    num_epochs = _epochs(optimizer.pop("num_epochs", None), base_epochs // 3,
                         f"{stage.optimizer}.num_epochs")
  optimizer["trainable"] = optimizer.get("trainable") or stage.trainable
  return TrainingStage(stage.name, stage.make_objective, optimizer, num_epochs,
                       stage.restart_selection, method, optimizer_field=stage.optimizer)


def _listed(config: Mapping[str, Any], index: int, entry: Mapping[str, Any]) -> TrainingStage:
  """A stage listed in `config.stages`."""
  field = f"stages[{index}]"
  unknown = sorted(set(entry) - set(_STAGE_KEYS))
  if unknown or "objective" not in entry:
    raise ValueError(f"{field}: expected keys among {list(_STAGE_KEYS)} with 'objective', "
                     f"got {sorted(entry)}")
  method_name, _, stage_name = str(entry["objective"]).partition("/")
  method = methods.get(method_name)
  declared = method.stage(stage_name) if stage_name else method.stages[0]
  optimizer = entry.get("optimizer", declared.optimizer)
  optimizer_field = optimizer if isinstance(optimizer, str) else f"{field}.optimizer"
  optimizer = (_section(config, optimizer, declared.name) if isinstance(optimizer, str)
               else dict(optimizer))
  optimizer.pop("num_epochs", None)
  optimizer["trainable"] = optimizer.get("trainable") or declared.trainable
  return TrainingStage(str(entry.get("name", declared.name)), declared.make_objective,
                       optimizer, _epochs(entry.get("num_epochs"), 0, f"{field}.num_epochs"),
                       bool(entry.get("restart_selection", declared.restart_selection)),
                       method.name, optimizer_field=optimizer_field)


def training_stages(config: Mapping[str, Any], method: methods.Method, steps_per_epoch: int
                    ) -> tuple[TrainingStage, ...]:
  """The run's stages in order, with their step ranges; `config.stages` when set,
  else the method's own. Raises ValueError naming the bad field."""
  listed: Sequence[Mapping[str, Any]] = config.get("stages") or ()
  stages = ([_listed(config, i, entry) for i, entry in enumerate(listed)] if listed
            else [_declared(config, method.name, stage) for stage in method.stages])
  names = [stage.name for stage in stages]
  if len(set(names)) != len(names):
    raise ValueError(f"stages: expected distinct stage names, got {names}")
  start, resolved = 0, []
  for stage in stages:
    end = start + stage.num_epochs * steps_per_epoch
    resolved.append(dataclasses.replace(stage, start_step=start, end_step=end))
    start = end
  return tuple(resolved)


def stage_at(stages: Sequence[TrainingStage], step: int) -> TrainingStage:
  """The stage that runs step `step` (0-based)."""
  for stage in stages:
    if step < stage.end_step:
      return stage
  raise ValueError(f"step: expected < {stages[-1].end_step} (the run's steps), got {step}")
