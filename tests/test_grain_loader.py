"""The grain loader: its saved position, uint8 batches normalised inside the compiled
steps, and the checks on raw batches."""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

from mmsafe import data as data_lib
from mmsafe.data import types
from mmsafe.data.dataset import Dataset
from mmsafe.train import parallel as parallel_lib


def _arrays(n=20):
  rng = np.random.default_rng(0)
  inputs = {"x": rng.normal(size=(n, 3)).astype(np.float32)}
  return Dataset(name="toy", split="train", inputs=inputs,
                 labels=(np.arange(n) % 4).astype(np.int32), num_classes=4, stats={})


def test_saved_position_restores_the_next_batch():
  data = _arrays()
  kwargs = dict(batch_size=3, seed=2, process_index=0, process_count=1)
  with data_lib.train_iterator(data, num_threads=2, **kwargs) as batches:
    for _ in range(4):  # past the end of the first epoch (6 steps of 3)
      next(batches)
    state = batches.get_state()
    expected = [next(batches) for _ in range(4)]
  assert state["grain"] == {"next_index": 4} and state["step"] == 4
  with data_lib.train_iterator(data, num_threads=1, **kwargs) as resumed:
    with pytest.raises(ValueError, match="data iterator state: expected one saved with"):
      resumed.set_state(state)  # other workers
  with data_lib.train_iterator(data, num_threads=2, **kwargs) as resumed:
    resumed.set_state(state)
    for step, batch in enumerate(expected, start=4):
      got = next(resumed)
      np.testing.assert_array_equal(got["inputs"]["x"], batch["inputs"]["x"])
      # The batches of the old loader: `train_batch` (a function of seed and step).
      np.testing.assert_array_equal(got["label"], data_lib.train_batch(
          data.inputs, data.labels, batch_size=3, seed=2, step=step)["label"])


def test_uint8_batches_are_normalised_inside_the_compiled_eval_step():
  Out = collections.namedtuple("Out", "logits")

  class Model:  # logits: per-modality sums, so every input value counts
    def apply(self, variables, inputs, train):
      del train
      feats = [inputs[m].reshape(inputs[m].shape[0], -1).sum(-1, keepdims=True)
               for m in ("visual", "audio")]
      return Out(jnp.concatenate(feats, -1) * variables["w"])

  rng = np.random.default_rng(1)
  raw = {"visual": rng.integers(0, 256, (4, 2, 3, 3, 3), dtype=np.uint8),
         "audio": rng.normal(size=(4, 5, 2, 1)).astype(np.float16)}
  batch = {"label": np.array([0, 1, 1, 0], np.int32), "valid": np.array([1, 1, 1, 0], bool)}
  parallel = parallel_lib.DataParallel.create("none")
  variables = {"w": jnp.array([1.0, -2.0])}
  on_device = parallel.compile_eval_step(Model(), data_lib.normalize_inputs)(
      variables, {**batch, "inputs": raw})
  on_host = parallel.compile_eval_step(Model())(
      variables, {**batch, "inputs": data_lib.normalize_inputs(raw)})
  for key in ("correct", "loss_sum", "count"):
    np.testing.assert_allclose(float(on_device[key]), float(on_host[key]), rtol=1e-5)
  assert float(on_device["count"]) == 3  # the masked row is not counted


def test_raw_batches_pass_validation_only_when_declared_raw():
  shapes = {"visual": (2, 3, 3, 3)}
  batch = {"inputs": {"visual": np.zeros((2, 2, 3, 3, 3), np.uint8)},
           "label": np.array([0, 1], np.int32)}
  types.validate_batch(batch, shapes, num_classes=2, raw_inputs=True)
  with pytest.raises(ValueError, match=r"batch\['inputs'\]\['visual'\]: expected a floating"):
    types.validate_batch(batch, shapes, num_classes=2)
  bad = {"inputs": {"visual": np.zeros((2, 2, 3, 4, 3), np.uint8)}, "label": batch["label"]}
  with pytest.raises(ValueError, match=r"expected shape \[2, 2, 3, 3, 3\]"):
    types.validate_batch(bad, shapes, num_classes=2, raw_inputs=True)


