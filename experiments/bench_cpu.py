r"""Benchmark (not a test): where mmsafe's time goes on a CPU, side by side.

  python -m experiments.bench_cpu --workdir=/tmp/mmsafe/bench_cpu

Prints one JSON line per measurement:

* `pgd`: mmsafe's l2-PGD (the evaluation engine) against foolbox's `L2PGD`
  with a jitted forward (same model, eps, steps, step size and batch; both
  start at the clean input), examples/s after compilation and success rates.
  foolbox (and eagerpy) are a benchmark-only extra: `pip install foolbox`.
* `certify`: vectorised certification against a per-example loop at
  B = 16 / 64 / 256 (`experiments.bench_certify`, run in a subprocess; its lines
  are printed as they are).
* `train_loop`: `train_and_evaluate` (validation every epoch, checkpoints,
  metrics) against a minimal flax + optax loop over the same jitted step and
  batches, seconds per step after compilation.
* `main_job`: the README's main job in a subprocess: wall seconds, and the
  number of XLA compilations and their seconds (`jax_log_compiles`).
* `skip_certified`: the paper's robustness suite under the `default` protocol
  with and without skipping the examples that sound certificates decide
  (`skip_certified`), seconds (median of interleaved runs after a warm-up),
  the examples certified per attack, and whether every number agrees; on the
  main job's JT and on a JT with 1-Lipschitz encoders (`<workdir>/lipschitz`,
  trained when absent).

The models are the mfeat JT run the main job trains (`<workdir>/main/jt`).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.configs import embedded
from experiments.configs import evals as evals_config
from mmsafe import attacks
from mmsafe import data as data_lib
from mmsafe.eval import base
from mmsafe.eval import registry
from mmsafe.train import loop, restore
from mmsafe.train import experiment as experiment_lib
from mmsafe.train.step import make_train_step

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mmsafe/bench_cpu", "Scratch directory.")
_PARTS = flags.DEFINE_list("parts", ["main_job", "pgd", "certify", "train_loop",
                                     "skip_certified"], "Measurements to run.")
_EPS = flags.DEFINE_list("eps", ["0.5", "2.0"], "PGD budgets (joint l2, normalised space).")
_STEPS = flags.DEFINE_integer("steps", 10, "PGD steps.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "PGD batch.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per measurement (median).")
_EPOCHS = flags.DEFINE_integer("epochs", 30, "Epochs of the training-loop comparison.")

CERTIFY_ARGS = ["--batch_sizes=16,64,256", "--frames=1", "--image_size=32", "--audio_frames=64",
                "--audio_bins=32", "--widths=8,16,32,64", "--naive_samples=0"]
MAIN_JOB = ["-m", "experiments.compare", "--config=experiments/configs/embedded.py",
            "--methods=jt,ojt", "--protocol=quick"]


def _print(**record) -> None:
  print(json.dumps({"device": str(jax.devices()[0]), "jax": jax.__version__, **record}),
        flush=True)


def _median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main_job(workdir: str) -> None:
  """The README's main job in a fresh process, with its compilations logged: once
  with an empty persistent compilation cache (a first run) and once reading it
  (a rerun: the cache `experiments/cli.py` turns on)."""
  cache = os.path.join(workdir, "jax_cache")
  for cache_state in ("cold", "warm"):
    shutil.rmtree(os.path.join(workdir, "runs"), ignore_errors=True)
    env = dict(os.environ, JAX_LOG_COMPILES="1", JAX_COMPILATION_CACHE_DIR=cache)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *MAIN_JOB, f"--workdir={workdir}/runs"], env=env,
                          capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    compiles = re.findall(r"Finished XLA compilation of (\S+) in ([0-9.e-]+) s", proc.stderr)
    _print(what="main_job", cache=cache_state, wall_s=round(wall, 1),
           compilations=len(compiles), compile_s=round(sum(float(s) for _, s in compiles), 1))


def _flat_model(model, variables, shapes):
  """The model as `logits_fn(x [B, D])` on the modalities' flattened concatenation
  (foolbox attacks one tensor); the joint l2 ball is the same."""
  names = sorted(shapes)
  sizes = [int(np.prod(shapes[m])) for m in names]

  def split(flat):
    parts = jnp.split(flat, np.cumsum(sizes)[:-1], axis=1)
    return {m: p.reshape((-1, *shapes[m])) for m, p in zip(names, parts)}

  return jax.jit(lambda flat: model.apply(variables, split(flat)).logits), names


def pgd(run_dir: str) -> None:
  """mmsafe's PGD against foolbox's L2PGD on the same model and batch."""
  import eagerpy  # pylint: disable=import-outside-toplevel
  import foolbox  # pylint: disable=import-outside-toplevel
  _, model, variables, splits = restore.restore_run(run_dir)
  test = data_lib.in_memory(splits["test"])
  b = min(_BATCH.value, len(test))
  inputs = {m: jnp.asarray(x[:b]) for m, x in test.inputs.items()}
  labels = jnp.asarray(test.labels[:b], jnp.int32)
  logits_flat, names = _flat_model(model, variables, test.modality_shapes)
  flat = jnp.concatenate([inputs[m].reshape(b, -1) for m in names], axis=1)
  fmodel = foolbox.JAXModel(logits_flat, bounds=(-1e4, 1e4))
  gradient = jax.jit(jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
      logits_flat(x), labels))))
  # A pytree function of the variables: the attack's steps compile once (eps traced).
  logits_fn = jax.tree_util.Partial(base.logits_apply(model), variables)
  for eps in (float(e) for e in _EPS.value):
    step_size = 2.5 * eps / _STEPS.value
    attack = foolbox.attacks.L2PGD(abs_stepsize=step_size, steps=_STEPS.value,
                                   random_start=False)
    run_foolbox = lambda: attack(fmodel, eagerpy.astensor(flat), eagerpy.astensor(labels),
                                 epsilons=eps)[1].raw
    run_mmsafe = lambda: attacks.pgd(logits_fn, inputs, labels, jax.random.PRNGKey(0),
                                     eps=eps, steps=_STEPS.value, step_size=step_size,
                                     random_start=False, loss="ce")
    # The floor of any l2-PGD: `steps` jitted gradient evaluations, nothing else.
    run_floor = lambda: [gradient(flat) for _ in range(_STEPS.value)][-1]
    seconds = {"mmsafe": _median_seconds(run_mmsafe, _REPEATS.value),
               "foolbox": _median_seconds(run_foolbox, _REPEATS.value),
               "gradient_floor": _median_seconds(run_floor, _REPEATS.value)}
    wrong = lambda x: float(jnp.mean(jnp.argmax(model.apply(variables, x).logits, -1) != labels))
    success = {"mmsafe": wrong(run_mmsafe()),
               "foolbox": float(jnp.mean(jnp.argmax(logits_flat(run_foolbox()), -1) != labels))}
    _print(what="pgd", eps=eps, steps=_STEPS.value, batch=b,
           examples_per_s={k: round(b / v, 1) for k, v in seconds.items()},
           ratio=round(seconds["foolbox"] / seconds["mmsafe"], 2),
           floor_ratio=round(seconds["foolbox"] / seconds["gradient_floor"], 2),
           misclassified=success, clean_error=wrong(inputs))


def skip_certified(run_dirs: dict[str, str]) -> None:
  """The paper's suite (`default` protocol) with and without `skip_certified`."""
  for name, run_dir in run_dirs.items():
    _, model, variables, splits = restore.restore_run(run_dir)
    runs = {}
    for skip in (True, False):
      evals = evals_config.get_config("paper").to_dict()
      evals["robustness"].update(protocol="default", skip_certified=skip)
      runs[skip] = registry.build_evaluators(evals, model=model, splits=splits)["robustness"]
    results = {skip: ev.run(variables) for skip, ev in runs.items()}  # compiles
    seconds = {True: [], False: []}
    for _ in range(_REPEATS.value // 2 or 1):
      for skip, ev in runs.items():
        start = time.perf_counter()
        ev.run(variables)
        seconds[skip].append(time.perf_counter() - start)
    curves = {skip: r["curves"]["pgd"] for skip, r in results.items()}
    _print(what="skip_certified", model=name, protocol="default",
           seconds={"skip": round(float(np.median(seconds[True])), 2),
                    "attack_all": round(float(np.median(seconds[False])), 2)},
           certified={scope: c["num_certified"] for scope, c in curves[True].items()},
           clean_correct=round(results[True]["clean_accuracy"] * results[True]["num_examples"]),
           same_numbers=results[True]["headline"] == results[False]["headline"] and all(
               curves[True][s]["accuracy"] == curves[False][s]["accuracy"] for s in curves[True]))


def _lipschitz_run(workdir: str) -> str:
  """A JT run with 1-Lipschitz encoders on mfeat (trained when absent)."""
  run_dir = os.path.join(workdir, "lipschitz", "jt")
  if not os.path.exists(os.path.join(run_dir, "results.json")):
    loop.train_and_evaluate(embedded.get_config("lipschitz"), run_dir)
  return run_dir


def _config(epochs: int):
  config = embedded.get_config()
  config.num_epochs = epochs
  config.optimizer.decay_epochs = ()
  return config


def _minimal_loop(config, steps: int) -> float:
  """Seconds for `steps` steps of the same jitted train step on the same batches,
  with nothing else (after one compiled step)."""
  experiment = experiment_lib.build_experiment(config)
  stage = experiment.stages[0]
  step_fn = jax.jit(make_train_step(experiment.objective(stage),
                                    experiment.optimizers[stage.name]), donate_argnums=0)
  state = experiment.init_train_state()
  batches = data_lib.train_iterator(experiment.splits["train"], seed=0, start_step=0,
                                    batch_size=int(config.batch_size))
  state, metrics = step_fn(state, next(batches))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps - 1):
    state, metrics = step_fn(state, next(batches))
  jax.block_until_ready(metrics)
  batches.close()
  return time.perf_counter() - start


