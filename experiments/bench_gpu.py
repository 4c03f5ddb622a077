r"""Benchmark (not a test): mmsafe's accelerator figures in one prepared run, one table.

On one GPU (or TPU host), in about 8 minutes:

  python -m experiments.bench_gpu --out=/tmp/mmsafe/bench_gpu

The same script on a CPU at tiny shapes, to check that it runs (a test does so):

  python -m experiments.bench_gpu --smoke --out=/tmp/mmsafe/bench_gpu_smoke

Each part runs in its own process (the benchmarks define their own flags) and
reports one JSON line, read back here:

* `train`: the CRMT step-1 train step (`experiments.bench_train`) at
  Kinetics-Sounds shapes (visual [B, 3, 224, 224, 3], audio [B, 1024, 128, 1],
  31 classes, batch 64), free ResNet18 and 1-Lipschitz `lip_resnet`
  encoders, float32 and bfloat16: ms per step, samples/s, MFU where the
  device's peak is known.
* `pgd`: PGD-4 (the reference code's protocol, `paper_reference`: 4 steps,
  step eps / 3) on the free KS model at batch 64 (`experiments.bench_attacks`).
* `certify`: local certified radii of 64 KS examples in one vectorised call
  (`experiments.bench_certify`).
* `main_job`: the README's main job (JT and OJT on mfeat, `quick` protocol),
  wall seconds of a first run with an empty compilation cache.

`--smoke` shrinks every shape (one 32x32 frame, a 64x32 spectrogram, widths 8,
one block per stage, batch 4, 5 classes, one timed step) and runs the main job
with `runlocal` and JT only.
A part that fails is reported in the table with the last line of its error,
the other parts still run, and the exit status is 1. Writes `results.json`
and `results.md` to `--out`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

_OUT = flags.DEFINE_string("out", "/tmp/mmsafe/bench_gpu", "Where results.{json,md} go.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes: check on a CPU that every part runs.")
_PARTS = flags.DEFINE_list("parts", ["train", "pgd", "certify", "main_job"], "Parts to run.")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 240, "Seconds allowed to each measurement.")

_KS_SMOKE = ["--frames=1", "--image_size=32", "--audio_frames=64", "--audio_bins=32",
             "--widths=8,8,8,8", "--stage_sizes=1,1,1,1", "--num_classes=5"]
_MAIN_JOB = ["-m", "experiments.compare", "--protocol=quick"]
_MAIN_CONFIG = "experiments/configs/embedded.py"


def measurements(smoke: bool, out: str) -> list[tuple[str, list[str]]]:
  """`(name, command arguments after the interpreter)` of every measurement."""
  shapes = _KS_SMOKE if smoke else []
  train = ["--batch_size=4", "--steps=1", "--warmup=0"] if smoke else ["--steps=10", "--warmup=2"]
  runs = {"train": [(f"train {encoder} {dtype}",
                     ["-m", "experiments.bench_train", f"--encoder={encoder}", f"--dtype={dtype}",
                      *train, *shapes])
                    for encoder in ("resnet18", "lip_resnet") for dtype in ("float32", "bfloat16")],
          "pgd": [("pgd-4 (paper_reference)",
                   ["-m", "experiments.bench_attacks", "--model=ks", "--loops=auto",
                    "--protocols=paper_reference",
                    *(["--batch_size=4", "--repeats=1"] if smoke else ["--batch_size=64"]),
                    *shapes])],
          "certify": [("certify (local, resnet18)",
                       ["-m", "experiments.bench_certify", "--naive_samples=0",
                        *(["--batch=4", "--repeats=1"] if smoke else ["--batch=64"]), *shapes])],
          "main_job": [("main job (first run)",
                        [*_MAIN_JOB, f"--config={_MAIN_CONFIG}{':runlocal' if smoke else ''}",
                         f"--methods={'jt' if smoke else 'jt,ojt'}",
                         f"--workdir={os.path.join(out, 'main_job')}"])]}
  unknown = sorted(set(_PARTS.value) - set(runs))
  if unknown:
    raise app.UsageError(f"--parts: expected names from {sorted(runs)}, got {unknown}")
  return [run for part in _PARTS.value for run in runs[part]]


def run_one(name: str, args: list[str], out: str, timeout_s: int) -> dict:
  """Runs one measurement in a fresh process: its last JSON line, plus `wall_s`,
  or `error` with the last line the process wrote."""
  # A first run: no compiled program cached.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(out, "jax_cache", name))
  shutil.rmtree(env["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
  start = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout_s, check=False)
  except subprocess.TimeoutExpired:
    return {"name": name, "error": f"timed out after {timeout_s} s"}
  wall_s = round(time.perf_counter() - start, 1)
  if proc.returncode != 0:
    lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
    return {"name": name, "wall_s": wall_s, "error": lines[-1][-200:]}
  records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  return {"name": name, "wall_s": wall_s, **(records[-1] if records else {})}


def throughput(result: dict) -> str:
  """The row's figure: samples/s where the benchmark gives it, else wall seconds."""
  if "error" in result:
    return "failed: " + result["error"]
  if "samples_per_s" in result:
    extra = f", MFU {result['mfu']:.1%}" if result.get("mfu") else ""
    step = f"{result['step_ms']:.1f} ms/step, " if "step_ms" in result else ""
    return f"{step}{result['samples_per_s']:.1f} samples/s{extra}"
  return f"{result['wall_s']:.1f} s wall"


def table(results: list[dict], device: str) -> str:
  lines = [f"device: {device}", "", "| measurement | result | process wall s |",
           "| --- | --- | --- |"]
  lines += [f"| {r['name']} | {throughput(r)} | {r.get('wall_s', '-')} |" for r in results]
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUT.value
  shutil.rmtree(os.path.join(out, "main_job"), ignore_errors=True)  # the main job's first run
  os.makedirs(out, exist_ok=True)
  results = [run_one(name, args, out, _TIMEOUT.value)
             for name, args in measurements(_SMOKE.value, out)]
  device = next((r["device"] for r in results if "device" in r), "unknown")
  text = table(results, device)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"smoke": _SMOKE.value, "results": results}, f, indent=1)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text + "\n")
  print(text)
  if any("error" in r for r in results):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
