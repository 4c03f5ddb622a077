"""End-to-end training: JT/OJT on mfeat, resume, checkpoints, failures that
leave the workdir intact."""

import dataclasses
import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import data as data_lib
from mmsafe.manifold import orthogonality_error
from mmsafe.train import TrainState, loop, make_optimizer, restore
from mmsafe.train.checkpoint import Checkpointer
from mmsafe.train.experiment import build_experiment
from mmsafe.train.optimizer import MAX_LEARNING_RATE
from mmsafe.train.progress import Progress, is_better
from tests.conftest import assert_fails_before_touching_the_workdir, mfeat_config, rewind


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.parametrize("method", ["jt", "ojt"])
def test_trained_models_beat_chance_by_far(trained_mfeat, method):
  _, _, _, workdir = trained_mfeat[method]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["method"] == method
  assert results["test_accuracy"] > 0.85, results
  lines = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  losses = [line["train/loss"] for line in lines if "train/loss" in line]
  assert losses[-1] < losses[0]
  assert any("validation/accuracy" in line for line in lines)


def test_ojt_keeps_w_tilde_on_the_stiefel_manifold(trained_mfeat):
  _, variables, _, _ = trained_mfeat["ojt"]
  for m, w in variables["params"]["head"]["w_tilde"].items():
    assert orthogonality_error(w) < 1e-5, m
  # ... while a was trained away from its initial value 0.1.
  a = variables["params"]["head"]["a"]
  assert any(np.abs(np.asarray(v) - 0.1).max() > 1e-3 for v in a.values())


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(tmp_path):
  config = mfeat_config("ojt", num_epochs=2)
  config.optimizer.decay_epochs = (1,)
  config.checkpoint_every_steps = 21
  full = loop.train_and_evaluate(config, str(tmp_path / "full"))
  shutil.copytree(tmp_path / "full", tmp_path / "resumed")
  rewind(str(tmp_path / "resumed"), 21)  # Killed after the first epoch.
  checkpointer = Checkpointer(str(tmp_path / "resumed" / "checkpoints"), read_only=True)
  template = loop.build_experiment(config).abstract_train_state(
      jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  _, _, progress = checkpointer.restore(21, template, {"variables": template.variables})
  checkpointer.close()
  # The data position is in the checkpoint (and the resumed run starts from it).
  assert progress["data_iterator"]["start_step"] == 0 and progress["data_iterator"]["step"] == 21
  assert progress["data_iterator"]["grain"] == {"next_index": 21}
  resumed = loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert resumed["steps"] == full["steps"]
  _, _, full_vars, _ = restore.restore_run(str(tmp_path / "full"), which="latest")
  _, _, resumed_vars, _ = restore.restore_run(str(tmp_path / "resumed"), which="latest")
  jax.tree_util.tree_map(np.testing.assert_array_equal, full_vars, resumed_vars)
  assert resumed["test_accuracy"] == full["test_accuracy"]
  steps = [line["step"] for line in _read_jsonl(str(tmp_path / "resumed" / "metrics.jsonl"))
           if "train/loss" in line]
  assert steps == sorted(set(steps)), "metrics.jsonl must not repeat steps after a resume"


def test_every_seed_of_one_model_initialises_with_one_program(caplog):
  """`init_train_state` passes the seed's key as an argument: seeds 0 and 7 run
  one compiled program (one persistent-cache key) and still differ."""
  caplog.set_level(logging.DEBUG, logger="jax._src.compiler")
  states = []
  for seed in (0, 7):
    config = mfeat_config("ojt")
    config.seed = seed
    states.append(build_experiment(config).init_train_state())
  keys = re.findall(r"cache (?:hit|miss) for 'jit__init_train_state' with key '([^']+)'",
                    caplog.text, flags=re.I)
  assert len(keys) == 2 and keys[0] == keys[1], keys
  first, second = (jax.tree_util.tree_leaves(state.params) for state in states)
  assert not all(np.array_equal(a, b) for a, b in zip(first, second))


def test_checkpoint_round_trip(tmp_path):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  optimizer = make_optimizer({"learning_rate": 0.1, "momentum": 0.9}, steps_per_epoch=10)
  state = TrainState.create({"params": params, "batch_stats": {"m": jnp.zeros(2)}}, optimizer,
                            jax.random.PRNGKey(3))
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  checkpointer = Checkpointer(str(tmp_path))
  checkpointer.save(7, state, {"variables": state.variables}, {"best_step": 5})
  checkpointer.wait()
  zeros = jax.tree_util.tree_map(jnp.zeros_like, state)
  restored, best, progress = checkpointer.restore(7, zeros, {"variables": zeros.variables})
  checkpointer.close()
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, state)
  jax.tree_util.tree_map(np.testing.assert_array_equal, best["variables"], state.variables)
  assert progress == {"best_step": 5}