def test_bad_loader_options_and_hosts_fail_naming_the_field():
  data = _arrays()
  with pytest.raises(ValueError, match="loader.num_threads: expected >= 0, got -1"):
    data_lib.train_iterator(data, batch_size=2, process_index=0, process_count=1,
                            num_threads=-1)
  with pytest.raises(ValueError, match=r"process_index: expected in \[0, 2\), got 2"):
    data_lib.eval_pass(data, normalized=False, batch_size=2, process_index=2, process_count=2)


def test_hosts_stream_disjoint_rows_that_cover_the_split_once():
  data = _arrays(n=7)
  rows, counts = [], []
  for host in range(2):
    with data_lib.eval_pass(data, batch_size=2, process_index=host, process_count=2) as passes:
      batches = list(passes)
    counts.append(len(batches))
    for batch in batches:
      valid = batch["valid"]
      assert valid.tolist() == sorted(valid.tolist(), reverse=True)  # real rows first
      rows += [tuple(x) for x in batch["inputs"]["x"][valid]]
  assert counts == [2, 2]  # as many batches on every host (collectives stay in step)
  assert sorted(rows) == sorted(tuple(x) for x in data.inputs["x"])
  from mmsafe.train import distributed
  tree = {"a": np.arange(3.0)}
  np.testing.assert_array_equal(distributed.reduce_over_processes(tree, "max")["a"], tree["a"])
  with pytest.raises(ValueError, match="op: expected one of"):
    distributed.reduce_over_processes(tree, "mean")
  # A callback's pass over a split: every valid row once, reduced by `op`.
  reduce_over_split = distributed.split_reducer({"train": data}, batch_size=2)
  row_sums = lambda batches: sum(float(np.sum(b["inputs"]["x"][b["valid"]])) for b in batches)
  np.testing.assert_allclose(reduce_over_split("train", row_sums, "sum"),
                             np.sum(data.inputs["x"]), rtol=1e-6)
  with pytest.raises(ValueError, match="split: expected one of \\['train'\\], got 'test'"):
    reduce_over_split("test", row_sums, "sum")


def test_evaluation_counts_every_example_once():
  from mmsafe.train import loop
  Out = collections.namedtuple("Out", "logits")

  class Model:  # predicts class 1 for every example
    def apply(self, variables, inputs, train):
      del variables, train
      return Out(jnp.tile(jnp.array([0.0, 5.0, 0.0, 0.0]), (inputs["x"].shape[0], 1)))

  data = _arrays(n=7)  # labels 0,1,2,3,0,1,2: two of class 1
  parallel = parallel_lib.DataParallel.create("none")
  result = loop.evaluate(parallel.compile_eval_step(Model()), {}, data, 4, parallel)
  assert result["accuracy"] == pytest.approx(2 / 7)  # padding copies of example 0 not counted
  batches = list(data_lib.eval_batches(data.inputs, data.labels, batch_size=4))
  assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True] * 3 + [False]]


def test_splits_that_disagree_with_the_training_split_fail_naming_the_field():
  import dataclasses
  train = _arrays()
  data_lib.check_splits({"train": train, "validation": _arrays(n=5)})
  with pytest.raises(ValueError, match=r"data.splits.validation.num_classes: expected 4 .*got 5"):
    data_lib.check_splits({"train": train,
                           "validation": dataclasses.replace(train, num_classes=5)})
  wide = dataclasses.replace(train, inputs={"x": np.zeros((20, 4), np.float32)})
  with pytest.raises(ValueError, match=r"data.splits.test.shapes\['x'\]: expected \(3,\)"):
    data_lib.check_splits({"train": train, "test": wide})
