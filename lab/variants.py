"""Every formulation of each op by name, with the alternatives that only experiments use,
for injecting into the model: `ShuffleNetV2(..., impl=variants.named_impl(depthwise="shifted"))`.
All compute the same function (tests/test_models.py, tests/test_ops.py); they differ in how
XLA compiles them. The library's defaults and the XLA formulations they are built from live
in `shufflenet_jax.ops`; the alternatives below are defined here."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflenet_jax import ops
from shufflenet_jax.model.layers import Impl
from shufflenet_jax.ops import conv, dispatch
from shufflenet_jax.ops.common import accumulation_dtype

Array = jax.Array


def channel_shuffle_stack(x: Array, groups: int) -> Array:
    """`ops.channel_shuffle` written as split, stack on a new last axis, reshape (no
    transpose op)."""
    n, h, w, c = x.shape
    return jnp.stack(jnp.split(x, groups, axis=-1), axis=-1).reshape(n, h, w, c)


def channel_shuffle_gather(x: Array, groups: int) -> Array:
    """`ops.channel_shuffle` as a gather with the permutation's index vector."""
    c = x.shape[-1]
    perm = jnp.arange(c).reshape(groups, c // groups).T.reshape(c)
    return jnp.take(x, perm, axis=-1)


def pointwise_einsum(x: Array, kernel: Array) -> Array:
    """1x1 convolution as a 4-D einsum over the channels."""
    acc = accumulation_dtype(x.dtype)
    k = kernel[0, 0].astype(x.dtype)
    return jnp.einsum("nhwc,cd->nhwd", x, k, preferred_element_type=acc).astype(x.dtype)


DENSE = {
    "lax": ops.conv_lax,
    "im2col": conv.conv_im2col,
    "taps": conv.conv_taps,
    "cpp": ops.conv_cpp,
}
DEPTHWISE = {
    "lax": ops.depthwise_lax,
    "shifted": conv.depthwise_shifted,
    "cpp": ops.depthwise_cpp,
}
POINTWISE = {"lax": ops.pointwise_lax, "dot": ops.pointwise_dot, "einsum": pointwise_einsum}
SHUFFLE = {
    "transpose": ops.channel_shuffle,
    "stack": channel_shuffle_stack,
    "gather": channel_shuffle_gather,
}
FUSED = {"fused": True, "layers": False}
KERNELS = {name: name for name in dispatch.KERNELS}
CATALOGS = {
    "kernels": KERNELS,
    "dense": DENSE,
    "depthwise": DEPTHWISE,
    "pointwise": POINTWISE,
    "shuffle": SHUFFLE,
    "fused": FUSED,
}


def named_impl(**names: str) -> Impl:
    """`Impl` from catalog names, e.g. `named_impl(dense="lax", fused="layers")`; the rest
    keep the defaults. An unknown op or name is an error that lists the choices."""
    chosen = {}
    for op, name in names.items():
        if op not in CATALOGS:
            raise ValueError(f"unknown op {op!r}; choose from {sorted(CATALOGS)}")
        if name not in CATALOGS[op]:
            raise ValueError(
                f"unknown {op} implementation {name!r}; choose from {sorted(CATALOGS[op])}"
            )
        chosen[op] = CATALOGS[op][name]
    fused = chosen.pop("fused", True)
    return Impl(**chosen, fused_inference=fused)


def parse(spec: str) -> Impl:
    """`Impl` from "op:name,op:name" (e.g. "dense:lax,fused:layers"; empty: the defaults)."""
    pairs = [item.split(":", 1) for item in spec.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"expected op:name pairs separated by commas, got {spec!r}")
    return named_impl(**dict(pairs))
