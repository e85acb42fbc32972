"""Data parallelism as one ``jax.jit`` with explicit shardings: the modern form of ``pmap`` (DESIGN §8).

A 1-D ``Mesh`` with the axis ``"data"`` spans every device. Batches are split along their leading axis over it
(``data_sharding``), parameters and optimizer state are replicated (``replicated_sharding``), and a step jitted with
these ``in_shardings``/``out_shardings`` lets XLA insert the gradient all-reduce itself:

    mesh = make_mesh()
    state = replicate(state, mesh)
    step = jax.jit(train_step, in_shardings=(replicated_sharding(mesh), data_sharding(mesh), None),
                   out_shardings=(replicated_sharding(mesh), None), donate_argnums=0)
    state, metrics = step(state, shard_batch(host_batch, mesh), rng)

Multi-host (TPU pods, multi-node GPU): call ``jax.distributed.initialize()`` once at start-up, before any other JAX
call, on every process, then run the same code (the CLI does it with ``--config.distributed=True``, or ``auto``:
``initialize_distributed``). ``make_mesh()`` then spans the devices of all processes, and
``shard_batch`` takes each process's *local* share of the batch (``global batch / process_count`` rows, e.g. from
``batches(..., seed=seed + jax.process_index())`` or an index split) and assembles the global array without copying
data between hosts. Test on one machine with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

DISTRIBUTED_CHOICES = ("false", "true", "auto")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
  """Where the processes of a multi-process run meet (``config.cluster``; read only when ``distributed`` is on).

  The defaults let ``jax.distributed.initialize`` detect them, as it does on a Cloud TPU VM slice, under SLURM or
  Open MPI; set them for a cluster it does not know, e.g. two processes on one machine.

  Attributes:
    coordinator_address: ``host:port`` of process 0 (e.g. ``localhost:12355``); "" = detected.
    num_processes: how many processes take part; 0 = detected.
    process_id: this process's index in ``[0, num_processes)``; -1 = detected.
  """
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1

  def check(self, where: str = "cluster") -> None:
    if self.num_processes < 0:
      raise ValueError(f"{where}.num_processes must be >= 0 (0 = detected), got {self.num_processes}")
    if self.process_id < -1:
      raise ValueError(f"{where}.process_id must be >= 0, or -1 (detected), got {self.process_id}")
    if self.num_processes and self.process_id >= self.num_processes:
      raise ValueError(f"{where}.process_id={self.process_id} is not below num_processes={self.num_processes}")
    if self.coordinator_address and ":" not in self.coordinator_address:
      raise ValueError(f"{where}.coordinator_address must be host:port, got {self.coordinator_address!r}")


def distributed_choice(value: Any, where: str = "distributed") -> str:
  """``config.distributed`` as one of ``"false"``, ``"true"``, ``"auto"`` (a bool or any case of those words).

  Raises:
    ValueError: any other value.
  """
  choice = str(value).strip().lower()
  if choice not in DISTRIBUTED_CHOICES:
    raise ValueError(f"{where} must be True, False or auto, got {value!r}")
  return choice


# Environment variables that say this process is one of several: Cloud TPU VM (a slice's workers), JAX's own
# coordinator variable, SLURM and Open MPI (the clusters that ``jax.distributed.initialize`` detects).
_CLUSTER_VARIABLES = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
                      "JAX_COORDINATOR_ADDRESS")


def cluster_detected(environ: dict[str, str] | None = None) -> bool:
  """Whether this process looks like one of a multi-process job (what ``distributed=auto`` acts on): a Cloud TPU VM
  (``/dev/accel0`` or ``/dev/vfio/0`` with a ``TPU_*`` variable, or the slice workers' variables),
  ``JAX_COORDINATOR_ADDRESS``, or a SLURM / Open MPI job of more than one task."""
  env = os.environ if environ is None else environ
  if any(env.get(name) for name in _CLUSTER_VARIABLES):
    return True
  if any(int(env.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")):
    return True
  tpu_vm = any(name.startswith("TPU_") for name in env) and (os.path.exists("/dev/accel0")
                                                           or os.path.exists("/dev/vfio/0"))
  return tpu_vm


def initialize_distributed(distributed: Any, cluster: ClusterConfig = ClusterConfig()) -> bool:
  """Calls ``jax.distributed.initialize`` for ``distributed`` = True, or for ``auto`` where ``cluster_detected()``
  or a coordinator address is given; returns whether it did. Call it before any other JAX call; once initialised
  (by this or by the user), it is not called again.

  Raises:
    ValueError: a bad ``distributed`` or ``cluster`` value; JAX was already used in this process (the backend is
      initialised, so the processes could no longer meet); or the initialisation failed (the message says which
      coordinator, process count and id were asked for).
  """
  choice = distributed_choice(distributed)
  cluster.check()
  if choice == "false" or (choice == "auto" and not (cluster.coordinator_address or cluster_detected())):
    return False
  from jax._src import distributed as jax_distributed  # noqa: PLC0415  (the only place that says if it ran)
  if getattr(jax_distributed.global_state, "client", None) is not None:
    return True   # already initialised by the caller
  kwargs = {"coordinator_address": cluster.coordinator_address or None,
            "num_processes": cluster.num_processes or None,
            "process_id": None if cluster.process_id < 0 else cluster.process_id}
  if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU processes need it to sum across hosts
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as error:   # ValueError: nothing detected and nothing given
    raise ValueError(f"distributed={distributed!r}: jax.distributed.initialize({kwargs}) failed: {error} It must come "
                     "before any other JAX call in the process, and every process must reach the coordinator; set "
                     "cluster.coordinator_address, cluster.num_processes and cluster.process_id where the cluster is "
                     "not detected (a Cloud TPU slice, SLURM or Open MPI is)") from None
  return True


def check_cpu_devices(count: int) -> None:
  """Raises ValueError for a ``cpu_devices`` below 0 (0 = JAX's default)."""
  if count < 0:
    raise ValueError(f"cpu_devices must be >= 0 (0 = JAX's default), got {count}")


def use_cpu_devices(count: int) -> None:
  """Makes JAX's CPU backend expose ``count`` devices (``jax.config``'s ``jax_num_cpu_devices``), so that the
  data-parallel mesh splits each batch over them; 0 leaves JAX's own default (one device, or the
  ``--xla_force_host_platform_device_count`` of ``XLA_FLAGS``).

  Why: XLA runs one CPU device's program on about 1.3 cores; on a 2-core machine two devices keep both cores busy
  (the shipped digits UNet: 1.5x the samples per second, a reference solve 1.4x faster). Per-sample results are the
  same up to float rounding; a batch mean is summed in another order. Only the CPU backend is affected: where JAX runs
  on a GPU or TPU, its CPU devices hold no work.

  It must come before JAX's backends start (the first computation or device query): ``modes.prepare`` calls it first,
  so the command line always applies it. Where they have started with another count (a notebook that used JAX
  first), it logs a warning and changes nothing.

  Raises:
    ValueError: ``count`` below 0.
  """
  check_cpu_devices(count)
  if not count:
    return
  from jax._src import xla_bridge  # noqa: PLC0415  (the only place that says whether the backends have started)
  if xla_bridge.backends_are_initialized():
    have = len(jax.local_devices(backend="cpu"))
    if have != count:
      from absl import logging  # noqa: PLC0415
      logging.warning("cpu_devices=%d is not applied: JAX started with %d CPU device(s) before the config was read; "
                      "set it before any JAX computation (the command line does) or with JAX_NUM_CPU_DEVICES=%d",
                      count, have, count)
    return
  jax.config.update("jax_num_cpu_devices", count)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with the axis ``"data"`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device, got an empty list")
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def is_writer() -> bool:
  """Whether this process writes the workdir's shared files (process 0; every process of a multi-host run computes
  the same values, and one writes them)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches ``name`` (nothing on a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def local_mesh() -> Mesh:
  """A 1-D ``"data"`` mesh over this process's devices (all devices on a single host): for work every process does
  on its own, such as sampling held-out noise for evaluation."""
  return make_mesh(jax.local_devices())


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the ``"data"`` axis, the other axes whole."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A full copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


def local_device_count(mesh: Mesh) -> int:
  """Devices of the mesh that this process feeds (all of them on a single host)."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Puts a host batch (a pytree of arrays ``[n, ...]``, this process's share) on the mesh, split along ``n``.

  The global batch has ``n * process_count`` rows; ``n`` must be divisible by this process's device count so that
  every device gets the same number of rows.
  """
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("shard_batch got an empty batch")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in sizes or len(sizes) != 1:
    shapes = jax.tree.map(np.shape, batch)
    raise ValueError(f"every leaf of the batch needs the same leading batch dimension, got shapes {shapes}")
  (size,) = sizes
  num_local = local_device_count(mesh)
  if size % num_local:
    raise ValueError(f"batch size {size} is not divisible by the {num_local} devices of the mesh; choose a batch "
                     f"size that is a multiple of {num_local}")
  sharding = data_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """A full copy of ``tree`` on every device of the mesh (parameters, optimizer state, EMA)."""
  return jax.device_put(tree, replicated_sharding(mesh))
