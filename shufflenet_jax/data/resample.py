"""The training crop's resize on the host: C++ (`kernels/csrc/resample.cc`) where it builds, else
Pillow's. Pillow's scalar bilinear passes took most of a crop's time (docs/input_pipeline.md)."""

from __future__ import annotations

import ctypes
import functools
import math

import numpy as np
from PIL import Image

from shufflenet_jax.kernels.build import load_or_warn

Box = tuple[float, float, float, float]


@functools.cache
def _resize_rgb():
    """The C++ function, or None (with one warning) where the library does not build here."""
    library, _ = load_or_warn("resample", "C++ resize", "using Pillow's")
    if library is None:
        return None
    f = library.ShufflenetResizeRgb
    i64, f64 = ctypes.c_int64, ctypes.c_double
    f.argtypes = [ctypes.c_void_p, *[i64] * 7, f64, f64, f64, f64, i64, i64, ctypes.c_int]
    f.argtypes += [ctypes.c_void_p]
    f.restype = ctypes.c_int
    return f


def available() -> bool:
    """Whether the C++ resize builds and loads here (compiled once, then cached on disk)."""
    return _resize_rgb() is not None


def source_window(box: Box, size: int, shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """(rows, columns): the half-open ranges of an image of `shape` (height, width) that
    resizing `box` to size x size reads (a triangle filter of half-width max(1, downscale)
    around each output's centre), with a pixel to spare."""

    def span(start: float, end: float, limit: int) -> tuple[int, int]:
        support = max((end - start) / size, 1.0)
        return max(0, math.floor(start - support)), min(limit, math.ceil(end + support) + 1)

    left, top, right, bottom = box
    return span(top, bottom, shape[0]), span(left, right, shape[1])


def resized_crop(
    pixels: np.ndarray,
    box: Box,
    size: int,
    flip: bool,
    origin: tuple[int, int] = (0, 0),
    shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """`box` (left, top, right, bottom) of an RGB image resized to size x size, uint8 HWC,
    mirrored left-right if `flip`: Pillow's BILINEAR `resize(box=...)` to one intensity level
    (the C++ passes round once, Pillow's after each pass). `pixels` (uint8 HWC) is the image,
    or a window of it with its first pixel at `origin` (row, column) of an image of `shape`
    (height, width) that holds `source_window`'s pixels."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"resized_crop needs RGB uint8 pixels, got {pixels.dtype} {pixels.shape}")
    resize = _resize_rgb()
    if resize is None or pixels.strides[1:] != (3, 1):
        return pillow_resized_crop(Image.fromarray(pixels), _shifted(box, origin), size, flip)
    height, width = shape or pixels.shape[:2]
    out = np.empty((size, size, 3), np.uint8)
    window = (*pixels.shape[:2], pixels.strides[0], *origin, height, width)
    status = resize(pixels.ctypes.data, *window, *box, size, size, int(flip), out.ctypes.data)
    if status == -1:
        raise ValueError(f"crop box {box} is not inside the {width}x{height} image")
    if status != 0:
        raise ValueError(
            f"the {pixels.shape[1]}x{pixels.shape[0]} window at {origin} lacks "
            f"pixels that resizing box {box} reads"
        )
    return out


def _shifted(box: Box, origin: tuple[int, int]) -> Box:
    row, col = origin
    return (box[0] - col, box[1] - row, box[2] - col, box[3] - row)


def pillow_resized_crop(image: Image.Image, box: Box, size: int, flip: bool) -> np.ndarray:
    """`resized_crop` by Pillow alone (where the C++ resize does not build, and to compare)."""
    crop = image.resize((size, size), Image.BILINEAR, box=box)
    if flip:  # in Pillow: a flipped NumPy view would make batching copy element by element
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)
