"""The clip input pipeline on in-memory records (no ffmpeg, no TFDS): per-host shards,
augmentation determinism, deterministic evaluation, normalisation, batching."""

from absl import flags
import numpy as np
import pytest

from mmsafe import data as data_lib
from mmsafe.data import clips, plans, types
from mmsafe.data.tfds import media

STORED = 12  # stored frame size


def _frame(value: int, channels: int = 3) -> bytes:
  """A JPEG whose pixels encode `value` (brightness) with a left-right gradient."""
  ramp = np.linspace(0, 60, STORED)[None, :]
  image = np.clip(value + ramp + np.zeros((STORED, 1)), 0, 255).astype(np.uint8)
  return media.encode_jpeg(image if channels == 1 else np.repeat(image[..., None], 3, -1), 95)


def _records(n=10, frames=7, with_flow=True, audio_shape=(20, 8)):
  out = []
  for i in range(n):
    record = {"visual": np.array([_frame(10 * t) for t in range(frames)], dtype=object),
              "aspect": np.float32(16 / 9), "label": i % 3,
              "audio": np.full(audio_shape, -float(i), np.float16)}
    if with_flow:
      record["flow"] = np.array([[_frame(100 + t, 1), _frame(50, 1)] for t in range(frames)],
                                dtype=object)
    out.append(record)
  return out


CONFIG = clips.ClipPreprocessing(image_size=8)


@pytest.mark.parametrize("n,hosts", [(10, 2), (11, 3), (2, 4), (0, 2)])
def test_shard_indices_disjoint_and_covering(n, hosts):
  shards = [plans.shard_indices(n, h, hosts) for h in range(hosts)]
  joined = np.concatenate(shards)
  np.testing.assert_array_equal(np.sort(joined), np.arange(n))
  assert max(map(len, shards)) - min(map(len, shards)) <= 1
  with pytest.raises(ValueError, match="process_index"):
    plans.shard_indices(n, hosts, hosts)


def test_train_indices_disjoint_per_epoch_and_independent_of_host_count():
  n, batch, hosts = 23, 3, 2
  steps = n // (batch * hosts)  # 3 steps per epoch, 5 examples dropped
  for epoch in range(2):
    seen = [plans.host_train_indices(n, batch_size=batch, seed=7, step=epoch * steps + s,
                                     process_index=h, process_count=hosts)
            for s in range(steps) for h in range(hosts)]
    joined = np.concatenate(seen)
    assert len(set(joined.tolist())) == len(joined) == steps * batch * hosts
    # The global batch equals a single host's batch of batch * hosts examples.
    single = [plans.host_train_indices(n, batch_size=batch * hosts, seed=7,
                                       step=epoch * steps + s) for s in range(steps)]
    np.testing.assert_array_equal(joined, np.concatenate(single))
  # With one host, exactly the in-memory `train_batch` order.
  labels = np.arange(n)
  for step in range(5):
    expected = plans.train_batch({"x": labels[:, None]}, labels, batch_size=4, seed=3,
                                 step=step)["label"]
    np.testing.assert_array_equal(
        plans.host_train_indices(n, batch_size=4, seed=3, step=step), expected)


def test_eval_batches_pad_to_same_count_on_every_host():
  n, hosts, batch = 7, 2, 3
  host_plans = [plans.clip_eval_batches(n, batch_size=batch, process_index=h,
                                        process_count=hosts) for h in range(hosts)]
  assert len(host_plans[0]) == len(host_plans[1]) == 2
  real = np.concatenate([idx[valid] for plan in host_plans for idx, valid in plan])
  np.testing.assert_array_equal(np.sort(real), np.arange(n))


def test_frame_selection_one_per_third():
  assert clips.frame_segments(10, 3) == [(0, 3), (3, 6), (6, 10)]
  np.testing.assert_array_equal(clips.select_frames(10, 3), [1, 4, 7])
  np.testing.assert_array_equal(clips.select_frames(3, 3), [0, 1, 2])
  rng = np.random.default_rng(0)
  draws = np.stack([clips.select_frames(10, 3, rng) for _ in range(200)])
  for k, (a, b) in enumerate([(0, 3), (3, 6), (6, 10)]):
    assert set(draws[:, k].tolist()) == set(range(a, b))


def test_random_resized_crop_in_display_geometry():
  rng = np.random.default_rng(0)
  for aspect in (16 / 9, 1.0, 0.5, 5.0):
    for _ in range(50):
      x0, y0, x1, y1 = clips.random_resized_crop(rng, aspect)
      assert 0 <= x0 < x1 <= 1 + 1e-9 and 0 <= y0 < y1 <= 1 + 1e-9
      area = (x1 - x0) * (y1 - y0)  # fraction of the frame's area
      ratio = (x1 - x0) * aspect / (y1 - y0)  # in display pixels
      if aspect in (16 / 9, 1.0):  # no fallback needed
        assert 0.08 - 1e-9 <= area <= 1 + 1e-9
        assert 3 / 4 - 1e-9 <= ratio <= 4 / 3 + 1e-9