@pytest.mark.parametrize("field, value, message", [
    ("dataset", "mnist", r"dataset: expected one of .*got 'mnist'"),
    ("method", "magic", r"method: expected one of .*got 'magic'"),
    ("data.modalities", ("pix", "depth"), r"depth"),
    ("batch_size", 0, r"batch_size: expected"),
    ("optimizer.name", "lbfgs", r"optimizer.name: expected 'sgd' or 'adam', got 'lbfgs'"),
    ("data.splits", {"valid": "test"}, r"data.splits: expected keys among .*got \['valid'\]"),
    ("evals", {"x": {"type": "magic"}}, r"evals.x.type: expected one of .*got 'magic'"),
    ("evals", {"x": {"type": "pgd", "eps": -1.0}}, r"evals.x.eps: expected finite values >= 0"),
])
def test_bad_configs_fail_before_touching_the_workdir(tmp_path, field, value, message):
  assert_fails_before_touching_the_workdir(mfeat_config("jt", num_epochs=1), field, value,
                                           message, tmp_path / "run")


@pytest.mark.slow
def test_diverging_run_raises_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  config = mfeat_config("jt", num_epochs=3)
  config.optimizer.learning_rate = MAX_LEARNING_RATE  # The largest allowed: it diverges.
  config.optimizer.decay_epochs = ()
  config.log_every_steps = 1
  config.checkpoint_every_steps = 1
  with pytest.raises(FloatingPointError, match=r"non-finite training loss .* at step (\d+)"):
    loop.train_and_evaluate(config, workdir)
  # The last checkpoint is the last step with a finite loss, and it verifies.
  latest = restore.restore_run(workdir, which="latest")[2]
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(latest))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  assert all(np.isfinite(line["train/loss"]) for line in logged if "train/loss" in line)


def _batch():
  return {"inputs": {"pix": np.zeros((4, 16, 15, 1), np.float32),
                     "fou": np.zeros((4, 76), np.float32)},
          "label": np.array([0, 1, 2, 3], np.int32)}


SHAPES = {"pix": (16, 15, 1), "fou": (76,)}


@pytest.mark.parametrize("corrupt, message", [
    (lambda b: b["inputs"].pop("fou"), r"missing modality \['fou'\]"),
    (lambda b: b["inputs"].update(audio=b["inputs"]["fou"]), r"unexpected modality \['audio'\]"),
    (lambda b: b["inputs"].update(fou=np.zeros((4, 75), np.float32)),
     r"\['fou'\]: expected shape \[4, 76\], got \[4, 75\]"),
    (lambda b: b["inputs"].update(fou=np.zeros((4, 76), np.int64)),
     r"\['fou'\]: expected a floating dtype, got int64"),
    (lambda b: b["inputs"]["pix"].__setitem__((2, 0, 0, 0), np.nan),
     r"\['pix'\]: expected finite values, got 1 NaN/Inf entries \(first in example 2\)"),
    (lambda b: b["inputs"]["fou"].__setitem__((1, 3), np.inf), r"\['fou'\]: expected finite"),
    (lambda b: b.__setitem__("label", np.array([0, 1, 2, 10], np.int32)),
     r"label.*\[0, 10\).*got range \[0, 10\]"),
    (lambda b: b.__setitem__("label", np.zeros(4, np.float32)), r"label.*expected int"),
    (lambda b: b.pop("label"), r"missing key 'label'"),
])
def test_bad_batches_fail_fast_naming_the_field(corrupt, message):
  batch = _batch()
  corrupt(batch)
  with pytest.raises(ValueError, match=message):
    data_lib.validate_batch(batch, SHAPES, num_classes=10)


