"""The one normalization contract, torchvision's ToTensor + Normalize: uint8 images in, float32
(x / 255 - mean) / std per channel out. Each function takes NumPy arrays (the host's eval
transform) or JAX arrays (the steps, on the device) and returns the same kind."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
Images = TypeVar("Images")  # np.ndarray or jax.Array


def to_unit(images: Images) -> Images:
    """uint8 -> float32 in [0, 1], as torchvision's ToTensor."""
    return images.astype(np.float32) / np.float32(255)


def normalize(
    unit: Images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Images:
    """(x - mean) / std per channel (the last axis) of float32 images in [0, 1], as
    torchvision's Normalize."""
    return (unit - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def standardize(
    images: Images, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Images:
    """uint8 images -> normalized float32: `normalize(to_unit(images))`, evaluation's
    preprocessing after the center crop."""
    return normalize(to_unit(images), mean, std)
