"""Keep freed host memory in the process so XLA:CPU's per-step buffers stop page-faulting.

XLA:CPU allocates each execution's temporary buffer with malloc (550 MB for a batch-32
ShuffleNet V2 1.0x train step) from one of its worker threads. glibc serves an allocation that
large from a worker thread's arena with a fresh mmap and unmaps it on free, so every step touches
135,000 new pages: about 0.4 s of kernel time per step on the project's CPU machine
(docs/performance.md). Sending all threads to the main arena, with mmap off and no trimming,
makes the next step reuse the same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os

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


def setup_process() -> str:
    """Process-wide settings for train.py, eval.py and the benchmarks, to call before any JAX
    computation: on the CPU backend `reuse_freed_host_memory`, elsewhere nothing. Returns a
    line saying what it did, for the program's log."""
    if not cpu_is_default_backend():
        return "host malloc: glibc's defaults (the default backend is not the CPU)"
    if reuse_freed_host_memory():
        return "host malloc: freed memory kept for reuse (XLA:CPU's step buffers)"
    return "host malloc: defaults (the C library is not glibc)"
