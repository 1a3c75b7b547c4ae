"""The inference network's fused calls: the stem with its max-pool, and whole stages.

On the CPU in float32 each is one C++ call (`native`); elsewhere it is the same function
through XLA, given as a callable and chosen when the computation is lowered.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax

from shufflenet_jax.ops import native
from shufflenet_jax.ops.platform import native_usable

Array = jax.Array


def fused_stage(
    x: Array,
    units: list[native.UnitWeights | native.DownUnitWeights],
    eps: float | None,
    layers: Callable[[], Array],
) -> Array:
    """`native.shuffle_stage(x, units, eps)` when compiling for the CPU in float32 with the C++
    kernels built and one eps for all BatchNorms (None: they differ); otherwise `layers()`,
    the same stage computed by XLA."""
    flat = [a for unit in units for a in unit]
    if eps is None or not native_usable(x, *flat):
        return layers()
    kinds = [type(unit) for unit in units]

    def kernel(x: Array, *flat: Array) -> Array:
        it = iter(flat)
        return native.shuffle_stage(x, [k(*(next(it) for _ in k._fields)) for k in kinds], eps)

    return lax.platform_dependent(x, *flat, cpu=kernel, default=lambda *_: layers())


def fused_stem_pool(
    x: Array, kernel: Array, norm: tuple[Array, ...], eps: float, layers: Callable[[], Array]
) -> Array:
    """`native.stem_pool(x, kernel, norm, eps)` when compiling for the CPU in float32 with the
    C++ kernels built; otherwise `layers()`, the same stem and max-pool computed by XLA."""
    if not native_usable(x, kernel, *norm):
        return layers()

    def stem(x: Array, kernel: Array, *norm: Array) -> Array:
        return native.stem_pool(x, kernel, norm, eps)

    return lax.platform_dependent(x, kernel, *norm, cpu=stem, default=lambda *_: layers())
