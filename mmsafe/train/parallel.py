"""Data parallelism over all devices of all hosts: meshes, shardings, compiled steps.

Two modes run the same pure train step (`make_train_step`):

* `"jit"`: `jax.jit` over a 1-D mesh (`AXIS`) of every device of every process.
  The global batch is one array sharded along its first axis, the train state
  is replicated; XLA inserts the gradient all-reduce and computes batch-norm
  statistics over the global batch. In and out shardings are explicit and the
  train state is donated.
* `"pmap"`: `jax.pmap` over this process's devices; the axis `AXIS` spans all
  devices of all processes. Each device holds a replica of the train state and
  `1 / device_count` of the global batch; gradients, loss and metrics are
  `pmean`-ed over `AXIS` and batch norm averages its statistics over it (the model
  must be built with `batch_norm_axis_name=AXIS`).

`"none"` is the single-device `jax.jit` step. With any mode, `config.batch_size`
is the global batch: the updates are the same (to float rounding) whatever the
number of devices and processes. One difference: under `"pmap"` an objective's
own randomness (mixup permutations, PGD random starts) acts on each device's
share of the batch, with the same key on every device (mixup's lambda is shared);
`"jit"` draws it for the global batch exactly as one device does.

Row ownership: a process supplies the rows of each global batch that its
devices hold (`process_rows`), so the global batch is exactly the one-device
batch, whatever the device order the mesh chose.

The canonical (checkpoint) form of a train state in `"jit"` and `"pmap"` modes
is a pytree of arrays replicated over the mesh (`replicate`), which orbax
saves and restores on any number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmsafe.train.step import make_eval_step, make_train_step

AXIS = "data"
MODES = ("none", "jit", "pmap")


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh `(AXIS,)` over `devices` (default: all devices of all processes),
  laid out by `jax.make_mesh` (topology-aware on TPUs)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Arrays sharded along their first (batch) axis over the mesh."""
  return NamedSharding(mesh, P(AXIS))


def replicated_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Arrays replicated on every device of the mesh."""
  return NamedSharding(mesh, P())


def process_rows(sharding: jax.sharding.Sharding, global_size: int) -> np.ndarray:
  """The rows of a `[global_size, ...]` array with `sharding` that live on this
  process's devices, ascending: the order in which
  `jax.make_array_from_process_local_data` reads this process's data."""
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map((global_size,)).values():
    rows.update(range(*index[0].indices(global_size)))
  return np.array(sorted(rows), np.int64)


def replicate(tree, mesh: jax.sharding.Mesh):
  """Host values (numpy or single-device arrays, equal on every process) -> global
  arrays replicated over `mesh`."""
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                       np.shape(x)), tree)


def to_host(tree):
  """Arrays whose value every local device holds in full (replicated global
  arrays, single-device arrays) -> numpy copies of this process's first copy."""
  return jax.tree_util.tree_map(lambda x: np.array(x.addressable_data(0))
                                if isinstance(x, jax.Array) else np.array(x), tree)


def unreplicate_pmap(tree):
  """Outputs of `jax.pmap` holding one replica per local device -> numpy copies of
  the first device's replica (copies: the pmap buffers may be donated later)."""
  return jax.tree_util.tree_map(lambda x: np.array(x.addressable_shards[0].data)[0], tree)


@functools.cache
def _pmap_identity():
  return jax.pmap(lambda x: x, axis_name=AXIS)


def pmap_device_put(tree):
  """Leaves `[local_device_count, ...]` -> arrays laid out as `jax.pmap` outputs (row
  i on local device i), so a pmapped function takes them without a transfer."""
  return _pmap_identity()(tree)


def replicate_pmap(tree):
  """Host values -> one replica per local device, laid out as `jax.pmap` outputs."""
  n = jax.local_device_count()
  return pmap_device_put(jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (n, *np.shape(x))), tree))


