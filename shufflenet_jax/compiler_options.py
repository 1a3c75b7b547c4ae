"""XLA's compile options for the train and inference steps, per JAX backend ("cpu", "gpu",
"tpu"): part of the CPU speed lives here, so a training loop of one's own passes
`train_compiler_options()` to `jax.jit` as the package's steps do (docs/architecture.md)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


@functools.cache
def _xla_accepts(name: str, value: Any) -> bool:
    """Whether this jaxlib's XLA knows the compile option (XLA:CPU's options come and go
    between releases; an unknown one is an error at compile time)."""
    probe = jax.jit(lambda x: x + 1, compiler_options={name: value})
    try:
        probe.lower(jnp.zeros((), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" in str(e):
            return False
        raise
    return True


def _known(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if _xla_accepts(k, v)}


def train_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for compiling a training step on `backend` (default: JAX's default backend).

    On the CPU, XLA's older loop emitters compile the backward pass's large element-wise
    fusions into faster code than the default fusion emitters, and YNNPACK's dot fusions help
    training (docs/performance.md). Other backends keep XLA's defaults; options this XLA does
    not know (newer jaxlibs dropped the loop emitters' switch) are left out.
    """
    if (backend or jax.default_backend()) == "cpu":
        return _known(
            {
                "xla_cpu_use_fusion_emitters": False,
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
            }
        )
    return {}


def eval_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for compiling an inference step on `backend` (default: JAX's default backend).

    On the CPU the 1x1 convolutions' matmuls run faster as XLA's own dot kernels than as
    YNNPACK calls; YNNPACK then keeps only the reductions (docs/performance.md).
    """
    if (backend or jax.default_backend()) == "cpu":
        return _known({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"})
    return {}
