"""Data parallelism over all devices of all hosts: meshes, shardings, compiled steps.

Every mode is `jax.jit` over a 1-D mesh (`AXIS`) with `NamedSharding`s: the
train state is replicated over the mesh and the global batch is sharded along
its first axis, so the loop, the evaluators and the checkpoints see one form
of the state whatever the mode:

* `"none"`: a one-device mesh (the first local device).
* `"jit"`: every device of every process; XLA inserts the gradient all-reduce
  and computes batch-norm statistics over the global batch.
* `"pmap"`: the per-device step of `jax.pmap`-style data parallelism, run by
  `jax.shard_map` inside the jitted step: each device computes on its share of
  the global batch with the same key, then gradients, loss and metrics are
  `pmean`-ed over `AXIS` and batch norm averages its statistics over it (the
  objective's model is built with `batch_norm_axis_name=AXIS`). (`jax.pmap`
  itself would need the state in a per-device stacked form; `shard_map` runs
  the same per-device program on the global form.)

With any mode, `config.batch_size` is the global batch: the updates are the
same (to float rounding) whatever the number of devices and processes. One
difference: under `"pmap"` an objective's own randomness (mixup permutations,
PGD random starts) acts on each device's share of the batch, with the same key
on every device (mixup's lambda is shared); `"jit"` and `"none"` draw it for
the global batch.

Row ownership: a process supplies the rows of each global batch that its
devices hold (`process_rows`), so the global batch is exactly the one-device
batch, whatever the device order the mesh chose.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from mmsafe import programs
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


@functools.lru_cache(maxsize=programs.MAX_PROGRAMS)
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


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """One data-parallel layout of a run (see the module docstring).

  Attributes:
    mode: "none" | "jit" | "pmap".
    mesh: the 1-D mesh (one device for "none").
  """

  mode: str
  mesh: jax.sharding.Mesh

  @classmethod
  def create(cls, mode: str) -> "DataParallel":
    if mode not in MODES:
      raise ValueError(f"parallel: expected one of {list(MODES)}, got {mode!r}")
    if mode == "none":
      if jax.process_count() > 1:
        raise ValueError(f"parallel: 'none' trains on one device of one process; this run "
                         f"has {jax.process_count()} processes: use 'jit' or 'pmap'")
      return cls(mode, data_mesh(jax.local_devices()[:1]))
    return cls(mode, data_mesh())

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  @property
  def batch_norm_axis_name(self) -> str | None:
    """The axis the objective's batch norm averages over (pmap mode only)."""
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
    return process_rows(batch_sharding(self.mesh), global_size)

  def put(self, host_tree):
    """Host values (equal on every process) -> new arrays replicated over the mesh."""
    return replicate(host_tree, self.mesh)

  def get(self, tree):
    """Replicated arrays -> numpy values of this process (numpy leaves pass through)."""
    return to_host(tree)

  def put_batch(self, local_batch: dict, global_size: int) -> Any:
    """This process's rows (`rows(global_size)`) of a global batch -> what the
    compiled steps take: with one process the numpy batch itself (the jitted
    step's input sharding places it, in one transfer), with several one global
    array per leaf, sharded along the batch axis."""
    if jax.process_count() == 1:
      return local_batch
    sharding = batch_sharding(self.mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_size, *np.shape(x)[1:])), local_batch)

  def compile_train_step(self, objective, optimizer,
                         prepare_inputs: Callable | None = None) -> Callable:
    """`make_train_step(objective, optimizer)` compiled for this layout:
    `(state, global batch) -> (state, metrics)`, donating the state. In "pmap"
    mode `objective` must be built for `batch_norm_axis_name`. `prepare_inputs`
    (e.g. `mmsafe.data.normalize_inputs` for uint8 clips) maps the batch's
    inputs to model space inside the compiled step."""
    replicated, sharded = replicated_sharding(self.mesh), batch_sharding(self.mesh)
    if self.mode == "pmap":
      step = jax.shard_map(make_train_step(objective, optimizer, axis_name=AXIS),
                           mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                           check_vma=False)
    else:
      step = make_train_step(objective, optimizer)
    return jax.jit(_with_prepared_inputs(step, prepare_inputs),
                   in_shardings=(replicated, sharded),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def compile_eval_step(self, model, prepare_inputs: Callable | None = None) -> Callable:
    """`make_eval_step(model)` compiled for this layout: `(variables, global batch)
    -> sums` over the global batch (inputs mapped by `prepare_inputs` first)."""
    replicated = replicated_sharding(self.mesh)
    return jax.jit(_with_prepared_inputs(make_eval_step(model), prepare_inputs),
                   in_shardings=(replicated, batch_sharding(self.mesh)),
                   out_shardings=replicated)

  def any_process(self, flag: bool) -> bool:
    """`flag` or-ed over all processes (a collective when there are several)."""
    return any_process(flag, self.mesh)


def _with_prepared_inputs(step: Callable, prepare_inputs: Callable | None) -> Callable:
  """`step(first, batch)` on the batch with `prepare_inputs(batch["inputs"])` (traced
  into the same program: raw uint8 batches travel to the devices, floats stay there)."""
  if prepare_inputs is None:
    return step
  return lambda first, batch: step(first, {**batch, "inputs": prepare_inputs(batch["inputs"])})
