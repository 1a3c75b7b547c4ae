"""The inference network's fused calls: the stem with its max-pool, and whole stages.

On the CPU in float32, with the "cpp" kernel family, each is one C++ call (`kernels`);
elsewhere it is the same function through XLA, given as a callable and chosen when the
computation is lowered (`platform`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax

from shufflenet_jax import kernels as cpp
from shufflenet_jax.kernels import ConvNorm
from shufflenet_jax.ops.dispatch import on_cpu_or_layers

Array = jax.Array


class UnitConvs(NamedTuple):
    """An inference unit's convolutions, each an HWIO weight with its inference BatchNorm's
    (gamma, beta, mean, var): branch 2's 1x1, 3x3 depthwise and 1x1, and a stride-2 unit's
    branch 1 (3x3 depthwise, 1x1; empty for stride 1)."""

    branch2: tuple[ConvNorm, ConvNorm, ConvNorm]
    branch1: tuple[ConvNorm, ...] = ()


def fused_stage(
    x: Array,
    units: list[UnitConvs],
    eps: float | None,
    layers: Callable[[], Array],
    kernels: str,
) -> Array:
    """The stage of `units` as one C++ call (`kernels.shuffle_stage`) where lowered for the CPU
    in float32 with the "cpp" `kernels` family and one eps for all BatchNorms (None: they differ);
    otherwise `layers()`, the same stage computed by XLA."""
    if eps is None:
        return layers()
    packed = [cpp.pack_unit(*unit) for unit in units]
    kinds = [type(unit) for unit in packed]

    def kernel(x: Array, *flat: Array) -> Array:
        it = iter(flat)
        return cpp.shuffle_stage(x, [k(*(next(it) for _ in k._fields)) for k in kinds], eps)

    return on_cpu_or_layers(kernels, kernel, layers, x, *(a for unit in packed for a in unit))


def fused_stem_pool(
    x: Array,
    weight: Array,
    norm: tuple[Array, ...],
    eps: float,
    layers: Callable[[], Array],
    kernels: str,
) -> Array:
    """The stem and max-pool as one C++ call (`kernels.stem_pool`) where lowered for the CPU
    in float32 with the "cpp" `kernels` family; otherwise `layers()`, the same through XLA."""

    def stem(x: Array, weight: Array, *norm: Array) -> Array:
        return cpp.stem_pool(x, weight, norm, eps)

    return on_cpu_or_layers(kernels, stem, layers, x, weight, *norm)
