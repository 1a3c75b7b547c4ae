"""Compiling the package's C++ (`csrc/`) with g++ into an on-disk cache, and loading it.

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
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")


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


def build_library(source_path: Path, libraries: tuple[str, ...] = ()) -> Path:
    """Compiles a csrc/ file, linked with the system `libraries` (`-l` names), unless a build
    of this exact source is cached; its path."""
    compiler = os.environ.get("CXX", "g++")
    headers = sorted(source_path.parent.glob("*.h"))  # the sources include them: in the key
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in headers)
    key = hashlib.sha256(
        source
        + jaxlib.__version__.encode()
        + compiler.encode()
        + " ".join((*_FLAGS, march(), *libraries)).encode()
        + _cpu_model().encode()  # -march=native: a shared cache must not mix CPU models
    ).hexdigest()[:16]
    cache = _cache_dir()
    lib = cache / f"{source_path.stem}-{key}.so"
    if lib.exists():
        return lib
    if shutil.which(compiler) is None:
        raise CppBuildError(
            f"C++ compiler {compiler!r} not found (set CXX); needed to build {source_path.name}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent processes never load a partial file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-march={march()}", "-isystem", jax.ffi.include_dir()]
    cmd += [str(source_path), "-o", tmp, *(f"-l{name}" for name in libraries)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        name = source_path.name
        raise CppBuildError(f"compiling {name} failed:\n{' '.join(cmd)}\n{done.stderr}")
    os.replace(tmp, lib)
    return lib


def load_library(name: str, libraries: tuple[str, ...] = ()) -> ctypes.CDLL:
    """csrc/`name` built (or found in the cache) and loaded through ctypes; CppBuildError
    with the reason where it does not build or load here."""
    try:
        return ctypes.cdll.LoadLibrary(str(build_library(CSRC / name, libraries)))
    except OSError as e:
        raise CppBuildError(f"loading {name} failed: {e}") from e


def load_or_warn(
    name: str, what: str, instead: str, libraries: tuple[str, ...] = ()
) -> tuple[ctypes.CDLL | None, str]:
    """(`load_library`, ""), or (None, the reason) with one warning, "`what` unavailable,
    `instead`: the reason", where it does not build or load here: how every user of the
    package's C++ loads it."""
    try:
        return load_library(name, libraries), ""
    except CppBuildError as e:
        warnings.warn(f"{what} unavailable, {instead}: {e}", stacklevel=3)
        return None, str(e)
