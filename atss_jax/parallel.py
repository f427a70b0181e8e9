"""Data parallelism: the device mesh, and moving batches between hosts' numpy arrays and global arrays.

Every device of every host is one position on a 1-D mesh whose axis is named ``AXIS``. Steps are
written for one device's share of the batch with collectives over ``AXIS`` (pmap semantics) and
mapped with ``shard_map``; a host feeds only its own rows of each global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"
# Batch arrays are split over the mesh along their leading axis; states are replicated.
BATCH_SPEC = P(AXIS)
REPLICATED_SPEC = P()


def make_mesh() -> jax.sharding.Mesh:
    """A 1-D data-parallel mesh over every device of every host."""
    return jax.make_mesh((jax.device_count(),), (AXIS,))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This host's batch -> global arrays sharded over ``AXIS`` (host p's rows go to its devices)."""
    sharding = NamedSharding(mesh, BATCH_SPEC)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded array that live on this host, in this host's batch order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def is_main_process() -> bool:
    """Process 0 writes what exists once per job (merged metrics, config, exports' metadata)."""
    return jax.process_index() == 0


# What jax.distributed.initialize() says when it finds no cluster in the environment and no coordinator.
_NO_CLUSTER = "coordinator_address should be defined"


def initialize_distributed(mode: str, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Connects the processes of a multi-host job; returns whether ``jax.distributed`` was initialised.

    Must run before anything touches a JAX backend. ``mode``:
      "auto": JAX's own cluster detection, the call a Cloud TPU VM, SLURM, Open MPI, GKE or an
        exported ``JAX_COORDINATOR_ADDRESS`` needs (a TPU VM finds its slice through the metadata
        server, without any environment variable); a plain machine stays a single process.
      "on": the same call, where not finding a cluster is an error.
      "off": a single process whatever the environment.
    The explicit arguments are for clusters JAX does not detect (all three together).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}: use 'auto', 'on' or 'off'.")
    if mode == "off":
        return False
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as error:
        if mode == "auto" and coordinator_address is None and _NO_CLUSTER in str(error):
            logging.info("No cluster detected (TPU VM, SLURM, Open MPI, GKE, JAX_COORDINATOR_ADDRESS): one process.")
            return False
        raise ValueError(f"jax.distributed.initialize() failed ({error}). With --distributed=on, JAX must detect "
                         "a cluster, or pass --coordinator_address, --num_processes and --process_id.") from error
    return True


def describe_devices() -> str:
    """One line for the start of every run: backend, device kind and count, this process of all processes."""
    devices = jax.local_devices()
    return (f"JAX backend {jax.default_backend()}: {len(devices)} local x {devices[0].device_kind}, "
            f"{jax.device_count()} devices in all; process {jax.process_index()} of {jax.process_count()}")
