"""Named implementations of each op, for experiments that inject them into the model:
`ShuffleNetV2(..., ops=variants.named_ops(depthwise="shifted"))`. All compute the same
function (tests/test_models.py, tests/test_ops.py); they differ in how XLA compiles them."""

from __future__ import annotations

from shufflenet_jax import ops
from shufflenet_jax.model.layers import Ops

DENSE = {
    "lax": ops.conv_lax,
    "im2col": ops.conv_im2col,
    "taps": ops.conv_taps,
    "native": ops.conv_native,
}
DEPTHWISE = {
    "lax": ops.depthwise_lax,
    "shifted": ops.depthwise_shifted,
    "native": ops.depthwise_native,
}
POINTWISE = {"lax": ops.pointwise_lax, "dot": ops.pointwise_dot, "einsum": ops.pointwise_einsum}
SHUFFLE = {
    "transpose": ops.channel_shuffle,
    "stack": ops.channel_shuffle_stack,
    "gather": ops.channel_shuffle_gather,
}
FUSED = {"native": True, "layers": False}
CATALOGS = {
    "dense": DENSE,
    "depthwise": DEPTHWISE,
    "pointwise": POINTWISE,
    "shuffle": SHUFFLE,
    "fused": FUSED,
}


def named_ops(**names: str) -> Ops:
    """`Ops` from catalog names, e.g. `named_ops(dense="lax", fused="layers")`; the rest keep
    the defaults. An unknown op or name is an error that lists the choices."""
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
    return Ops(**chosen, fused_inference=fused)


def parse(spec: str) -> Ops:
    """`Ops` from "op:name,op:name" (e.g. "dense:lax,fused:layers"; empty: the defaults)."""
    pairs = [item.split(":", 1) for item in spec.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"expected op:name pairs separated by commas, got {spec!r}")
    return named_ops(**dict(pairs))
