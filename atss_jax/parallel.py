"""Data parallelism: the device mesh, and moving batches between hosts' numpy arrays and global arrays.

Every device of every host is one position on a 1-D mesh whose axis is named ``AXIS``. Steps are
written for one device's share of the batch with collectives over ``AXIS`` (pmap semantics) and
mapped with ``shard_map``; a host feeds only its own rows of each global batch.
"""

from __future__ import annotations

import jax
import numpy as np
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


def describe_devices() -> str:
    """One line for the start of every run: backend, device kind and count, this process of all processes."""
    devices = jax.local_devices()
    return (f"JAX backend {jax.default_backend()}: {len(devices)} local x {devices[0].device_kind}, "
            f"{jax.device_count()} devices in all; process {jax.process_index()} of {jax.process_count()}")
