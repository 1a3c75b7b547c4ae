"""The device mesh and the batch's way onto it: a 1-D `data` axis, per-process rows."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (0: all, of every process)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices}, but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays held whole by every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch(global_batch: int, mesh: Mesh, what: str = "batch_size") -> int:
    """This process's share of `global_batch`; an error unless it splits evenly over devices."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch <= 0:
        raise ValueError(f"{what} must be a positive number of images, got {global_batch}")
    if global_batch % devices:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {devices} devices of the mesh; "
            f"use a multiple of {devices}"
        )
    return global_batch // processes


def to_global(batch: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows of the batch -> global arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