def test_train_augmentation_is_a_function_of_the_seed():
  records = _records()
  a = clips.preprocess_clip(records[0], train=True, rng=np.random.default_rng(1), config=CONFIG)
  b = clips.preprocess_clip(records[0], train=True, rng=np.random.default_rng(1), config=CONFIG)
  c = clips.preprocess_clip(records[0], train=True, rng=np.random.default_rng(2), config=CONFIG)
  for m in ("visual", "flow", "audio"):
    np.testing.assert_array_equal(a["inputs"][m], b["inputs"][m])
  assert not np.array_equal(a["inputs"]["visual"], c["inputs"]["visual"])
  assert a["inputs"]["visual"].shape == (3, 8, 8, 3) and a["inputs"]["visual"].dtype == np.float32
  assert a["inputs"]["flow"].shape == (3, 8, 8, 2)
  assert a["inputs"]["audio"].shape == (20, 8, 1)
  with pytest.raises(ValueError, match="rng"):
    clips.preprocess_clip(records[0], train=True, config=CONFIG)


def test_eval_preprocessing_deterministic_middle_frames_whole_frame():
  record = _records()[0]
  raw = clips.ClipPreprocessing(image_size=STORED, normalize=False)
  a = clips.preprocess_clip(record, train=False, config=raw)
  b = clips.preprocess_clip(record, train=False, config=raw)
  np.testing.assert_array_equal(a["inputs"]["visual"], b["inputs"]["visual"])
  for k, stored in enumerate(clips.select_frames(7, 3)):  # middle of each third: 1, 3, 5
    np.testing.assert_array_equal(a["inputs"]["visual"][k],
                                  media.decode_jpeg(record["visual"][stored]))
  assert a["inputs"]["visual"].dtype == np.uint8
  np.testing.assert_array_equal(a["inputs"]["audio"], record["audio"][..., None])


def test_flip_mirrors_frames_and_negates_u():
  record = dict(_records()[0])  # every stored frame alike, so only crops/flips matter
  record["visual"] = np.array([_frame(40)] * 7, dtype=object)
  record["flow"] = np.array([[_frame(100, 1), _frame(50, 1)]] * 7, dtype=object)
  raw = clips.ClipPreprocessing(image_size=STORED, normalize=False, crop_scale=(1.0, 1.0),
                                crop_ratio=(16 / 9, 16 / 9))  # the crop is the whole frame
  plain_visual = media.decode_jpeg(record["visual"][0]).astype(int)
  plain_u = media.decode_jpeg(record["flow"][0][0]).astype(int)
  plain_v = media.decode_jpeg(record["flow"][0][1]).astype(int)
  kinds = set()
  for seed in range(6):
    out = clips.preprocess_clip(record, train=True, rng=np.random.default_rng(seed), config=raw)
    for k in range(3):
      visual = out["inputs"]["visual"][k].astype(int)
      u, v = (out["inputs"]["flow"][k, ..., c].astype(int) for c in range(2))
      if np.abs(visual - plain_visual).max() <= 2:
        kinds.add("plain")
        assert np.abs(u - plain_u).max() <= 2 and np.abs(v - plain_v).max() <= 2
      else:
        kinds.add("flipped")
        np.testing.assert_allclose(visual, plain_visual[:, ::-1], atol=2)
        np.testing.assert_allclose(u, 255 - plain_u[:, ::-1], atol=2)  # mirrored and negated
        np.testing.assert_allclose(v, plain_v[:, ::-1], atol=2)
  assert kinds == {"plain", "flipped"}


