"""Runs that span several processes: starting `jax.distributed`, barriers, and
reductions over the processes (also of a pass over a data split)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

from mmsafe.data import eval_pass


def distributed_cluster(env: Mapping[str, str], tpu_vm: bool = False) -> str | None:
  """Which multi-process environment `env` (the process environment) describes, for
  `jax.distributed.initialize()` to auto-configure: "coordinator" (an explicit
  `JAX_COORDINATOR_ADDRESS`), "slurm" (a SLURM step with several tasks), "mpi"
  (Open MPI with several ranks), "tpu" (a Cloud TPU VM, `tpu_vm`, or TPU worker
  variables), or None (one process: no distributed start)."""
  def count(name):
    try:
      return int(env.get(name, "1") or 1)
    except ValueError:
      return 1
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "coordinator"
  if count("SLURM_NTASKS") > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
    return "slurm"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "mpi"
  if tpu_vm or env.get("TPU_WORKER_HOSTNAMES") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu"
  return None


def initialize_distributed(mode: str = "auto", *, coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None
                           ) -> bool:
  """Starts `jax.distributed` when the run spans several processes; call it before
  any other JAX computation.

  Args:
    mode: "off" (never), "on" (always: `jax.distributed.initialize` with the given
      arguments, auto-detected on TPU pods, SLURM, Open MPI, ... when omitted) or
      "auto" (when the arguments or the environment say the run has several
      processes: `distributed_cluster`).
    coordinator_address, num_processes, process_id: `jax.distributed.initialize`'s.

  CPU processes exchange collectives through gloo. Returns whether it started.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed: expected 'auto', 'on' or 'off', got {mode!r}")
  if mode == "off":
    return False
  if mode == "auto" and coordinator_address is None and distributed_cluster(
      os.environ, tpu_vm=os.path.exists("/dev/accel0")) is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def reduce_over_processes(tree, op: str):
  """`tree` (numpy or scalar leaves, the same structure and shapes on every process)
  reduced over the processes by `op`, "sum" or "max"; with one process, `tree` as
  numpy. Every process gets the result (a collective: every process must call it)."""
  reducers = {"sum": np.sum, "max": np.max}
  if op not in reducers:
    raise ValueError(f"op: expected one of {sorted(reducers)}, got {op!r}")
  tree = jax.tree_util.tree_map(np.asarray, tree)
  if jax.process_count() == 1:
    return tree
  gathered = multihost_utils.process_allgather(tree)  # leading axis: the process
  return jax.tree_util.tree_map(lambda x: reducers[op](np.asarray(x), axis=0), gathered)


def split_reducer(splits: Mapping[str, Any], *, batch_size: int) -> Callable:
  """`reduce_over_split(split, fn, op)` over `splits` (`methods.CallbackContext`):
  `fn` of this process's evaluation batches of `splits[split]` (`data.eval_pass`,
  `batch_size` rows each, at most the split's size), reduced over the processes by `op`
  (`reduce_over_processes`)."""

  def reduce_over_split(split: str, fn: Callable, op: str):
    if split not in splits:
      raise ValueError(f"split: expected one of {sorted(splits)}, got {split!r}")
    data = splits[split]
    with eval_pass(data, batch_size=min(batch_size, len(data))) as batches:
      local = fn(batches)
    return reduce_over_processes(local, op)

  return reduce_over_split
