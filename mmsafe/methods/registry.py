"""Registry of training methods: name -> `Method`.

A method is a head kind plus one or more training *stages*, each with an
objective

    loss_fn(params, state, batch, rng) -> (loss, (new_state, metrics))

built for a given model, and optional *callbacks* that update the method's
state where a pure train step cannot (whole-split measurements). `state` is a
dict whose entry "model" holds the model's non-parameter collections
(batch-norm statistics); methods keep their own entries beside it
(`init_state`). The training loop (`mmsafe.train`) runs the stages in order and
calls the callbacks; it knows no method by name.

Each method declares its hyper-parameters as a frozen dataclass
(`mmsafe.methods.settings.Settings`, `Method.settings`); objectives, callbacks
and `init_state` receive that settings object, built from
`config.method_kwargs` by `Method.make_settings`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import difflib
from typing import Any

import jax

from mmsafe.methods.settings import Settings, check_value

Objective = Callable[..., tuple[jax.Array, tuple[dict, dict]]]
MakeObjective = Callable[[Any, Settings], Objective]

_REGISTRY: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a method's training.

  Attributes:
    name: the stage's name in logs and checkpoints ("train", "step1", "step2").
    make_objective: `(model, settings) -> loss_fn`; `settings` are the
      method's hyper-parameters (`Method.settings`).
    optimizer: the config section with this stage's optimizer
      (`mmsafe.train.optimizer.make_optimizer`) and, for every stage but the
      one reading "optimizer", its `num_epochs`.
    trainable: the parameters the stage moves (`mmsafe.train.optimizer.TRAINABLE`:
      "all", or "modality_weights" for the orthogonal head's `a`); the others
      get exactly-zero updates.
    restart_selection: whether model selection starts afresh with this stage,
      so the reported model went through it.
  """

  name: str
  make_objective: MakeObjective
  optimizer: str = "optimizer"
  trainable: str = "all"
  restart_selection: bool = False


class Callback:
  """A method's hook on the training loop's events.

  Each hook gets a `CallbackContext` and returns method-state entries to
  replace (`{}`: nothing changes). The loop calls them on every process with
  the same arguments, on host (numpy) variables.
  """

  def on_stage_start(self, stage: str, context: "CallbackContext") -> dict:
    """Before the first step of `stage` (once per run, also across resumes)."""
    del stage, context
    return {}

  def on_epoch_end(self, stage: str, epoch: int, context: "CallbackContext") -> dict:
    """After epoch `epoch` (completed epochs of the run) of `stage`."""
    del stage, epoch, context
    return {}


@dataclasses.dataclass(frozen=True)
class CallbackContext:
  """What a callback may read. A callback reads no dataset itself: the training
  loop streams the splits for it (`reduce_over_split`), so methods stay free of
  the data pipeline and of the processes a run spans.

  Attributes:
    model: the `MultiModalModel`.
    variables: the model variables (host values).
    state: the train state's non-parameter state (`state["model"]` and the
      methods' entries).
    split_names: the run's splits ("train", "validation", "test", and
      "heldout" for a method that holds out part of the training split).
    config: the method's settings (`Method.settings`).
    reduce_over_split: `reduce_over_split(split, fn, op)` calls
      `fn(batches)` on this process's rows of split `split` (evaluation
      batches in model space with a `"valid"` mask) and reduces its result,
      numpy leaves of one structure on every process, over the processes by
      `op` ("sum" or "max"); a collective, called alike on every process.
  """

  model: Any
  variables: Any
  state: Mapping[str, Any]
  split_names: tuple[str, ...]
  config: Settings
  reduce_over_split: Callable[[str, Callable[[Iterable[Mapping[str, Any]]], Any], str], Any]


@dataclasses.dataclass(frozen=True)
class Defence:
  """A method's test-time defence: evaluators put it around a model trained with
  the method when asked for `defence=<method name>` (white box: attacks
  differentiate through `logits`).

  Attributes:
    settings: `(method_kwargs) -> settings`, checked (a ValueError names the
      field; `settings_of`); called when the evaluator is built, before
      anything runs.
    prepare: `(model, variables, train_inputs, settings, *, seed, batch_size)
      -> defended`, the pytree `logits` reads (e.g. a memory of training
      features); `train_inputs` are the training split's inputs in model space.
    logits: `(model, settings, defended, inputs) -> [B, K]` fused logits of
      the defended classifier (`settings` static, `defended` traced).
  """

  settings: Callable[[Mapping[str, Any]], Any]
  prepare: Callable[..., Any]
  logits: Callable[[Any, Any, Any, Mapping[str, Any]], Any]


