"""Which kernel family computes an op, decided from a value the model is given
(`model.layers.Impl.kernels`), never from what the process did before: "xla", XLA's
formulation on every backend; "cpp", the package's C++ kernels (`shufflenet_jax.kernels`)
where the arrays are float32 and the program is lowered for the CPU, XLA's formulation for
any other backend (a GPU or TPU compiled for from this CPU process included), chosen at
lowering by `lax.platform_dependent`. A family that cannot run here (no C++ compiler) falls
back to XLA with one warning. Room for a GPU/TPU family sits beside "cpp" in `KERNELS`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from shufflenet_jax import kernels as cpp

Array = jax.Array

KERNELS = {
    "xla": "XLA's formulation of every op, on every backend",
    "cpp": "the C++ CPU kernels for float32 on the CPU, XLA's formulation elsewhere",
}


def check_kernels(name: str) -> str:
    """`name` if it names a kernel family, else an error listing them."""
    if name not in KERNELS:
        raise ValueError(f"unknown kernel family {name!r}; choose one of {', '.join(KERNELS)}")
    return name


def cpp_applies(kernels: str, *arrays: Array) -> bool:
    """Whether the C++ kernels replace XLA's formulation on these arrays when lowered for the
    CPU: the "cpp" family, float32 arrays, the CPU as JAX's default backend (a process on a
    GPU or TPU never lowers for the CPU, so it builds nothing), and the kernels built and
    registered here (once per process, on first use; `shufflenet_jax.kernels.load`)."""
    if kernels != "cpp" or not all(a.dtype == jnp.float32 for a in arrays):
        return False
    return jax.default_backend() == "cpu" and cpp.load()


def on_cpu(kernels: str, kernel: Callable[..., Any], otherwise: Any, *args: Array) -> Any:
    """kernel(*args) where lowered for the CPU and `cpp_applies(kernels, *args)`, else
    `otherwise` (an array or a tuple of them; chosen at lowering)."""
    if not cpp_applies(kernels, *args):
        return otherwise
    return lax.platform_dependent(
        otherwise, *args, cpu=lambda _, *a: kernel(*a), default=lambda o, *_: o
    )


def on_cpu_or_layers(
    kernels: str, kernel: Callable[..., Array], layers: Callable[[], Array], *args: Array
) -> Array:
    """kernel(*args) where lowered for the CPU and `cpp_applies(kernels, *args)`, else
    `layers()`, the same function through XLA (traced only where it may be chosen)."""
    if not cpp_applies(kernels, *args):
        return layers()
    return lax.platform_dependent(*args, cpu=kernel, default=lambda *_: layers())


def with_cpu_weight_grad(
    xla_fn: Callable[[Array, Array], Array],
    weight_grad: Callable[[Array, Array], Array],
    use_cpp: bool,
    x: Array,
    weight: Array,
    g: Array,
) -> tuple[Array, Array]:
    """xla_fn's gradients w.r.t. (x, weight) for output gradient g, the weight's from the C++
    weight_grad(x, g) instead when use_cpp and lowered for the CPU (XLA drops the other)."""
    _, pullback = jax.vjp(xla_fn, x, weight)
    dx, dw = pullback(g)
    if use_cpp:
        dw = on_cpu("cpp", weight_grad, dw, x, g)
    return dx, dw
