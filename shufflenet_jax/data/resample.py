"""The training crop's resize on the host: C++ (`ops/csrc/resample.cc`) where it builds, else
Pillow's. Pillow's scalar bilinear passes took most of a crop's time (docs/input_pipeline.md)."""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from shufflenet_jax.ops import native

_SOURCE = Path(native.__file__).parent / "csrc" / "resample.cc"
Box = tuple[float, float, float, float]


@functools.cache
def _resize_rgb():
    """The C++ function, or None (with one warning) where the library does not build here."""
    try:
        library = ctypes.cdll.LoadLibrary(str(native.build_library(_SOURCE)))
    except (native.NativeBuildError, OSError) as e:
        warnings.warn(f"C++ resize unavailable, using Pillow's: {e}", stacklevel=3)
        return None
    f = library.ShufflenetResizeRgb
    i64, f64 = ctypes.c_int64, ctypes.c_double
    f.argtypes = [ctypes.c_void_p, i64, i64, i64, f64, f64, f64, f64, i64, i64, ctypes.c_int]
    f.argtypes += [ctypes.c_void_p]
    f.restype = ctypes.c_int
    return f


def resized_crop(image: Image.Image, box: Box, size: int, flip: bool) -> np.ndarray:
    """`box` (left, top, right, bottom) of an RGB image resized to size x size, uint8 HWC,
    mirrored left-right if `flip`: Pillow's BILINEAR `resize(box=...)` to one intensity level
    (the C++ passes round once, Pillow's after each pass)."""
    resize = _resize_rgb()
    if resize is None:
        return pillow_resized_crop(image, box, size, flip)
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.strides[1:] != (3, 1):
        raise ValueError(f"resized_crop needs an RGB image, got mode {image.mode}")
    out = np.empty((size, size, 3), np.uint8)
    height, width = pixels.shape[:2]
    args = (height, width, pixels.strides[0], *box, size, size, int(flip), out.ctypes.data)
    if resize(pixels.ctypes.data, *args) != 0:
        raise ValueError(f"crop box {box} is not inside the {width}x{height} image")
    return out


def pillow_resized_crop(image: Image.Image, box: Box, size: int, flip: bool) -> np.ndarray:
    """`resized_crop` by Pillow alone (where the C++ resize does not build, and to compare)."""
    crop = image.resize((size, size), Image.BILINEAR, box=box)
    if flip:  # in Pillow: a flipped NumPy view would make batching copy element by element
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(crop)
