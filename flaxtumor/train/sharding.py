"""Data parallelism: one mesh over every device, replicated state, batches split on the "data" axis.

Multi-host uses JAX's own runtime: `jax.distributed.initialize` joins the processes, each process feeds its own rows
of the global batch and `jax.make_array_from_process_local_data` assembles the global array.
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


def process_rows(global_batch: int) -> slice:
    """The rows of a global batch that this process feeds (all of them with one process)."""
    per_process = global_batch // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Builds global arrays split on "data" from this process's rows of the batch."""
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every host."""
    if jax.process_count() > 1 and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
