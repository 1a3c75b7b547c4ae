"""Process start-up, in one explicit function that train.py, eval.py and the benchmarks call
first: host malloc, multi-host initialization, the chosen kernel family's C++ built and
registered. Importing it changes nothing. A training loop of one's own calls it too: part of
the CPU speed is the malloc setting below (docs/architecture.md).

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
import logging
import os
import sys
import traceback

import jax
from absl import flags

from shufflenet_jax.ops.dispatch import check_kernels

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


CLUSTERS = {  # JAX's cluster detectors, by the name a log line gives them
    "SlurmCluster": "SLURM",
    "OmpiCluster": "Open MPI",
    "K8sCluster": "Kubernetes",
    "GceTpuCluster": "a Cloud TPU slice (GCE)",
    "GkeTpuCluster": "a Cloud TPU slice (GKE)",
}


def cluster_environment() -> str | None:
    """The cluster environment `jax.distributed.initialize()` would start every process from
    (`CLUSTERS`: SLURM, Open MPI, Kubernetes with JAX's [k8s] extra, a Cloud TPU slice), or
    None. JAX has no public API for its detection, so this asks its detectors directly."""
    from jax._src import clusters

    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return CLUSTERS.get(env.__name__, env.__name__)
    return None


def setup_process(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    kernels: str = "cpp",
) -> list[str]:
    """Process-wide settings, to call before any JAX computation; returns what it did, a line
    each, for the program's log.

    On the CPU backend: `reuse_freed_host_memory`, and with the "cpp" `kernels` family (the
    one the program's models are given, `Impl.kernels`) the C++ kernels built or loaded
    (`kernels.load()`, else done at the first trace), before `jax.distributed.initialize`
    (CPU collectives over gloo), so that processes compiling at different speeds meet at its
    barrier rather than time out at the first collective's 30 seconds; orbax's barriers on the
    coordination service too. Multi-process when `coordinator_address` is given (the other two
    then default to what a cluster environment says) or a `cluster_environment` is present;
    one process otherwise. Marks absl's flags parsed for grain's worker processes when the
    program did not parse them, and keeps TensorStore's late callbacks after a failed
    checkpoint read or write out of the output.
    """
    lines = [_setup_malloc()]
    cpp = check_kernels(kernels) == "cpp"
    if cpp and cpu_is_default_backend():
        lines.append(_load_kernels())
    cluster = None if coordinator_address else cluster_environment()
    if coordinator_address or cluster:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        source = f"from {cluster}'s environment" if cluster else f"via {coordinator_address}"
        index = jax.process_index() if process_id is None else process_id
        count = jax.process_count() if num_processes is None else num_processes
        lines.append(f"distributed: process {index} of {count} ({source})")
        lines.append(_orbax_barriers_on_coordination_service())
    if cpp and not cpu_is_default_backend() and jax.default_backend() == "cpu":
        lines.append(_load_kernels())  # an accelerator plugin without its device: the CPU runs
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    _quiet_closed_event_loop_callbacks()
    return lines


def print_setup(lines: list[str]) -> None:
    """A program's report of `setup_process`: the distributed start always (which process this
    is), the rest (malloc, the C++ kernels' file) only with absl's --verbosity=1 or more."""
    verbose = flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1
    for line in lines:
        if verbose or line.startswith("distributed"):
            print(line, flush=True)


def _load_kernels() -> str:
    from shufflenet_jax import kernels

    kernels.load()
    return f"C++ kernels: {kernels.status()}"


def _orbax_barriers_on_coordination_service() -> str:
    """Orbax's process barriers (the checkpoint directory's creation, each save) as waits at
    the coordination service, up to orbax's 300 s, instead of its default, a gloo collective
    that gives the other processes 30 s to arrive: processes that load data and build the
    model at different speeds on a loaded machine reached it further apart than that."""
    from orbax.checkpoint import multihost  # defines the absl flag

    flags.FLAGS[multihost.EXPERIMENTAL_ORBAX_USE_DISTRIBUTED_BARRIER.name].value = True
    return "checkpoint barriers: the coordination service's"


def _quiet_closed_event_loop_callbacks() -> None:
    """Drops two kinds of report, from `sys.excepthook` and `sys.unraisablehook`, that follow a
    failed checkpoint read or write: TensorStore's I/O callbacks arriving after orbax closed
    their event loop, and orbax's sibling coroutines collected with the same error (the failure
    itself is reported once, as one line; thousands of these would bury it)."""
    previous, previous_unraisable = sys.excepthook, sys.unraisablehook

    def closed_loop(kind: type, value: BaseException) -> bool:
        return kind is RuntimeError and str(value) == "Event loop is closed"

    def hook(kind, value, tb):
        if not closed_loop(kind, value):
            previous(kind, value, tb)

    def orbax_leftover(report) -> bool:  # a failed read's sibling coroutines, collected
        code = getattr(report.object, "cr_code", None)
        return code is not None and "/orbax/" in code.co_filename

    def unraisable(report):
        if not (closed_loop(report.exc_type, report.exc_value) or orbax_leftover(report)):
            previous_unraisable(report)

    sys.excepthook, sys.unraisablehook = hook, unraisable
    logging.getLogger("absl").addFilter(_one_line_orbax_errors)
    logging.getLogger("asyncio").addFilter(_no_orbax_leftover_tasks)


def _no_orbax_leftover_tasks(record: logging.LogRecord) -> bool:
    """asyncio reports each failed write's task again when it is collected unretrieved."""
    if "never retrieved" not in str(record.msg):
        return True
    error = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not ("/orbax/" in record.getMessage() or any("/orbax/" in f.filename for f in frames))


def _one_line_orbax_errors(record: logging.LogRecord) -> bool:
    """orbax logs each failed background write with its traceback, several times over; keep
    the first line of each such message and drop the traceback."""
    if "/orbax/" in record.pathname and record.levelno >= logging.ERROR and record.exc_info:
        record.msg, record.args = record.getMessage().splitlines()[0][:300], None
        record.exc_info = record.exc_text = None
    return True


def _setup_malloc() -> str:
    if not cpu_is_default_backend():
        return "host malloc: glibc's defaults (the default backend is not the CPU)"
    if reuse_freed_host_memory():
        return "host malloc: freed memory kept for reuse (XLA:CPU's step buffers)"
    return "host malloc: defaults (the C library is not glibc)"
