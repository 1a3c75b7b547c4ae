"""Where the C++ kernels apply, decided in one place: while tracing, only whether they are
loaded and the arrays are float32 (nothing is built); the platform at lowering, where
`lax.platform_dependent` keeps the C++ call for the CPU and XLA's formulation for any other
target (a GPU or TPU compiled for from this CPU process included)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from shufflenet_jax import kernels

Array = jax.Array


def kernels_apply(*arrays: Array) -> bool:
    """Whether a C++ kernel may replace XLA's formulation on these arrays when lowered for the
    CPU: float32 arrays, and the kernels loaded (`shufflenet_jax.kernels.load()`)."""
    return kernels.loaded() and all(a.dtype == jnp.float32 for a in arrays)


def on_cpu(kernel: Callable[..., Any], otherwise: Any, *args: Array) -> Any:
    """kernel(*args) where the computation is lowered for the CPU and `kernels_apply(*args)`,
    else `otherwise` (an array or a tuple of them; chosen at lowering)."""
    if not kernels_apply(*args):
        return otherwise
    return lax.platform_dependent(
        otherwise, *args, cpu=lambda _, *a: kernel(*a), default=lambda o, *_: o
    )


def on_cpu_or_layers(kernel: Callable[..., Array], layers: Callable[[], Array], *args: Array):
    """kernel(*args) where lowered for the CPU and `kernels_apply(*args)`, else `layers()`,
    the same function through XLA (traced only where it may be chosen)."""
    if not kernels_apply(*args):
        return layers()
    return lax.platform_dependent(*args, cpu=kernel, default=lambda *_: layers())


def with_cpu_kernel_grad(
    xla_fn: Callable[[Array, Array], Array],
    kernel_grad: Callable[[Array, Array], Array],
    use_kernel: bool,
    x: Array,
    kernel: Array,
    g: Array,
) -> tuple[Array, Array]:
    """xla_fn's gradients w.r.t. (x, kernel) for output gradient g, the kernel's from
    kernel_grad(x, g) instead when use_kernel and lowered for the CPU (XLA drops the other)."""
    _, pullback = jax.vjp(xla_fn, x, kernel)
    dx, dk = pullback(g)
    if use_kernel:
        dk = on_cpu(kernel_grad, dk, x, g)
    return dx, dk
