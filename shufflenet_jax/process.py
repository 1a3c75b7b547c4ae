"""Program-wide setup, in one explicit function that train.py, eval.py and the benchmarks call
first: host malloc, multi-host initialization, the C++ kernels. Importing it changes nothing.

Host memory: XLA:CPU allocates each execution's temporary buffer (hundreds of MB for a train
step) with malloc from one of its worker threads. glibc serves an allocation that large from a
worker thread's arena with a fresh mmap and unmaps it on free, so every step touches new pages
at a large kernel-time cost (docs/performance.md). Sending all threads to the main arena, with
mmap off and no trimming, makes the next step reuse the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

import jax
from absl import flags

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_host_memory() -> bool:
    """Configure glibc malloc to keep and reuse freed memory (one arena, no mmap, no trim).

    Call it at the start of a program, before the first JAX computation: threads that already
    own a malloc arena keep it. Returns False where the C library is not glibc (nothing is
    changed there). Peak resident memory stays claimed by the process until it exits.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def cpu_is_default_backend() -> bool:
    """Whether JAX's default backend will be the CPU, decided without starting any backend
    (starting one first would leave XLA's threads on their own malloc arenas): JAX_PLATFORMS
    names the CPU first, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    plugins = importlib.metadata.entry_points(group="jax_plugins")
    return not plugins and importlib.util.find_spec("libtpu") is None


def setup_process(
    coordinator_address: str | None = None, num_processes: int = 1, process_id: int = 0
) -> list[str]:
    """Process-wide settings, to call before any JAX computation; returns what it did, a line
    each, for the program's log.

    On the CPU backend: `reuse_freed_host_memory`. With `coordinator_address`:
    `jax.distributed.initialize` (CPU collectives over gloo). Marks absl's flags parsed for
    grain's worker processes when the program did not parse them. Then builds or loads the C++
    kernels if the CPU is the default backend, so that tracing does not run the compiler.
    """
    lines = [_setup_malloc()]
    if coordinator_address:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        lines.append(f"distributed: process {process_id} of {num_processes}")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    if cpu_is_default_backend():
        from shufflenet_jax.ops import native

        lines.append(f"C++ kernels: {native.status()}")
    return lines


def _setup_malloc() -> str:
    if not cpu_is_default_backend():
        return "host malloc: glibc's defaults (the default backend is not the CPU)"
    if reuse_freed_host_memory():
        return "host malloc: freed memory kept for reuse (XLA:CPU's step buffers)"
    return "host malloc: defaults (the C library is not glibc)"
