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
call, on every process, then run the same code. ``make_mesh()`` then spans the devices of all processes, and
``shard_batch`` takes each process's *local* share of the batch (``global batch / process_count`` rows, e.g. from
``batches(..., seed=seed + jax.process_index())`` or an index split) and assembles the global array without copying
data between hosts. Test on one machine with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with the axis ``"data"`` over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("make_mesh needs at least one device, got an empty list")
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


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
