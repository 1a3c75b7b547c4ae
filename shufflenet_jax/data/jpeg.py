"""Decoding only the rows and columns of a JPEG that a training crop reads: C++ through the
system's libjpeg-turbo (`kernels/csrc/jpeg.cc`), with the pixels of Pillow's full decode. Where the
library does not build, or libjpeg fails or warns on a file, callers decode with Pillow."""

from __future__ import annotations

import ctypes
import functools

import numpy as np

from shufflenet_jax.kernels.build import load_or_warn

_MAGIC = b"\xff\xd8"  # start of image


@functools.cache
def _library():
    """The C++ functions, or None (with one warning) where they do not build here."""
    library, _ = load_or_warn("jpeg", "C++ JPEG decoder", "using Pillow's")
    if library is None:
        return None
    i64, out = ctypes.c_int64, ctypes.POINTER(ctypes.c_int64)
    library.ShufflenetJpegSize.argtypes = [ctypes.c_char_p, i64, out, out]
    region = library.ShufflenetJpegDecodeRegion
    region.argtypes = [ctypes.c_char_p, i64, ctypes.c_int, i64, i64, i64, i64]
    region.argtypes += [ctypes.c_void_p, i64, i64, out, out]
    return library


def available() -> bool:
    """Whether the C++ decoder builds and loads here (compiled once, then cached on disk)."""
    return _library() is not None


def size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's header; None for other formats, an unreadable header, or
    where the C++ decoder is unavailable."""
    library = _library() if data.startswith(_MAGIC) else None
    width, height = ctypes.c_int64(), ctypes.c_int64()
    if library is None or library.ShufflenetJpegSize(data, len(data), width, height) != 0:
        return None
    return width.value, height.value


def draft_scale(width: int, height: int, request: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's `Image.draft` picks for a requested size."""
    most = min(width // request[0], height // request[1])
    return next(s for s in (8, 4, 2, 1) if most >= s)


def decode_region(
    data: bytes, scale: int, rows: tuple[int, int], cols: tuple[int, int]
) -> tuple[np.ndarray, int] | None:
    """Rows [r0, r1) of the JPEG decoded at 1/scale, RGB uint8, as columns starting at the
    returned first column (at or left of c0) and reaching at least c1; None where libjpeg fails
    or warns (a corrupt file, an unsupported colour space: Pillow decides). ValueError for a
    region outside the scaled image."""
    (r0, r1), (c0, c1) = rows, cols
    capacity = c1 - c0 + 64  # the block alignment and the margin jpeg.cc adds
    out = np.empty((r1 - r0, capacity, 3), np.uint8)
    first, count = ctypes.c_int64(), ctypes.c_int64()
    args = (scale, r0, r1, c0, c1, out.ctypes.data, out.strides[0], capacity, first, count)
    status = _library().ShufflenetJpegDecodeRegion(data, len(data), *args)
    if status == 2:
        raise ValueError(f"rows {rows} x columns {cols} are not inside the JPEG at 1/{scale}")
    if status != 0:
        return None
    return out[:, : count.value], first.value
