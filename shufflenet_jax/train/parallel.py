"""The device mesh and the batch's way onto it: a 1-D `data` axis, per-process rows, copied
ahead of the step by a background thread."""

from __future__ import annotations

import itertools
import json
import queue
import threading
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost

DATA_AXIS = "data"  # the one mesh axis: data parallelism


def mesh_over(devices: Any) -> Mesh:
    """The 1-D `DATA_AXIS` mesh over `devices` (this process's, or a target's described ones):
    how every mesh of the package is built."""
    return Mesh(np.array(devices), (DATA_AXIS,))


def make_mesh(num_devices: int = 0) -> Mesh:
    """`mesh_over` the first `num_devices` devices (0: all, of every process)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices}, but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return mesh_over(devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the mesh."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


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


# How long a process waits for the others to finish compiling a step: a whole-network compile
# took 30-60 s on a 2-vCPU AMD EPYC (Zen 3) under a parallel test run, minutes on a large model.
COMPILE_BARRIER_S = 1800
_barrier_ids = itertools.count()  # a barrier's key is used once; processes count alike


class CompiledTogether:
    """A jitted step that, across processes, compiles on its first call and then waits until
    every process has compiled it before running: the first collective's CPU transport (gloo)
    gives the others only 30 s to arrive, less than compile times differ on a loaded machine.
    The coordination service's barrier waits `COMPILE_BARRIER_S`. Later calls take the same
    shapes (train and padded eval batches do)."""

    def __init__(self, jitted: Callable, name: str) -> None:
        self._jitted, self._name, self._compiled = jitted, name, None

    def __call__(self, *args: Any) -> Any:
        if self._compiled is None:
            self._compiled = self._jitted.lower(*args).compile()
            wait = multihost.get_barrier_sync_fn()
            key = f"compiled_{self._name}_{next(_barrier_ids)}"
            wait(key=key, timeout_ms=COMPILE_BARRIER_S * 1000)
        return self._compiled(*args)


def compiled_together(jitted: Callable, name: str) -> Callable:
    """`jitted` itself in one process; across processes a `CompiledTogether`."""
    return jitted if jax.process_count() == 1 else CompiledTogether(jitted, name)


class DevicePrefetch:
    """The batches of `batches` as global arrays on `sharding`, copied to the devices by a
    background thread up to `size` batches ahead, so that the copies overlap the steps.

    `position` saves, for checkpoints, the state `get_state()` of the data iterator had right
    after the last batch handed out (not after those prefetched), so a resume repeats no batch
    and skips none. Host memory held: `size` batches on the devices plus one in flight.
    """

    _DONE = object()

    def __init__(
        self, batches: Any, sharding: NamedSharding, size: int, get_state: Any = None
    ) -> None:
        if size < 1:
            raise ValueError(f"prefetch size must be at least one batch, got {size}")
        self._batches, self._sharding, self._get_state = batches, sharding, get_state
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._state = get_state() if get_state is not None else None
        self._thread = threading.Thread(target=self._fill, name="device_prefetch", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for batch in self._batches:
                state = self._get_state() if self._get_state is not None else None
                if not self._put((to_global(batch, self._sharding), state)):
                    return
            self._put((self._DONE, None))
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, raised there)
            self._put((e, None))

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch, state = self._queue.get()
        if batch is self._DONE:
            raise StopIteration
        if isinstance(batch, BaseException):
            raise batch
        self._state = state
        return batch

    @property
    def position(self) -> _Position:
        """What grain's checkpoint handler saves: the state after the last batch handed out."""
        return _Position(lambda: self._state)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class _Position:
    """Quacks like a grain iterator for `grain.checkpoint.CheckpointSave`: JSON bytes."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def get_state(self) -> bytes:
        return json.dumps(self._state(), indent=4).encode()
