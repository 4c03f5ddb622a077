"""TensorBoard event files beside metrics.jsonl, read back as TensorBoard reads
them (its EventAccumulator, which hides what a resumed run purges): the same
numbers as metrics.jsonl, each step once after a resume, the evaluators'
figures as images, and a writer that cannot write never stops training."""

import errno
import glob
import io
import json
import os
import shutil

from absl import logging as absl_logging
import numpy as np
from PIL import Image
import pytest
from tensorboard.backend.event_processing import event_accumulator

from mmsafe.eval import report
from mmsafe.train import loop
from mmsafe.train import metrics as metrics_lib
from tests.conftest import mfeat_config, rewind

CERTIFY_EVERY = 7


def read_events(logdir):
  """(scalars {tag: [(step, value)]}, images {tag: [(step, height, width)]}) as
  TensorBoard shows them."""
  accumulator = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  accumulator.Reload()
  tags = accumulator.Tags()
  scalars = {t: [(e.step, e.value) for e in accumulator.Scalars(t)] for t in tags["scalars"]}
  images = {t: [(e.step, e.height, e.width) for e in accumulator.Images(t)]
            for t in tags["images"]}
  return scalars, images


def jsonl_numbers(path):
  """{key: [(step, value)]} of metrics.jsonl's numbers, as TensorBoard tags them."""
  numbers = {}
  with open(path) as f:
    for line in map(json.loads, f):
      for key, value in line.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          numbers.setdefault(key, []).append((line["step"], value))
  return numbers


def assert_events_match_jsonl(workdir):
  scalars, images = read_events(workdir)
  expected = jsonl_numbers(os.path.join(workdir, "metrics.jsonl"))
  assert set(scalars) == set(expected)
  for tag, points in expected.items():
    steps = [step for step, _ in scalars[tag]]
    assert steps == sorted(set(steps)), f"{tag}: a step shown twice: {steps}"
    assert steps == [step for step, _ in points], tag
    np.testing.assert_allclose([v for _, v in scalars[tag]], [v for _, v in points],
                               rtol=1e-6, err_msg=tag)
  return scalars, images


def certify_config():
  """One epoch (21 steps) of JT on mfeat, logged and checkpointed every 7 steps,
  with a small certification inside training every 7 steps."""
  config = mfeat_config("jt", num_epochs=1)
  config.checkpoint_every_steps = 7
  config.checkpoint_max_to_keep = 6
  config.log_every_steps = 7
  config.evals = {"cert": {"type": "certify", "split": "validation", "every_steps": CERTIFY_EVERY,
                           "kinds": ("sound",), "max_examples": 32, "attack_steps": 0}}
  return config


@pytest.mark.slow
def test_training_events_match_metrics_jsonl_and_a_resume_shows_each_step_once(tmp_path):
  config = certify_config()
  full = str(tmp_path / "full")
  loop.train_and_evaluate(config, full)
  scalars, images = assert_events_match_jsonl(full)
  assert {"train/loss", "validation/accuracy", "test/accuracy",
          "cert/kinds/sound/summary/mean_radius"} <= set(scalars)
  # The certified-accuracy curve and the eta heat map, at each evaluation.
  for figure in ("certified_accuracy", "eta_ratio_sound", "unimodal_sound"):
    assert [step for step, _, _ in images[f"cert/{figure}"]] == [7, 14, 21], figure
    assert all(h > 100 and w > 100 for _, h, w in images[f"cert/{figure}"])

  # Killed after the checkpoint at step 7, with the events of steps 8-21
  # already written; the resumed run purges them and writes its own.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed)
  rewind(resumed, 7)
  loop.train_and_evaluate(config, resumed)
  assert len(glob.glob(os.path.join(resumed, "events.*.mmsafe-training"))) == 2
  resumed_scalars, resumed_images = assert_events_match_jsonl(resumed)
  assert resumed_scalars.keys() == scalars.keys()
  for tag, points in scalars.items():
    assert [s for s, _ in resumed_scalars[tag]] == [s for s, _ in points], tag
  assert resumed_images == images

  # A finished run run again writes its test metrics again: shown once.
  loop.train_and_evaluate(config, resumed)
  assert read_events(resumed)[0]["test/accuracy"] == resumed_scalars["test/accuracy"]


