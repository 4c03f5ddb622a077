r"""Benchmarks the clip input pipeline (a benchmark, not a test).

Makes fake clips with ffmpeg's test sources (testsrc2 with grain, so frames are as
hard to JPEG-code as natural video; a noisy tone as audio), builds them with the
real TFDS builders at the papers' defaults (224x224 JPEG frames, 1024x128 fbank)
and measures:

* build: clips/s of `download_and_prepare` (ffmpeg decode, fbank, JPEG; UCF101 adds
  TV-L1 flow, also timed per frame pair);
* read: stored examples/s of `tfds.data_source` random access (deserialisation only);
* train / eval: examples/s of `train_iterator(...)` / `eval_pass(...)` (decode,
  crop, resize, flip, normalise, batch) for each thread / process count, with
  normalisation on the host (float32 batches) or left to the device
  (`normalize=False`, uint8 frames), and the CPU they use: `*_per_core` is examples
  per CPU-second of this process and its worker processes (robust to other load on
  the machine, unlike examples/s of wall time).

  python -m experiments.bench_pipeline --threads=1,2 --steps=20
  python -m experiments.bench_pipeline --datasets=kinetics_sounds --num_clips=32

Another version of the loader (`mmsafe` of another commit, e.g. the loader before
grain, `git archive <commit> mmsafe | tar -x -C <dir>`) is measured by the same code
with `--baseline=<dir>`: the iterator measurements of both run in fresh processes,
alternating for `--rounds` rounds (both see the same load), and the results hold
the medians, `baseline_*` entries and `*_speedup` ratios.

The source is small and cached in memory, so the numbers are CPU costs (no disk I/O).
`cpu_ms_*` are CPU milliseconds per example on one thread (read = deserialisation
only; train/eval = preprocessing of a read example), robust to other load on the
machine: 1000 / (cpu_ms_read + cpu_ms_train_f32) is what one core sustains.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import psutil
import tensorflow_datasets as tfds

import mmsafe
from mmsafe import data as data_lib
from mmsafe.data import tfds as mtfds
from mmsafe.data.tfds import media

_DATASETS = flags.DEFINE_list("datasets", ["kinetics_sounds", "ucf101_rgb_flow"],
                              "Builders to benchmark.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to put the fake data (default: a temp dir).")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 16, "Fake Kinetics-Sounds clips (train split).")
_UCF_CLIPS = flags.DEFINE_integer("ucf_clips", 3, "Fake UCF101 clips (TV-L1 on a CPU is slow).")
_SECONDS = flags.DEFINE_integer("seconds", 10, "Clip length (UCF101 clips: 7 s).")
_SOURCE_SIZE = flags.DEFINE_string("source_size", "480x360", "Fake video size (WxH).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed batches per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Batches read before the timing starts.")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "Thread counts to measure.")
_PROCESSES = flags.DEFINE_list("processes", ["2"], "Worker process counts to measure.")
_BUILD_WORKERS = flags.DEFINE_integer("build_workers", None, "Builder workers (default: CPUs).")
_REBUILD = flags.DEFINE_bool("rebuild", True, "Build the data afresh (timed) even if the "
                             "workdir holds it; --norebuild reuses it (no build numbers).")
_BASELINE = flags.DEFINE_string("baseline", None, "A directory holding another `mmsafe` "
                                "whose loader is measured too (see the module docstring).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "With --baseline: alternating rounds of both "
                               "loaders' measurements (medians reported).")
_ITERATORS_ONLY = flags.DEFINE_string("iterators_only", None, "Internal: measure only the "
                                      "iterators on the data under this TFDS data_dir.")


def make_fake_clips(root: str, num: int, seconds: int, size: str, fps: int, audio: bool) -> None:
  """`num` clips `clip{i}.mp4` (or .avi without audio) of detailed, grainy test video."""
  os.makedirs(root, exist_ok=True)
  for i in range(num):
    args = ["ffmpeg", "-v", "error", "-nostdin", "-y", "-f", "lavfi", "-i",
            f"testsrc2=size={size}:rate={fps}:duration={seconds},noise=alls=12:allf=t"]
    if audio:
      args += ["-f", "lavfi", "-i",
               f"sine=frequency={200 + 50 * i}:sample_rate=44100:duration={seconds}",
               "-c:a", "aac", "-shortest"]
    name = f"clip{i}.mp4" if audio else f"clip{i}.avi"
    args += ["-c:v", "mpeg4", "-q:v", "4", os.path.join(root, name)]
    subprocess.run(args, check=True)


def write_lists(manual: str, dataset: str, num: int) -> None:
  """Lists for 3 classes: all clips in train, the first 8 also in test."""
  if dataset == "ucf101_rgb_flow":
    classes = ["ApplyEyeMakeup", "Biking", "Drumming"]
    lists = os.path.join(manual, "ucfTrainTestlist")
    os.makedirs(lists, exist_ok=True)
    with open(os.path.join(lists, "classInd.txt"), "w") as f:
      f.writelines(f"{i + 1} {c}\n" for i, c in enumerate(classes))
    for i in range(num):
      c = classes[i % 3]
      os.makedirs(os.path.join(manual, "UCF-101", c), exist_ok=True)
      os.replace(os.path.join(manual, f"clip{i}.avi"),
                 os.path.join(manual, "UCF-101", c, f"v_{c}_g{i:02d}_c01.avi"))
    with open(os.path.join(lists, "trainlist01.txt"), "w") as f:
      f.writelines(f"{classes[i % 3]}/v_{classes[i % 3]}_g{i:02d}_c01.avi {i % 3 + 1}\n"
                   for i in range(num))
    with open(os.path.join(lists, "testlist01.txt"), "w") as f:
      f.writelines(f"{classes[i % 3]}/v_{classes[i % 3]}_g{i:02d}_c01.avi\n"
                   for i in range(min(num, 8)))
    return
  classes = ["a", "b", "c"]
  with open(os.path.join(manual, "classes.txt"), "w") as f:
    f.write("\n".join(classes) + "\n")
  for split, count in (("train", num), ("test", min(num, 8))):
    with open(os.path.join(manual, f"{split}.txt"), "w") as f:
      f.writelines(f"clip{i}.mp4 {classes[i % 3]}\n" for i in range(count))


def build(dataset: str, manual: str, data_dir: str):
  """Builds `dataset` (paper defaults, 3 classes); returns (builder, seconds)."""
  if dataset == "ucf101_rgb_flow":
    config = mtfds.Ucf101Config(name="bench", num_classes=3, flow="compute")
  else:
    config = mtfds.AudioVisualConfig(name="bench", num_classes=3)
  builder = mtfds.BUILDERS[dataset](data_dir=data_dir, config=config,
                                    num_workers=_BUILD_WORKERS.value)
  start = time.perf_counter()
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  return builder, time.perf_counter() - start


def _cpu_seconds() -> float:
  """CPU seconds (user + system) of this process and its live worker processes."""
  processes = [psutil.Process()] + psutil.Process().children(recursive=True)
  total = 0.0
  for process in processes:
    try:
      times = process.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += times.user + times.system
  return total


def rate(iterator, batch_size: int, steps: int) -> tuple[float, float]:
  """(examples/s, examples per CPU-second) over `steps` batches after `_WARMUP` batches
  (so that the workers and the prefetch buffer are in their steady state)."""
  with iterator:
    for _ in range(_WARMUP.value):
      next(iterator)
    start, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
      next(iterator)
    wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return steps * batch_size / wall, steps * batch_size / max(cpu, 1e-9)


def bench_dataset(dataset: str, workdir: str) -> dict:
  """Every measurement of `dataset` (see the module docstring), as one flat dict."""
  ucf = dataset == "ucf101_rgb_flow"
  manual = os.path.join(workdir, dataset, "manual")
  result = _fake_manual_dir(dataset, manual, ucf)
  data_dir = os.path.join(workdir, dataset, "tfds")
  if _REBUILD.value or not os.path.isdir(data_dir):
    source, measured = _bench_build(dataset, manual, data_dir, ucf)
    result.update(measured)
    if ucf:
      result["tvl1_s_per_pair_320x240"] = _bench_tvl1(manual)
  else:
    source = _train_source(dataset, data_dir)
  result.update(_bench_read(source))
  result.update(_bench_preprocessing(source))
  if _BASELINE.value:
    result.update(_compare_iterators(dataset, data_dir))
  else:
    result.update(_bench_iterators(source))
  return result


def _fake_manual_dir(dataset: str, manual: str, ucf: bool) -> dict:
  """Writes fake clips and split lists into `manual` unless there; returns their description."""
  seconds = 7 if ucf else _SECONDS.value
  num = _UCF_CLIPS.value if ucf else _NUM_CLIPS.value
  size = "320x240" if ucf else _SOURCE_SIZE.value
  if not os.path.isdir(manual):
    make_fake_clips(manual, num, seconds, size, 25, audio=not ucf)
    write_lists(manual, dataset, num)
  return {"dataset": dataset, "clips": num, "clip_seconds": seconds, "source": size}


def _bench_build(dataset: str, manual: str, data_dir: str, ucf: bool) -> tuple[object, dict]:
  """A fresh build of `dataset`: (its train data source, build rate and stored size)."""
  shutil.rmtree(data_dir, ignore_errors=True)  # always time a fresh build
  builder, seconds_taken = build(dataset, manual, data_dir)
  written = sum(s.num_examples for s in builder.info.splits.values())
  source = builder.as_data_source()["train"]
  record = source[0]
  stored = sum(len(b) for b in np.ravel(record["visual"])) / 1024 + (
      sum(len(b) for b in np.ravel(record["flow"])) / 1024 if ucf else
      np.asarray(record["audio"]).nbytes / 1024)
  return source, {"build_clips_per_s": written / seconds_taken,
                  "build_workers": _BUILD_WORKERS.value or os.cpu_count(),
                  "stored_kb_per_example": round(stored, 1)}


def _bench_tvl1(manual: str) -> float:
  """Seconds per TV-L1 flow of one 320x240 frame pair of the fake UCF101 clip."""
  frames = media.extract_frame_numbers(
      os.path.join(manual, "UCF-101", "ApplyEyeMakeup", "v_ApplyEyeMakeup_g00_c01.avi"),
      [0, 1], width=320, height=240)
  start = time.perf_counter()
  for _ in range(3):
    media.tvl1_flow(media.to_gray(frames[0]), media.to_gray(frames[1]))
  return (time.perf_counter() - start) / 3


def _bench_read(source) -> dict:
  """Random-access reads: examples/s, and CPU milliseconds per example."""
  start = time.perf_counter()
  for i in range(200):
    source[i % len(source)]
  result = {"read_examples_per_s": 200 / (time.perf_counter() - start)}
  start = time.process_time()
  for i in range(100):
    source[i % len(source)]
  result["cpu_ms_read"] = (time.process_time() - start) * 10
  return result


def _bench_preprocessing(source) -> dict:
  """CPU milliseconds per example of `preprocess_clip` (one thread, no batching: robust to
  other load on the machine; 1000 / cpu_ms is the examples/s one core sustains)."""
  records = [source[i] for i in range(len(source))]
  result = {}
  for train in (True, False):
    for normalize in (True, False):
      config = data_lib.ClipPreprocessing(normalize=normalize)
      start = time.process_time()
      for i in range(60):
        data_lib.preprocess_clip(records[i % len(records)], train=train,
                                 rng=np.random.default_rng(i) if train else None, config=config)
      tag = f"{'train' if train else 'eval'}_{'f32' if normalize else 'uint8'}"
      result[f"cpu_ms_{tag}"] = (time.process_time() - start) / 60 * 1000
  return result


def _bench_iterators(source) -> dict:
  """Examples/s of the training and evaluation iterators for each worker setting."""
  b, steps = _BATCH_SIZE.value, _STEPS.value
  # A count of 0 (or an empty list entry) measures nothing for that kind.
  workers = ([("threads", int(t)) for t in _THREADS.value if t and int(t) > 0]
             + [("processes", int(p)) for p in _PROCESSES.value if p and int(p) > 0])
  result = {}
  for kind, count in workers:
    for normalize in (True, False):
      config = data_lib.ClipPreprocessing(normalize=normalize)
      tag = f"{kind}{count}_{'f32' if normalize else 'uint8'}"
      options = ({"num_threads": count} if kind == "threads"
                 else {"processes": count, "num_threads": 1})
      # Built one at a time: a loader's workers start with it.
      for split, make in (
          ("train", lambda: data_lib.train_iterator(
              _Repeat(source, max(len(source), 4 * b)), batch_size=b, seed=0,
              config=config, prefetch=4, process_index=0, process_count=1, **options)),
          ("eval", lambda: data_lib.eval_pass(
              _Repeat(source, (steps + _WARMUP.value) * b), normalized=False, batch_size=b,
              config=config, prefetch=4, process_index=0, process_count=1, **options))):
        result[f"{split}_{tag}"], result[f"{split}_{tag}_per_core"] = rate(make(), b, steps)
  return result


def _iterators_in_subprocess(mmsafe_root: str, dataset: str, data_dir: str) -> dict:
  """`_bench_iterators` of the `mmsafe` package under `mmsafe_root`, in a fresh process."""
  env = {**os.environ, "PYTHONPATH": os.path.abspath(mmsafe_root)}
  args = [sys.executable, os.path.abspath(__file__), f"--iterators_only={data_dir}",
          f"--datasets={dataset}", f"--batch_size={_BATCH_SIZE.value}",
          f"--steps={_STEPS.value}", f"--warmup={_WARMUP.value}",
          f"--threads={','.join(_THREADS.value)}",
          f"--processes={','.join(_PROCESSES.value)}"]
  out = subprocess.run(args, env=env, check=True, capture_output=True, text=True).stdout
  return json.loads(out[out.index("{"):])


def _compare_iterators(dataset: str, data_dir: str) -> dict:
  """This `mmsafe`'s iterators against `--baseline`'s: `--rounds` alternating rounds
  (so that both see the same load on a shared machine), the median of each figure,
  as `<figure>`, `baseline_<figure>` and `<figure>_speedup`."""
  this_root = os.path.dirname(os.path.dirname(os.path.abspath(mmsafe.__file__)))
  rounds = {"new": [], "old": []}
  for _ in range(_ROUNDS.value):
    rounds["new"].append(_iterators_in_subprocess(this_root, dataset, data_dir))
    rounds["old"].append(_iterators_in_subprocess(_BASELINE.value, dataset, data_dir))
  median = {kind: {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            for kind, runs in rounds.items()}
  result = dict(median["new"])
  result.update({f"baseline_{k}": v for k, v in median["old"].items()})
  result.update({f"{k}_speedup": median["new"][k] / v for k, v in median["old"].items()})
  return result


def _train_source(dataset: str, data_dir: str):
  """The train split of the built `dataset` under `data_dir`."""
  config = (mtfds.Ucf101Config(name="bench", num_classes=3, flow="compute")
            if dataset == "ucf101_rgb_flow" else
            mtfds.AudioVisualConfig(name="bench", num_classes=3))
  return mtfds.BUILDERS[dataset](data_dir=data_dir, config=config).as_data_source()["train"]


class _Repeat:
  """A source of `length` examples cycling over `source` (a few clips make many batches)."""

  def __init__(self, source, length):
    self._source, self._length = source, length

  def __len__(self):
    return self._length

  def __getitem__(self, i):
    return self._source[i % len(self._source)]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  tfds.disable_progress_bar()
  if _ITERATORS_ONLY.value:
    print(json.dumps(_bench_iterators(_train_source(_DATASETS.value[0], _ITERATORS_ONLY.value))))
    return
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="mmsafe_bench_")
  try:
    results = [bench_dataset(d, workdir) for d in _DATASETS.value]
  finally:
    if _WORKDIR.value is None:
      shutil.rmtree(workdir, ignore_errors=True)
  cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
              if line.startswith("model name")), platform.processor()) if os.path.exists(
                  "/proc/cpuinfo") else platform.processor()
  print(json.dumps({"host": {"cpu": cpu, "cores": os.cpu_count(),
                             "python": platform.python_version(),
                             "load_average": os.getloadavg()},
                    "baseline": _BASELINE.value,
                    "batch_size": _BATCH_SIZE.value,
                    "results": [{k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in r.items()} for r in results]},
                   indent=2))


if __name__ == "__main__":
  app.run(main)
