"""Data parallelism: one mesh over every device, replicated state, batches split on the "data" axis.

Multi-host uses JAX's own runtime: `jax.distributed.initialize` joins the processes, each process loads only its own
rows of every global batch (the data pipeline's `shard_index`/`shard_count`, from `process_shard`) and
`jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
DATA_AXIS = "data"


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> bool:
    """Joins a multi-process run when a coordinator is given by flag or by JAX_COORDINATOR_ADDRESS.

    The process count and id fall back to JAX_NUM_PROCESSES / JAX_PROCESS_ID. Returns whether it initialised.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return False
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAX_PROCESS_ID"])
    # CPU processes need a collectives backend to talk to each other (no effect on GPU/TPU clients).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: all, across processes), with Auto axis types for plain data parallelism."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def describe(mesh: Mesh) -> str:
    kinds = sorted({d.device_kind for d in mesh.devices.flat})
    return (
        f"{mesh.devices.size} device(s) ({', '.join(kinds)}) in {jax.process_count()} process(es); "
        f"mesh {dict(mesh.shape)} — params replicated, batch split on {DATA_AXIS!r}"
    )


def fit_batch_size(batch_size: int, mesh: Mesh) -> int:
    """The global batch rounded down to a multiple of the device count (at least one row per device), logged."""
    n = mesh.devices.size
    fitted = max(n, batch_size // n * n)
    if fitted != batch_size:
        log.warning("batch size %d does not divide across %d devices; using %d", batch_size, n, fitted)
    return fitted


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def process_shard(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """(shard_index, shard_count) of the rows this process feeds: its devices hold rows
    [shard_index * b, (shard_index + 1) * b) of every global batch, b = global_batch // shard_count.

    Read from the mesh rather than assumed from the process index. (0, 1) with one process."""
    count = jax.process_count()
    if count == 1:
        return 0, 1
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} does not divide across {count} processes")
    rows = global_batch // count
    held = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map((global_batch,)).values()
    start = min(index[0].indices(global_batch)[0] for index in held)
    stop = max(index[0].indices(global_batch)[1] for index in held)
    if stop - start != rows or start % rows:
        raise ValueError(
            f"this process's devices hold rows {start}:{stop} of a batch of {global_batch}, not one block of {rows}: "
            "the mesh must keep each process's devices together"
        )
    return start // rows, count


def shard_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Builds global arrays split on "data" from this process's rows of the batch."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every host."""
    if jax.process_count() > 1 and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
