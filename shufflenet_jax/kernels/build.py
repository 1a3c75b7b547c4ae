"""Compiling the package's C++ (`csrc/`, the libraries in `LIBRARIES`) with g++ into an
on-disk cache, and loading it: the one loader of all of the package's C++.

Each library is compiled with `$CXX` (default `g++`) for this machine (or the `-march` in
`$SHUFFLENET_JAX_MARCH`) into `$SHUFFLENET_JAX_CACHE` (default `~/.cache/shufflenet_jax`),
keyed by its source and headers, the jaxlib version, the flags and the CPU model, so later
processes load it as built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jaxlib

CSRC = Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-std=c++17", "-fPIC")


class CppBuildError(RuntimeError):
    """A C++ library could not be compiled or loaded on this machine."""


def march() -> str:
    """g++'s -march: this CPU's own instruction set unless $SHUFFLENET_JAX_MARCH names
    another (x86-64-v3, AVX2 and FMA with 16 vector registers, checks that build on an
    AVX-512 machine; the kernels pick their register blocking from it)."""
    return os.environ.get("SHUFFLENET_JAX_MARCH", "native")


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "shufflenet_jax"
    return Path(os.environ.get("SHUFFLENET_JAX_CACHE", default))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line for line in f if line.startswith(("model name", "flags"))]
    except OSError:
        names = []
    return "".join(names[:2]) or platform.processor()


# Every C++ library of the package: its sources in csrc/ and the system libraries it links.
LIBRARIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "kernels": (("depthwise_grad.cc", "dense_grad.cc", "batch_norm.cc", "inference.cc"), ()),
    "jpeg": (("jpeg.cc",), ("jpeg",)),
    "resample": (("resample.cc",), ()),
}


def build_library(name: str, csrc: Path = CSRC) -> Path:
    """Compiles library `name` (`LIBRARIES`) from its sources in `csrc`, unless a build of
    these exact sources is cached; its path."""
    if name not in LIBRARIES:
        raise ValueError(f"unknown C++ library {name!r}; the package has {', '.join(LIBRARIES)}")
    files, libraries = LIBRARIES[name]
    sources = [csrc / f for f in files]
    compiler = os.environ.get("CXX", "g++")
    headers = sorted(csrc.glob("*.h"))  # the sources include them: in the key
    source = b"".join(p.read_bytes() for p in [*sources, *headers])
    key = hashlib.sha256(
        source
        + jaxlib.__version__.encode()
        + compiler.encode()
        + " ".join((*_FLAGS, march(), *libraries)).encode()
        + _cpu_model().encode()  # -march=native: a shared cache must not mix CPU models
    ).hexdigest()[:16]
    cache = _cache_dir()
    lib = cache / f"{name}-{key}.so"
    if lib.exists():
        return lib
    if shutil.which(compiler) is None:
        raise CppBuildError(
            f"C++ compiler {compiler!r} not found (set CXX); needed to build {name}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        _compile_and_link(compiler, sources, libraries, tmp)
    except CppBuildError as e:
        os.unlink(tmp)
        raise CppBuildError(f"compiling {name} failed:\n{e}") from None
    os.replace(tmp, lib)
    return lib


def _compile_and_link(
    compiler: str, sources: list[Path], libraries: tuple[str, ...], out: str
) -> None:
    """Each source compiled to an object file at once (one g++ a source: the kernels' four
    build in the time of the largest), then linked into the shared library `out`."""
    compile_flags = [*_FLAGS, f"-march={march()}", "-isystem", jax.ffi.include_dir(), "-c"]
    with tempfile.TemporaryDirectory() as objects:
        jobs = []
        for i, source in enumerate(sources):
            cmd = [compiler, *compile_flags, str(source), "-o", f"{objects}/{i}.o"]
            jobs.append((cmd, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)))
        failed = []
        for cmd, job in jobs:  # every g++ finishes before an error is raised
            err = job.communicate()[1]
            if job.returncode:
                failed.append(f"{' '.join(cmd)}\n{err}")
        if failed:
            raise CppBuildError("\n".join(failed))
        cmd = [compiler, "-shared", *(f"{objects}/{i}.o" for i in range(len(sources)))]
        cmd += ["-o", out, *(f"-l{lib_name}" for lib_name in libraries)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CppBuildError(f"{' '.join(cmd)}\n{done.stderr}")


def load_library(name: str) -> ctypes.CDLL:
    """Library `name` built (or found in the cache) and loaded through ctypes; CppBuildError
    with the reason where it does not build or load here."""
    try:
        return ctypes.cdll.LoadLibrary(str(build_library(name)))
    except OSError as e:
        raise CppBuildError(f"loading {name} failed: {e}") from e


def load_or_warn(name: str, what: str, instead: str) -> tuple[ctypes.CDLL | None, str]:
    """(`load_library`, ""), or (None, the reason) with one warning, "`what` unavailable,
    `instead`: the reason", where it does not build or load here: how every user of the
    package's C++ loads it."""
    try:
        return load_library(name), ""
    except CppBuildError as e:
        warnings.warn(f"{what} unavailable, {instead}: {e}", stacklevel=3)
        return None, str(e)
