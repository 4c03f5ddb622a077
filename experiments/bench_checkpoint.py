r"""Benchmark (not a test): what checkpoint verification costs.

  python -m experiments.bench_checkpoint --config=experiments/configs/embedded.py

Builds the config's train state (mfeat JT by default), then times, median of
`--repeats`, `Checkpointer`'s save (until written and sealed: array digests,
file checksums, the manifest with the step) and verified restore (file
checksums and step, restore, array digests) against a plain orbax
`CheckpointManager` saving and restoring the same items (timed alternately),
and the array digests alone. Besides the ratio of the medians it prints the
median of the paired ratios and of the paired differences (each verified
operation against the plain one timed next to it), which drift in the load of
a shared machine moves less. Prints one JSON line.
"""

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import orbax.checkpoint as ocp
from ml_collections import config_flags

from mmsafe.train import checkpoint
from mmsafe.train.experiment import build_experiment

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/embedded.py",
                                          "Training config file.")
_REPEATS = flags.DEFINE_integer("repeats", 51, "Timed repetitions (median).")


def _seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _interleaved(first, second, repeats: int) -> dict[str, float]:
  """Seconds of `first` and of `second`, timed alternately (so that load drifting
  during the run affects both alike): their medians, and the medians of the
  paired ratios and differences."""
  times = [(_seconds(first), _seconds(second)) for _ in range(repeats)]
  return {"median": statistics.median(a for a, _ in times),
          "plain_median": statistics.median(b for _, b in times),
          "paired_ratio": statistics.median(a / b for a, b in times),
          "paired_difference": statistics.median(a - b for a, b in times)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  experiment = build_experiment(_CONFIG.value)
  state = experiment.init_train_state()
  best = {"variables": state.variables}
  progress = {"best_validation_accuracy": 0.5, "best_step": 0, "stage": "train"}
  template = experiment.abstract_train_state(
      jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = checkpoint.Checkpointer(os.path.join(directory, "verified"), max_to_keep=2)
    plain = ocp.CheckpointManager(
        os.path.join(directory, "plain"),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        item_handlers={"train_state": ocp.StandardCheckpointHandler(),
                       "best": ocp.StandardCheckpointHandler(),
                       "progress": ocp.JsonCheckpointHandler()})
    steps = iter(range(1, 10**6))

    def save():
      checkpointer.save(next(steps), state, best, progress)
      checkpointer.wait()

    def plain_save():
      plain.save(next(steps), args=ocp.args.Composite(
          train_state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
          progress=ocp.args.JsonSave(progress)), force=True)
      plain.wait_until_finished()

    saves = _interleaved(save, plain_save, _REPEATS.value)
    verified_step, plain_step = checkpointer.latest_step(), plain.latest_step()
    restores = _interleaved(
        lambda: checkpointer.restore(verified_step, template, {"variables": template.variables}),
        lambda: plain.restore(plain_step, args=ocp.args.Composite(
            train_state=ocp.args.StandardRestore(template),
            best=ocp.args.StandardRestore({"variables": template.variables}),
            progress=ocp.args.JsonRestore())), _REPEATS.value)
    checkpointer.close()
    plain.close()
  digest_seconds = statistics.median(
      _seconds(lambda: (checkpoint.tree_digest(state), checkpoint.tree_digest(best),
                        checkpoint.json_digest(progress))) for _ in range(_REPEATS.value))
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves((state, best)))
  out = {"config": f"{experiment.config['method']} on {experiment.config['dataset']}",
         "megabytes": round(size / 2**20, 2), "array_digests_seconds": round(digest_seconds, 5)}
  for name, timed in (("save", saves), ("restore", restores)):
    out.update({
        f"verified_{name}_seconds": round(timed["median"], 4),
        f"plain_{name}_seconds": round(timed["plain_median"], 4),
        f"verified_over_plain_{name}": round(timed["median"] / timed["plain_median"], 3),
        f"paired_ratio_{name}": round(timed["paired_ratio"], 3),
        f"paired_extra_{name}_seconds": round(timed["paired_difference"], 4)})
  print(json.dumps(out), flush=True)

if __name__ == "__main__":
  app.run(main)