@dataclasses.dataclass(frozen=True)
class Method:
  """A named training method.

  Attributes:
    name: registry name (`--config.method=<name>`).
    head: the head kind the method trains ("concat" or "orthogonal").
    stages: the training stages, run in order.
    settings: the method's `Settings` class: its hyper-parameters, defaults
      and ranges (`config.method_kwargs` overrides them; `make_settings`).
    description: one line for `--help` and reports.
    init_state: optional `(model, variables, settings) -> dict` of method-state
      entries (beside `state["model"]`), present from the first step so a
      checkpoint has one structure throughout.
    callbacks: the method's `Callback`s.
    heldout_fraction_kwarg: the settings field naming the fraction of the
      training split the method holds out (split "heldout", not trained on),
      or None.
    defence: the method's test-time `Defence`, or None.
  """

  name: str
  head: str
  stages: tuple[Stage, ...]
  settings: type[Settings] = Settings
  description: str = ""
  init_state: Callable[[Any, Any, Settings], dict] | None = None
  callbacks: tuple[Callback, ...] = ()
  heldout_fraction_kwarg: str | None = None
  defence: Defence | None = None

  def stage(self, name: str) -> Stage:
    """The stage called `name`; a clear error for unknown names."""
    for stage in self.stages:
      if stage.name == name:
        return stage
    raise ValueError(f"stage: method {self.name!r} has stages "
                     f"{[s.name for s in self.stages]}, got {name!r}")

  def make_settings(self, kwargs: Mapping[str, Any] | Settings | None) -> Settings:
    """The method's settings: `kwargs` (`config.method_kwargs`, plus
    `steps_per_epoch` from the training loop) over the defaults of
    `self.settings`, checked. `kwargs` may hold other methods' settings (the
    config's bag serves them all): they are checked by the class that declares
    them and left out. Any other key is refused, naming this method and the
    closest field. Settings of this class pass through."""
    if isinstance(kwargs, self.settings):
      return kwargs
    if isinstance(kwargs, Settings):
      raise ValueError(f"settings: method {self.name!r} expected {self.settings.__name__} or "
                       f"method_kwargs, got {type(kwargs).__name__}")
    kwargs = dict(kwargs or {})
    fields = [f.name for f in dataclasses.fields(self.settings)]
    owners = setting_owners()
    unknown = sorted(set(kwargs) - set(fields) - set(owners))
    if unknown:
      close = (difflib.get_close_matches(unknown[0], fields, 1)
               or difflib.get_close_matches(unknown[0], sorted(owners), 1))
      raise ValueError(f"method_kwargs.{unknown[0]}: not a setting of method {self.name!r} "
                       f"({self.settings.__name__}: {fields}) nor of any other method"
                       + (f"; did you mean {close[0]!r}?" if close else ""))
    try:
      for key in sorted(set(kwargs) - set(fields)):
        check_value(owners[key], key, kwargs[key])
      return self.settings(**{k: v for k, v in kwargs.items() if k in fields})
    except ValueError as error:
      raise ValueError(f"{error} (method {self.name!r}, {self.settings.__name__})") from None

  def __call__(self, model, config: Mapping[str, Any] | Settings | None = None) -> Objective:
    """The first stage's objective for `model` (`config`: method kwargs or settings)."""
    return self.stages[0].make_objective(model, self.make_settings(config))


def add_method(name: str, *, head: str, stages: tuple[Stage, ...],
               settings: type[Settings] = Settings, **fields) -> Method:
  """Registers and returns the method `name` with its head, stages and settings
  class; `fields` are the optional `Method` attributes (`description`,
  `init_state`, `callbacks`, `heldout_fraction_kwarg`, `defence`)."""
  if name in _REGISTRY:
    raise ValueError(f"method {name!r} is registered twice")
  _REGISTRY[name] = Method(name, head, tuple(stages), settings, **fields)
  return _REGISTRY[name]


def register(name: str, *, head: str, stages: tuple[Stage, ...] = (), **fields):
  """A decorator of `make_objective(model, settings)` that registers method
  `name` with one stage "train" of that objective (then `stages`); `fields` as
  in `add_method`."""

  def wrap(make_objective: MakeObjective) -> MakeObjective:
    add_method(name, head=head, stages=(Stage("train", make_objective), *stages), **fields)
    return make_objective

  return wrap


def setting_owners() -> dict[str, type[Settings]]:
  """Every registered method's settings field -> a settings class declaring it:
  the keys `method_kwargs` may hold."""
  return {f.name: method.settings for method in _REGISTRY.values()
          for f in dataclasses.fields(method.settings)}


def settings_of(name: str, kwargs: Mapping[str, Any] | None) -> Settings:
  """Method `name`'s settings from `kwargs` (`Method.make_settings`)."""
  return get(name).make_settings(kwargs)


def get(name: str) -> Method:
  """The method registered as `name`; a clear error for unknown names."""
  if name not in _REGISTRY:
    raise ValueError(f"method: expected one of {sorted(_REGISTRY)}, got {name!r}")
  return _REGISTRY[name]


def names() -> tuple[str, ...]:
  """The registered method names, sorted (e.g. "crmt", "jt", "mmat", ...)."""
  return tuple(sorted(_REGISTRY))
