"""Max-pooling (PyTorch's 3x3 stride 2, padding 1) and global average pooling."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from shufflenet_jax.ops.common import accumulation_dtype, windows

Array = jax.Array


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
    """PyTorch's MaxPool2d(3, stride=2, padding=1); padding never wins the max.

    The maximum of the nine strided views, one element-wise loop (XLA CPU's `reduce_window` is a
    separate, slower loop). The gradient goes to the first maximum of each window in row-major
    order, as PyTorch's does; it too is element-wise over the views, where XLA's own
    `reduce_window` gradient (select-and-scatter) takes about twice as long (benchmarks/ops.py).
    """
    views = windows(x, 3, 3, 2, pad_value=-jnp.inf)
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    out = max_pool_3x3_s2.fun(x)
    return out, (x, out)


def _max_pool_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, out = res
    # overlapping windows add up to four gradients per input: in the accumulation dtype
    acc = accumulation_dtype(x.dtype)
    views, to_input = jax.vjp(lambda x: windows(x.astype(acc), 3, 3, 2, -jnp.inf), x)
    taken = jnp.zeros(out.shape, bool)
    routed = []
    g, out = g.astype(acc), out.astype(acc)
    for v in views:
        hit = (v == out) & ~taken
        taken = taken | hit
        routed.append(jnp.where(hit, g, jnp.zeros_like(g)))
    return to_input(routed)


def global_average_pool(x: Array) -> Array:
    """Mean over H and W of NHWC x, in the accumulation dtype (float32 for bfloat16 x), so the
    classifier after it runs at that precision too."""
    return x.astype(accumulation_dtype(x.dtype)).mean(axis=(1, 2))


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
