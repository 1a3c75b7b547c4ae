"""Where the C++ kernels apply: the one place that knows about platforms."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from shufflenet_jax.ops import native

Array = jax.Array


def native_usable(*arrays: Array) -> bool:
    """Whether the C++ kernels apply: float32 arrays, the CPU as JAX's default backend (so
    that nothing is compiled with g++ for a GPU or TPU run) and a library that builds here."""
    float32 = all(a.dtype == jnp.float32 for a in arrays)
    return float32 and jax.default_backend() == "cpu" and native.available()


def on_cpu(kernel: Callable[..., Any], otherwise: Any, *args: Array) -> Any:
    """kernel(*args) when XLA compiles for the CPU, else `otherwise` (an array or a tuple of
    them, chosen at lowering)."""
    return lax.platform_dependent(
        otherwise, *args, cpu=lambda _, *a: kernel(*a), default=lambda o, *_: o
    )


def with_cpu_kernel_grad(
    xla_fn: Callable[[Array, Array], Array],
    kernel_grad: Callable[[Array, Array], Array],
    use_kernel: bool,
    x: Array,
    kernel: Array,
    g: Array,
) -> tuple[Array, Array]:
    """xla_fn's gradients w.r.t. (x, kernel) for output gradient g, the kernel's from
    kernel_grad(x, g) instead when use_kernel and compiling for the CPU (XLA drops the other)."""
    _, pullback = jax.vjp(xla_fn, x, kernel)
    dx, dk = pullback(g)
    if use_kernel:
        dk = on_cpu(kernel_grad, dk, x, g)
    return dx, dk
