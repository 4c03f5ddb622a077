"""Training stages and callbacks: a new two-stage method is a registry entry plus a
config section; `config.stages` lists the same stages explicitly; stage configs
fail fast."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from mmsafe import methods
from mmsafe.methods import compose, registry
from mmsafe.train import loop, restore, stages
from tests.conftest import assert_fails_before_touching_the_workdir, mfeat_config

TUNE = {"learning_rate": 0.01, "momentum": 0.9, "num_epochs": 1}


class _CountingCallback(methods.Callback):
  """Records the events it sees in the method state (as a count per event)."""

  def on_stage_start(self, stage, context):
    return {"events": {**context.state["events"],
                       f"start_{stage}": context.state["events"][f"start_{stage}"] + 1}}

  def on_epoch_end(self, stage, epoch, context):
    del epoch
    return {"events": {**context.state["events"],
                       f"epoch_{stage}": context.state["events"][f"epoch_{stage}"] + 1}}


def _init_events(model, variables, config):
  del model, variables, config
  return {"events": {f"{event}_{stage}": np.zeros((), np.int32)
                     for event in ("start", "epoch") for stage in ("train", "tune")}}


@pytest.fixture
def two_stage_method(monkeypatch):
  """A method defined only through the registry: OJT, then a stage tuning the
  modality weights `a` with the optimizer of the config section "tune"."""
  ce = compose.composed_objective("clean", "ce")
  method = methods.Method(
      "ojt_tune", "orthogonal", stages=(
          methods.Stage("train", ce),
          methods.Stage("tune", ce, optimizer="tune", trainable="modality_weights",
                        restart_selection=True)),
      init_state=_init_events, callbacks=(_CountingCallback(),))
  monkeypatch.setitem(registry._REGISTRY, "ojt_tune", method)
  return method


def _leaves(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.slow
def test_a_new_two_stage_method_needs_only_the_registry_and_a_config(two_stage_method,
                                                                    tmp_path):
  del two_stage_method
  config = mfeat_config("ojt_tune", num_epochs=1)
  config.tune = TUNE
  results = loop.train_and_evaluate(config, str(tmp_path / "two"))
  assert results["steps"] == 2 * 21
  with open(tmp_path / "two" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [line["stage"] for line in lines if "train/loss" in line] == ["train", "tune"]
  reference = mfeat_config("ojt", num_epochs=1)
  loop.train_and_evaluate(reference, str(tmp_path / "one"))
  tuned = _leaves(restore.restore_run(str(tmp_path / "two"), which="latest")[2])
  first = _leaves(restore.restore_run(str(tmp_path / "one"), which="latest")[2])
  # Stage 1 is OJT exactly; stage 2 moved `a` only (batch norm frozen too: none here).
  for key, value in first.items():
    if "['a']" in key:
      assert not np.array_equal(value, tuned[key]), key
    else:
      np.testing.assert_array_equal(value, tuned[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("restart", [True, False])
def test_a_stage_that_restarts_selection_reports_a_model_that_went_through_it(
    two_stage_method, tmp_path, restart):
  """With a learning rate of 0 the tuning stage changes nothing, so its validation
  ties the first stage's: only a restarted selection picks the later step."""
  method = two_stage_method
  tune = dataclasses.replace(method.stages[1], restart_selection=restart)
  registry._REGISTRY["ojt_tune"] = dataclasses.replace(method, stages=(method.stages[0], tune))
  config = mfeat_config("ojt_tune", num_epochs=1)
  config.tune = {**TUNE, "learning_rate": 0.0}
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert results["best_step"] == (2 * 21 if restart else 21)


@pytest.mark.slow
def test_callbacks_see_each_stage_start_once_and_every_epoch(two_stage_method, tmp_path):
  del two_stage_method
  config = mfeat_config("ojt_tune", num_epochs=2)
  config.tune = TUNE
  config.checkpoint_every_steps = 5
  loop.train_and_evaluate(config, str(tmp_path / "run"))
  from tests.test_parallel import read_train_state
  state = read_train_state(str(tmp_path / "run"))
  events = {key.split("'events']['")[1].rstrip("']"): int(v) for key, v in state.items()
            if "'events'" in key}
  assert events == {"start_train": 1, "start_tune": 1, "epoch_train": 2, "epoch_tune": 1}


@pytest.mark.slow
def test_listed_stages_equal_the_declared_ones(two_stage_method, tmp_path):
  del two_stage_method
  declared = mfeat_config("ojt_tune", num_epochs=1)
  declared.tune = TUNE
  listed = mfeat_config("ojt", num_epochs=1)
  listed.stages = ({"objective": "ojt", "num_epochs": 1},
                   {"name": "tune", "objective": "ojt_tune/tune", "num_epochs": 1,
                    "optimizer": {"learning_rate": 0.01, "momentum": 0.9,
                                  "trainable": "modality_weights"}})
  a = loop.train_and_evaluate(declared, str(tmp_path / "declared"))
  b = loop.train_and_evaluate(listed, str(tmp_path / "listed"))
  assert a["test_accuracy"] == b["test_accuracy"]
  for x, y in zip(*(jax.tree_util.tree_leaves(restore.restore_run(str(tmp_path / name))[2])
                    for name in ("declared", "listed"))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("method, field, value, message", [
    ("jt", "stages", ({"objective": "jt", "epochs": 1},),
     r"stages\[0\]: expected keys among .*got \['epochs', 'objective'\]"),
    ("jt", "stages", ({"objective": "jt/warmup", "num_epochs": 1},),
     r"stage: method 'jt' has stages \['train'\], got 'warmup'"),
    ("jt", "stages", ({"objective": "jt", "num_epochs": 1}, {"objective": "jt", "num_epochs": 1}),
     r"stages: expected distinct stage names, got \['train', 'train'\]"),
    ("crmt", "step2", None, r"step2: stage 'step2' of method 'crmt' reads its optimizer"),
    ("crmt", "step2.num_epochs", 0, r"step2.num_epochs: expected an integer >= 1, got 0"),
    ("crmt", "step2.trainable", "encoders", r"step2.trainable: expected one of"),
])
def test_bad_stage_configs_fail_before_touching_the_workdir(tmp_path, method, field, value,
                                                            message):
  config = mfeat_config(method, num_epochs=1).to_dict()
  config["step2"]["num_epochs"] = 1
  assert_fails_before_touching_the_workdir(config, field, value, message, tmp_path / "run")


def test_stage_at_follows_the_step_ranges():
  config = mfeat_config("crmt", num_epochs=3).to_dict()
  config["step2"]["num_epochs"] = None  # a third of num_epochs
  resolved = stages.training_stages(config, methods.get("crmt"), steps_per_epoch=10)
  assert [(s.name, s.start_step, s.end_step) for s in resolved] == [("step1", 0, 30),
                                                                    ("step2", 30, 40)]
  assert resolved[1].optimizer["trainable"] == "modality_weights"
  assert [stages.stage_at(resolved, step).name for step in (0, 29, 30, 39)] == [
      "step1", "step1", "step2", "step2"]
  with pytest.raises(ValueError, match="step: expected < 40"):
    stages.stage_at(resolved, 40)