def split_for_pmap(batch, num_devices: int):
  """`[B, ...]` leaves -> `[num_devices, B / num_devices, ...]` (contiguous blocks)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x).reshape(num_devices, -1, *np.shape(x)[1:]), batch)


@functools.cache
def _global_max(mesh: jax.sharding.Mesh):
  return jax.jit(jnp.max, out_shardings=replicated_sharding(mesh))


def any_process(flag: bool, mesh: jax.sharding.Mesh) -> bool:
  """True on every process when `flag` is true on at least one (a collective:
  every process must call it at the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  local = np.full((len(mesh.local_devices),), int(bool(flag)), np.int32)
  flags = jax.make_array_from_process_local_data(batch_sharding(mesh), local, (mesh.size,))
  return bool(to_host(_global_max(mesh)(flags)))


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


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """One data-parallel layout of a run (see the module docstring).

  Attributes:
    mode: "none" | "jit" | "pmap".
    mesh: the 1-D mesh over all devices (`"jit"`, `"pmap"`), None for `"none"`.
  """

  mode: str
  mesh: jax.sharding.Mesh | None = None

  @classmethod
  def create(cls, mode: str) -> "DataParallel":
    if mode not in MODES:
      raise ValueError(f"parallel: expected one of {list(MODES)}, got {mode!r}")
    if mode == "none":
      if jax.process_count() > 1:
        raise ValueError(f"parallel: 'none' trains on one device of one process; this run "
                         f"has {jax.process_count()} processes: use 'jit' or 'pmap'")
      return cls(mode)
    return cls(mode, data_mesh())

  @property
  def num_devices(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  @property
  def axis_name(self) -> str | None:
    """The pmap axis the model's batch norm and the step reduce over (pmap only)."""
    return AXIS if self.mode == "pmap" else None

  def check_batch_size(self, name: str, global_size: int) -> None:
    """Raises ValueError unless `global_size` splits evenly over the devices."""
    if global_size % self.num_devices:
      raise ValueError(f"{name}: expected a multiple of the {self.num_devices} devices "
                       f"(parallel={self.mode!r}), got {global_size}")

  def round_batch_size(self, size: int) -> int:
    """`size` rounded up to a multiple of the number of devices."""
    return -(-size // self.num_devices) * self.num_devices

  def rows(self, global_size: int) -> np.ndarray:
    """The rows of each global batch of `global_size` this process loads."""
    if self.mode == "none":
      return np.arange(global_size)
    if self.mode == "jit":
      return process_rows(batch_sharding(self.mesh), global_size)
    per_process = global_size // jax.process_count()
    return np.arange(per_process) + jax.process_index() * per_process

  # Train state: host form <-> canonical (checkpoint) form <-> training form.

  def canonical(self, host_tree):
    """Host values (equal on every process) -> the canonical form (new buffers):
    device arrays (`"none"`) or arrays replicated over the mesh."""
    if self.mode == "none":
      return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), host_tree)
    return replicate(host_tree, self.mesh)

  def to_train(self, canonical_tree):
    """Canonical form -> what the compiled train step takes (pmap: one replica per
    local device)."""
    if self.mode == "pmap":
      return replicate_pmap(to_host(canonical_tree))
    return canonical_tree

  def from_train(self, train_tree):
    """Training form -> canonical form (a copy where the train step donates)."""
    if self.mode == "pmap":
      return replicate(unreplicate_pmap(train_tree), self.mesh)
    return jax.tree_util.tree_map(jnp.copy, train_tree)

  def checkpoint_view(self, train_tree):
    """Training form -> canonical form for a checkpoint (no copy where they agree:
    orbax copies the arrays off the devices before `save` returns)."""
    if self.mode == "pmap":
      return self.from_train(train_tree)
    return train_tree

  def host(self, train_tree):
    """Training form -> numpy values of this process (numpy leaves pass through)."""
    unstack = unreplicate_pmap if self.mode == "pmap" else to_host
    return jax.tree_util.tree_map(
        lambda x: np.array(x) if isinstance(x, (np.ndarray, np.generic)) else unstack(x),
        train_tree)

  def put_batch(self, local_batch: dict, global_size: int) -> Any:
    """This process's rows (`rows(global_size)`) of a global batch -> what the
    compiled steps take: the numpy batch (`"none"`), one global sharded array per
    leaf (`"jit"`) or per-device blocks (`"pmap"`)."""
    if self.mode == "none":
      return local_batch
    if self.mode == "pmap":
      return split_for_pmap(local_batch, jax.local_device_count())
    sharding = batch_sharding(self.mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_size, *np.shape(x)[1:])), local_batch)

  def metrics_to_host(self, metrics):
    """Per-step outputs (means or sums, equal on every device) -> numpy values."""
    return self.host(metrics)

  def compile_train_step(self, objective, optimizer) -> Callable:
    """`make_train_step(objective, optimizer)` compiled for this layout; donates the
    train state."""
    if self.mode == "pmap":
      return jax.pmap(make_train_step(objective, optimizer, axis_name=AXIS), axis_name=AXIS,
                      donate_argnums=0)
    step = make_train_step(objective, optimizer)
    if self.mode == "none":
      return jax.jit(step, donate_argnums=0)
    replicated = replicated_sharding(self.mesh)
    return jax.jit(step, in_shardings=(replicated, batch_sharding(self.mesh)),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def compile_eval_step(self, model) -> Callable:
    """`make_eval_step(model)` compiled for this layout: `(variables, batch) -> sums`
    over the global batch (variables in training form)."""
    if self.mode == "pmap":
      return jax.pmap(make_eval_step(model, axis_name=AXIS), axis_name=AXIS)
    step = make_eval_step(model)
    if self.mode == "none":
      return jax.jit(step)
    replicated = replicated_sharding(self.mesh)
    return jax.jit(step, in_shardings=(replicated, batch_sharding(self.mesh)),
                   out_shardings=replicated)

  def any_process(self, flag: bool) -> bool:
    """`flag` or-ed over all processes (a collective when there are several)."""
    return bool(flag) if self.mesh is None else any_process(flag, self.mesh)
