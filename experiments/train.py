r"""Trains one method on one dataset.

  python -m experiments.train --config=experiments/configs/embedded.py \
      --config.method=ojt --config.dataset=mfeat --workdir=/tmp/mmsafe/ojt

Rerunning the same command resumes from the latest checkpoint in --workdir that
verifies (a damaged one is set aside, with a warning). A workdir has one
writer: a second process exits at once ("workdir: in use by pid N on host H").
A rerun whose config differs from the workdir's in a field that defines the
model or the run stops before writing and lists the fields; `--fresh` deletes
the workdir's run and starts over (it refuses a directory that holds anything
but a run, naming what is there).

Data parallelism: `--config.parallel=jit` (or `pmap`) trains on all devices of
all processes with `--config.batch_size` the global batch. Several processes
(TPU pod workers, SLURM tasks, `launch/local.sh --num_processes=N`) start
`jax.distributed` first: `--distributed=auto` (the default) does so when the
environment shows a multi-process job (SLURM, Open MPI, Cloud TPU, or
`JAX_COORDINATOR_ADDRESS`) or --coordinator_address is given; `on` always, `off`
never.

The run's numbers also go to TensorBoard event files in --workdir
(`tensorboard --logdir <workdir>`), and the command's entry to
`<workdir>/index.md`.

Preemption: on SIGTERM the run saves a checkpoint at the next step boundary and
exits with status 143 (`preemption.PREEMPTED_EXIT_CODE`); rerun the same command to
resume. Any other failure exits with status 1, a finished run with 0.
"""

import json
import os
import sys

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from experiments import cli
from mmsafe.train import distributed
from mmsafe.train import loop
from mmsafe.train import preemption

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_FRESH = flags.DEFINE_bool("fresh", False, "Delete the run in --workdir (checkpoints, "
                            "metrics, results, reports) and start over; a directory that "
                            "holds anything else is refused.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start jax.distributed: auto-detected multi-process jobs (auto), always (on), never (off).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (jax.distributed; auto-detected "
    "on TPU pods and SLURM when omitted).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the job "
                                      "(jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (jax.distributed).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  distributed.initialize_distributed(
      _DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  try:
    results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value)
  except preemption.Preempted as e:
    logging.warning("%s", e)
    print(json.dumps({"preempted": True, "step": e.step}), flush=True)
    sys.exit(preemption.PREEMPTED_EXIT_CODE)
  logging.info("results: %s", results)
  if jax.process_index() == 0:
    cli.record_in_index(
        _WORKDIR.value, f"train {results['method']} on {results['dataset']}",
        [os.path.join(_WORKDIR.value, name) for name in ("results.json", "metrics.jsonl",
                                                        "config.json")],
        config=_CONFIG.value, key="train")
  print(json.dumps(results, indent=2, sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.run(main)
