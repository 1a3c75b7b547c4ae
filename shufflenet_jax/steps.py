"""Pure, jittable step functions over the model's state pytrees (no NNX graph work per call)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from shufflenet_jax.models import ShuffleNetV2

Array = jax.Array


def split_model(model: ShuffleNetV2) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, batch_stats): the static structure and the two kinds of arrays."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


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

    On the CPU, XLA's older loop emitters compile the backward pass's large element-wise fusions
    (ReLU/BatchNorm gradients fused with the depthwise and max-pool gradients) into faster code
    than the default fusion emitters: about 1.25x the train-step throughput at batch 32, while
    inference is no faster. YNNPACK's dot fusions (matmuls with their neighbouring element-wise
    work) add about 1.06x to training and halve inference speed, so inference keeps the
    defaults (docs/performance.md). Other backends keep XLA's defaults; options this XLA
    does not know (newer jaxlibs dropped the loop emitters' switch) are left out.
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
    YNNPACK calls (YNNPACK then keeps only the reductions): 1.08-1.23x inference at batches 4 to
    32, between 0.88x and 1.19x in five alternating runs at batch 1 (docs/performance.md).
    """
    if (backend or jax.default_backend()) == "cpu":
        return _known({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"})
    return {}


def make_eval_step(
    graphdef: nnx.GraphDef, compiler_options: dict[str, Any] | None = None
) -> Callable[[nnx.State, nnx.State, Array], Array]:
    """`logits = eval_step(params, batch_stats, images)` with BatchNorm on running statistics.
    `compiler_options` default to `eval_compiler_options()`."""

    def eval_step(params, batch_stats, images):
        model = nnx.merge(graphdef, params, batch_stats)
        model.eval()
        return model(images)

    if compiler_options is None:
        compiler_options = eval_compiler_options()
    return jax.jit(eval_step, compiler_options=compiler_options)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[..., tuple[nnx.State, nnx.State, Any, Array]]:
    """`params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state, x, y)`.

    Cross-entropy on integer labels, BatchNorm in training mode. The params, batch_stats and
    opt_state buffers are donated: a model they were split from must not be used afterwards
    (merge the returned state instead). `compiler_options` default to `train_compiler_options()`.
    """

    def train_step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params, batch_stats):
            model = nnx.merge(graphdef, params, batch_stats, copy=True)
            model.train()
            logits = model(images)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, nnx.state(model, nnx.BatchStat)

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss

    return jax.jit(
        train_step,
        donate_argnums=(0, 1, 2),
        compiler_options=train_compiler_options() if compiler_options is None else compiler_options,
    )
