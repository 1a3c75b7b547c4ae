"""The per-image training augmentation that runs on the device, inside the jitted step: colour
jitter as torchvision's ColorJitter(s, s, s) draws it, normalization, on uint8 NHWC batches.

The host sends uint8 crops (a quarter of float32's bytes); each image's random factors come
from a key derived from (seed, step, position in the global batch), so a resumed run draws the
same ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from shufflenet_jax.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize, to_unit

Array = jax.Array
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def jitter_params(key: Array, strength: float) -> tuple[Array, Array]:
    """(order, factors): a uniform permutation of (brightness, contrast, saturation) and one
    factor each, uniform in [max(0, 1 - s), 1 + s], as torchvision's ColorJitter.get_params."""
    k_order, k_factors = jax.random.split(key)
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return jax.random.permutation(k_order, 3), jax.random.uniform(
        k_factors, (3,), minval=lo, maxval=hi
    )


def color_jitter(x: Array, order: Array, factors: Array) -> Array:
    """One float32 HWC image in [0, 1] with brightness (0), contrast (1) and saturation (2)
    applied in `order`, each by its factor, clipped to [0, 1] after each (torchvision's blends)."""
    gray_weights = jnp.asarray(GRAY_WEIGHTS, x.dtype)

    def brightness(x, f):
        return x * f

    def contrast(x, f):
        m = jnp.mean(x @ gray_weights)
        return (x - m) * f + m

    def saturation(x, f):
        g = (x @ gray_weights)[..., None]
        return (x - g) * f + g

    for position in range(3):
        op = order[position]
        x = jax.lax.switch(op, (brightness, contrast, saturation), x, factors[op])
        x = jnp.clip(x, 0.0, 1.0)
    return x


def make_augment(
    seed: int,
    strength: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Array, Array], Array]:
    """`augment(step, images)`: uint8 NHWC -> float32 normalized, colour-jittered with
    `strength` (0: none) by per-image keys from (seed, step, index in the batch)."""

    def augment(step: Array, images: Array) -> Array:
        unit = to_unit(images)
        if strength:
            keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), step), len(unit))
            jitter = lambda k, x: color_jitter(x, *jitter_params(k, strength))  # noqa: E731
            unit = jax.vmap(jitter)(keys, unit)
        return normalize(unit, mean, std)

    return augment