def test_training_batches_are_a_pure_function_of_seed_and_step():
  inputs = {"x": np.arange(20, dtype=np.float32)[:, None]}
  labels = np.arange(20, dtype=np.int32)
  seen = [data_lib.train_batch(inputs, labels, batch_size=6, seed=1, step=s)["label"]
          for s in range(3)]
  np.testing.assert_array_equal(
      seen[1], data_lib.train_batch(inputs, labels, batch_size=6, seed=1, step=1)["label"])
  epoch = np.concatenate(seen)
  assert len(set(epoch.tolist())) == 18  # one epoch: no example twice
  assert not np.array_equal(seen[0], data_lib.train_batch(
      inputs, labels, batch_size=6, seed=1, step=3)["label"])  # next epoch reshuffled


def test_model_selection_prefers_accuracy_then_lower_loss_on_ties():
  progress = Progress(best_validation_accuracy=0.9, best_validation_loss=0.30)
  assert is_better({"accuracy": 0.95, "loss": 0.9}, progress)
  assert not is_better({"accuracy": 0.85, "loss": 0.01}, progress)
  assert is_better({"accuracy": 0.9, "loss": 0.29}, progress)  # a tie: lower loss wins
  assert not is_better({"accuracy": 0.9, "loss": 0.30}, progress)  # a full tie: keep
  # A fresh selection (and a checkpoint written before this rule) has no loss yet.
  assert is_better({"accuracy": 0.9, "loss": 5.0},
                   Progress(best_validation_accuracy=0.9, best_validation_loss=None))


def test_progress_round_trips_through_checkpoint_json():
  progress = Progress(stage="step2", best_validation_accuracy=0.5, best_step=42,
                      pending_metrics={"loss": [1.0]}, data_iterator={"step": 42})
  assert Progress.from_json(json.loads(json.dumps(dataclasses.asdict(progress)))) == progress
  # A checkpoint written before the loss tie rule holds no loss: the default.
  assert Progress.from_json({"stage": "train"}).best_validation_loss is None
  with pytest.raises(ValueError, match=r"checkpoint progress: unknown entries \['epoch'\]"):
    Progress.from_json({"stage": "train", "epoch": 3})


@pytest.mark.slow
def test_evaluators_run_inside_training_and_are_logged(tmp_path):
  config = mfeat_config("jt", num_epochs=1)
  config.log_every_steps = 7
  config.evals = {"val_clean": {"type": "clean", "split": "validation", "every_steps": 7},
                  "val_pgd": {"type": "pgd", "split": "validation", "every_steps": 21,
                              "eps": (0.5,), "protocol": "fast", "max_examples": 50}}
  loop.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  clean = {line["step"]: line for line in lines if "val_clean/clean_accuracy" in line}
  assert sorted(clean) == [7, 14, 21]
  validation = next(line for line in lines if "validation/accuracy" in line)
  # The evaluator's clean accuracy at the end of the epoch is the loop's own validation.
  assert clean[21]["val_clean/clean_accuracy"] == pytest.approx(validation["validation/accuracy"])
  (pgd,) = [line for line in lines if "val_pgd/accuracy/multi@0.5" in line]
  assert pgd["step"] == 21
  assert 0.0 <= pgd["val_pgd/accuracy/multi@0.5"] <= pgd["val_pgd/clean_accuracy"]


def test_checkpoint_cadence_by_steps_and_by_time(monkeypatch):
  from mmsafe.train import preemption
  clock = [0.0]
  monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
  by_steps = preemption.CheckpointCadence(every_steps=5, every_seconds=60.0, sync_every=10,
                                          agree=bool)
  assert [d for d in range(1, 16) if by_steps.due(d, forced=False)] == [5, 10, 15]
  assert by_steps.due(7, forced=True)  # end of a stage, preemption
  by_time = preemption.CheckpointCadence(every_steps=0, every_seconds=60.0, sync_every=10,
                                         agree=bool)
  clock[0] = 59.0
  assert not by_time.due(1, forced=False)
  clock[0] = 60.0
  assert by_time.due(2, forced=False)
  by_time.saved()
  clock[0] = 100.0
  assert not by_time.due(3, forced=False)
  with pytest.raises(ValueError, match="checkpoint_every_seconds"):
    preemption.CheckpointCadence(every_steps=0, every_seconds=0.0, sync_every=1, agree=bool)
