"""The input pipeline's C++ (JPEG region decode, resize), loaded where it builds, with
Pillow as the fallback everywhere else."""

from __future__ import annotations

import ctypes
import warnings

from shufflenet_jax.kernels.build import NativeBuildError, load_library


def load_or_warn(source: str, what: str, libraries: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """kernels/csrc/`source` built and loaded, or None with one warning (`what` unavailable,
    Pillow's used instead) where it does not build or load here."""
    try:
        return load_library(source, libraries)
    except NativeBuildError as e:
        warnings.warn(f"{what} unavailable, using Pillow's: {e}", stacklevel=4)
        return None