def test_normalize_inputs_matches_in_pipeline_normalisation():
  record = _records()[0]
  raw = clips.preprocess_clip(record, train=False,
                              config=clips.ClipPreprocessing(image_size=8, normalize=False))
  normed = clips.preprocess_clip(record, train=False, config=CONFIG)
  again = clips.normalize_inputs(raw["inputs"])
  for m in ("visual", "flow", "audio"):
    np.testing.assert_allclose(again[m], normed["inputs"][m], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(normed["inputs"]["audio"], (0.0 + 4.503877) / (2 * 5.141276))
  import jax.numpy as jnp  # the same function normalises on device
  on_device = clips.normalize_inputs({m: jnp.asarray(x) for m, x in raw["inputs"].items()})
  for m in ("visual", "flow", "audio"):
    np.testing.assert_allclose(np.asarray(on_device[m]), normed["inputs"][m], rtol=1e-6, atol=1e-6)
  v = raw["inputs"]["visual"][0, 0, 0]
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(normed["inputs"]["visual"][0, 0, 0], (v / 255 - mean) / std,
                             rtol=1e-5)


def test_train_iterator_resumes_and_threads_do_not_change_batches():
  records = _records(n=10)
  kwargs = dict(batch_size=2, seed=5, config=CONFIG, prefetch=2)
  with data_lib.train_iterator(records, num_steps=6, num_threads=1, **kwargs) as it:
    serial = list(it)
  with data_lib.train_iterator(records, num_steps=3, start_step=3, num_threads=3,
                               **kwargs) as it:
    resumed = list(it)
  assert len(serial) == 6 and len(resumed) == 3
  for a, b in zip(serial[3:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    for m in a["inputs"]:
      np.testing.assert_array_equal(a["inputs"][m], b["inputs"][m])
  types.validate_batch(serial[0], {"visual": (3, 8, 8, 3), "flow": (3, 8, 8, 2),
                                   "audio": (20, 8, 1)}, num_classes=3)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_as_threads():
  records = _records(n=6)
  kwargs = dict(batch_size=3, seed=1, num_steps=2, config=CONFIG)
  with data_lib.train_iterator(records, num_threads=2, **kwargs) as it:
    threads = list(it)
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (pytest is no absl program)
    flags.FLAGS.mark_as_parsed()
  with data_lib.train_iterator(records, processes=2, **kwargs) as it:
    processes = list(it)
  assert len(threads) == len(processes) == 2
  for a, b in zip(threads, processes):
    for m in a["inputs"]:
      np.testing.assert_array_equal(a["inputs"][m], b["inputs"][m])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_two_hosts_eval_iterators_cover_the_split_once():
  records = _records(n=5, with_flow=False)
  config = clips.ClipPreprocessing(image_size=8, modalities=("audio",))
  seen = []
  for host in range(2):
    batches = list(data_lib.eval_pass(records, normalized=False, batch_size=2,
                                      process_index=host, process_count=2, config=config))
    assert len(batches) == 2 and set(batches[0]["inputs"]) == {"audio"}
    for b in batches:
      # audio of record i is -i everywhere
      ids = -np.asarray(b["inputs"]["audio"][:, 0, 0, 0] * 2 * 5.141276 - 4.503877).round()
      seen += ids[b["valid"]].astype(int).tolist()
  assert sorted(seen) == list(range(5))


def test_iterator_errors_surface_and_close_stops():
  records = _records(n=4, with_flow=False)
  records[2] = dict(records[2], visual=np.array([b"broken"] * 7, dtype=object))
  it = data_lib.eval_pass(records, normalized=False, batch_size=2, config=CONFIG)
  next(it)
  with pytest.raises(OSError):  # Pillow: cannot identify image file
    next(it)
  it = data_lib.train_iterator(_records(n=4), batch_size=2, seed=0, config=CONFIG)
  next(it)
  it.close()
  with pytest.raises(StopIteration):
    next(it)
  with pytest.raises(ValueError, match="modalities"):
    clips.clip_output_spec(records, clips.ClipPreprocessing(modalities=("flow",)))


def test_iterators_on_in_memory_and_record_sources():
  records = _records(n=6, with_flow=False)
  batches = list(data_lib.train_iterator(records, batch_size=3, num_steps=2,
                                         process_index=0, process_count=1, config=CONFIG))
  assert len(batches) == 2 and batches[0]["inputs"]["visual"].shape == (3, 3, 8, 8, 3)
  evals = list(data_lib.eval_pass(records, normalized=False, batch_size=4, process_index=1,
                                  process_count=2, config=CONFIG))
  assert [b["valid"].sum() for b in evals] == [3]
  with pytest.raises(ValueError, match="dataset"):
    data_lib.load("no_such_dataset", "train")


def test_dropped_iterator_stops_its_threads():
  import gc
  import threading
  import time

  def drop_one_iterator():
    it = data_lib.train_iterator(_records(n=4), batch_size=2, seed=0, config=CONFIG,
                                 num_threads=2)
    next(it)
    del it
    gc.collect()

  # Process-wide pools that the first use creates lazily (and keeps) exist from
  # here on, whichever test ran before: only the iterator's own threads count.
  drop_one_iterator()
  before = threading.active_count()
  drop_one_iterator()
  deadline = time.monotonic() + 10.0  # stopping threads may take a moment to exit
  while threading.active_count() > before and time.monotonic() < deadline:
    time.sleep(0.05)
  assert threading.active_count() <= before, [t.name for t in threading.enumerate()]


def test_iterators_on_embedded_arrays_match_train_batch_and_eval_batches():
  rng = np.random.default_rng(0)
  inputs = {"x": rng.standard_normal((11, 4)).astype(np.float32)}
  labels = np.arange(11, dtype=np.int32) % 3
  dataset = data_lib.Dataset(name="toy", split="train", inputs=inputs, labels=labels,
                             num_classes=3, stats={})
  train = list(data_lib.train_iterator(dataset, batch_size=4, seed=2, start_step=1,
                                       num_steps=3, process_index=0, process_count=1))
  assert len(train) == 3
  for step, batch in enumerate(train, start=1):
    expected = plans.train_batch(inputs, labels, batch_size=4, seed=2, step=step)
    np.testing.assert_array_equal(batch["inputs"]["x"], expected["inputs"]["x"])
  evals = list(data_lib.eval_pass(dataset, normalized=False, batch_size=4, process_index=0,
                                  process_count=1))
  for got, expected in zip(evals, plans.eval_batches(inputs, labels, batch_size=4)):
    np.testing.assert_array_equal(got["inputs"]["x"], expected["inputs"]["x"])
    np.testing.assert_array_equal(got["valid"], expected["valid"])
  assert len(evals) == 3