def _unwritable(reason):
  """tensorboardX's file opener, failing as a disk would: "read-only" at open,
  "full" (/dev/full: every flush fails with ENOSPC) at the first write."""
  def open_file(path):
    del path
    if reason == "read-only":
      raise OSError(errno.EROFS, "Read-only file system")
    return open("/dev/full", "wb")  # pylint: disable=consider-using-with
  return open_file


@pytest.mark.slow
@pytest.mark.parametrize("reason", ["read-only", "full"])
def test_a_writer_that_cannot_write_warns_once_and_training_completes(tmp_path, monkeypatch,
                                                                      reason):
  if reason == "full" and not os.path.exists("/dev/full"):
    pytest.skip("no /dev/full")
  monkeypatch.setattr("tensorboardX.record_writer.open_file", _unwritable(reason))
  warnings = []
  monkeypatch.setattr(absl_logging, "warning", lambda msg, *args: warnings.append(msg % args))
  config = mfeat_config("jt", num_epochs=1)
  config.log_every_steps = 7
  results = loop.train_and_evaluate(config, str(tmp_path))
  assert results["test_accuracy"] > 0.5
  tensorboard = [w for w in warnings if w.startswith("TensorBoard")]
  # One warning per writer (the training stream and the test metrics), each naming why.
  assert len(tensorboard) == 2, warnings
  assert all(("Read-only" if reason == "read-only" else "No space") in w for w in tensorboard)
  steps = [line["step"] for line in map(json.loads, open(tmp_path / "metrics.jsonl"))]
  assert steps == [7, 14, 21, 21, 21], "metrics.jsonl must hold every line"


def test_a_one_shot_writer_replaces_its_earlier_events(tmp_path):
  png = io.BytesIO()
  Image.new("RGB", (8, 6), "white").save(png, format="PNG")
  (tmp_path / "curve.png").write_bytes(png.getvalue())
  metrics = {"headline": {"clean": 0.5, "pgd": 0.25}, "label": "not a number", "flag": True}
  for clean in (0.5, 0.75):  # An evaluation run twice: TensorBoard shows the second.
    metrics["headline"]["clean"] = clean
    report.write_events(str(tmp_path), "robustness", 40, metrics, [str(tmp_path / "curve.png")])
  scalars, images = read_events(tmp_path)
  assert scalars == {"robustness/headline/clean": [(40, 0.75)],
                     "robustness/headline/pgd": [(40, 0.25)]}
  assert images == {"robustness/curve": [(40, 6, 8)]}
  assert len(glob.glob(str(tmp_path / "events.*"))) == 1


def test_event_writer_numbers_only_and_files_per_writer(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path / "metrics.jsonl"), None)
  writer.write(3, stage="s1", epoch=1, **{"train/loss": np.float32(0.5), "flag": True})
  writer.write(9, **{"test/accuracy": 0.9})
  writer.close()
  scalars, _ = read_events(tmp_path)
  assert scalars == {"epoch": [(3, 1.0)], "train/loss": [(3, 0.5)],
                     "test/accuracy": [(9, pytest.approx(0.9))]}
  names = sorted(os.path.basename(p).rsplit(".", 1)[-1] for p in glob.glob(str(tmp_path / "ev*")))
  assert names == ["mmsafe-training", "mmsafe-training-test"]
  # A fresh run (no checkpoint to resume) starts new files, as it starts a new metrics.jsonl.
  metrics_lib.MetricsWriter(str(tmp_path / "metrics.jsonl"), None).close()
  assert not glob.glob(str(tmp_path / "events.*"))