def _timed_run(config, workdir: str) -> tuple[float, int]:
  shutil.rmtree(workdir, ignore_errors=True)  # A fresh run, not a resumed one.
  start = time.perf_counter()
  results = loop.train_and_evaluate(config, workdir)
  return time.perf_counter() - start, results["steps"]


def train_loop(workdir: str) -> None:
  """`train_and_evaluate` against the minimal loop, per step after compilation:
  the loop's cost per step is the difference of two runs (`epochs` and
  `epochs / 3`), which removes set-up, compilation and the final test pass."""
  _timed_run(_config(1), os.path.join(workdir, "warmup"))  # compiles (persistent cache)
  short_s, short_steps = _timed_run(_config(_EPOCHS.value // 3), os.path.join(workdir, "short"))
  long_s, steps = _timed_run(_config(_EPOCHS.value), os.path.join(workdir, "long"))
  loop_per_step = (long_s - short_s) / (steps - short_steps)
  minimal_per_step = _minimal_loop(_config(_EPOCHS.value), steps) / (steps - 1)
  _print(what="train_loop", steps=steps, loop_s_per_step=round(loop_per_step, 5),
         minimal_s_per_step=round(minimal_per_step, 5),
         ratio=round(minimal_per_step / loop_per_step, 3))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  root = _WORKDIR.value
  run_dir = os.path.join(root, "main", "runs", "jt")
  if "main_job" in _PARTS.value or not os.path.exists(run_dir):
    shutil.rmtree(os.path.join(root, "main"), ignore_errors=True)
    main_job(os.path.join(root, "main"))
  if "pgd" in _PARTS.value:
    pgd(run_dir)
  if "certify" in _PARTS.value:
    subprocess.run([sys.executable, "-m", "experiments.bench_certify", *CERTIFY_ARGS],
                   check=True)
  if "skip_certified" in _PARTS.value:
    skip_certified({"jt": run_dir, "jt_lipschitz": _lipschitz_run(root)})
  if "train_loop" in _PARTS.value:
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    train_loop(root)


if __name__ == "__main__":
  app.run(main)
