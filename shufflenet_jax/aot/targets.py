"""Named accelerators to compile for without owning one: each gives a topology (a GPU from
its XLA target description, a TPU slice by name) and a mesh for the steps' `data` axis.

Per-device peak and memory figures: GPUs' memory size and bandwidth from their description
(specs/, XLA's files), their dense bfloat16 peak from NVIDIA's H100/H200 datasheets; TPUs' from
Google Cloud's v5e and v6e pages. They size the estimates of `shufflenet_jax.aot.compile`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from jax.experimental import topologies
from jax.sharding import Mesh

from shufflenet_jax.train import parallel

SPECS = Path(__file__).parent / "specs"
# Fields of XLA's newer GPU descriptions that jax 0.10's CUDA plugin refuses (specs/README.md).
_NEWER_FIELDS = (
    "mem_clock_ghz",
    "reserved_shared_memory_per_block",
    "max_blocks_per_multiprocessor",
    "collective_memory_granularity",
)
INSTALL_HINT = 'pip install -e ".[aot]" (no GPU or TPU needed)'


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator configuration; memory, bandwidth and peak are per device."""

    name: str
    backend: str  # JAX's backend name: "gpu" (CUDA) or "tpu"
    topology: str  # jax.experimental.topologies' name: "1x1x8" (GPUs), "v5e:2x2" (TPUs)
    devices: int
    hbm_bytes: int
    hbm_bytes_per_s: float
    peak_bf16_flops: float
    spec: str | None = None  # GPU: its XLA target description in specs/


def _spec_field(spec: str, field: str) -> int:
    """A top-level number of a GPU description (`memory_bandwidth: 3352320000000`)."""
    m = re.search(rf"^\s*{field}: (\d+)$", (SPECS / spec).read_text(), re.MULTILINE)
    if m is None:
        raise ValueError(f"{spec} has no {field}")
    return int(m.group(1))


def _gpu(name: str, spec: str, devices: int, peak_bf16_flops: float) -> Target:
    return Target(
        name=name,
        backend="gpu",
        topology=f"1x1x{devices}",
        devices=devices,
        hbm_bytes=_spec_field(spec, "device_memory_size"),
        hbm_bytes_per_s=float(_spec_field(spec, "memory_bandwidth")),
        peak_bf16_flops=peak_bf16_flops,
        spec=spec,
    )


def _tpu(name: str, chips: int, hbm_gib: int, bandwidth: float, peak: float) -> Target:
    return Target(name, "tpu", name, chips, hbm_gib * 2**30, bandwidth, peak)


H100_BF16_DENSE = 989.4e12  # H100 SXM and H200: the same Hopper tensor cores and clocks
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        _gpu("h100", "h100_sxm.txtpb", 1, H100_BF16_DENSE),
        _gpu("h100x8", "h100_sxm.txtpb", 8, H100_BF16_DENSE),
        _gpu("h200", "h200.txtpb", 1, H100_BF16_DENSE),
        _gpu("h200x8", "h200.txtpb", 8, H100_BF16_DENSE),
        _tpu("v5e:2x2", 4, 16, 819e9, 197e12),
        _tpu("v6e:2x2", 4, 32, 1638e9, 918e12),
    )
}


# The share of a GPU's memory JAX's allocator takes for programs by default
# (XLA_PYTHON_CLIENT_MEM_FRACTION); XLA:GPU's own memory limit when compiling is below it too.
GPU_MEMORY_FRACTION = 0.75


def usable_bytes(target: Target) -> int:
    """The memory a step may use on one device of `target`: on a GPU the fraction JAX's
    allocator preallocates (`XLA_PYTHON_CLIENT_MEM_FRACTION`, default 0.75), on a TPU all."""
    if target.backend != "gpu":
        return target.hbm_bytes
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
    return int(fraction * target.hbm_bytes)


def get(name: str) -> Target:
    """The target called `name`; a one-line error naming the known ones."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def check_plugin(target: Target) -> None:
    """A one-line error naming what to install when the target's compiler is missing."""
    if target.backend == "gpu" and not any(
        importlib.util.find_spec(m) for m in ("jax_cuda13_plugin", "jax_cuda12_plugin")
    ):
        raise ValueError(f"compiling for {target.name} needs JAX's CUDA plugin: {INSTALL_HINT}")
    if target.backend == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"compiling for {target.name} needs libtpu: {INSTALL_HINT}")


def topology(target: Target) -> Any:
    """The target's devices, described for the compiler (nothing is attached)."""
    check_plugin(target)
    if target.backend == "tpu":
        # libtpu takes a machine-wide lock on its first load, for the chips; a deviceless
        # compile uses none, so other processes compiling at once (pytest -n 2) need not wait
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        return topologies.get_topology_desc(target.topology, "tpu")
    text = (SPECS / target.spec).read_text()
    try:
        return _gpu_topology(target, text)
    except Exception as e:  # noqa: BLE001  (jax 0.10's plugin refuses the newer fields)
        if "GpuTargetConfigProto" not in str(e) and not any(f in str(e) for f in _NEWER_FIELDS):
            raise
        older = "\n".join(
            line for line in text.splitlines() if line.strip().split(":")[0] not in _NEWER_FIELDS
        )
        return _gpu_topology(target, older)


def _gpu_topology(target: Target, text: str) -> Any:
    return topologies.get_topology_desc(
        platform="cuda", topology=target.topology, target_config=text
    )


def make_mesh(target: Target, num_devices: int = 0) -> Mesh:
    """`train.parallel.mesh_over` the target's first `num_devices` devices (0: all of them)."""
    return parallel.mesh_over(topology(target).devices[: num_devices or target.devices])
