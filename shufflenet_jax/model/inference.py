"""The one inference path: a model's weights split off once and one jitted function of
(weights, images), BatchNorm on running statistics (so the fused stem and stages), compiled
with `eval_compiler_options`. README's `predictor`, evaluation, classification, the exports'
reference and the torchvision comparison all call it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from shufflenet_jax.compiler_options import eval_compiler_options
from shufflenet_jax.model.network import ShuffleNetV2

Array = jax.Array


def split_model(model: ShuffleNetV2) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, batch_stats): the static structure and the two kinds of arrays."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


def apply(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch_stats: nnx.State,
    images: Array,
    *,
    stages: bool = False,
) -> Array | dict[str, Array]:
    """The model's logits for `images` in eval mode (every stage's output with `stages`):
    a pure function of the split weights, to call inside a jitted function."""
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    model.eval()
    return model.stages(images) if stages else model(images)


def make_predict(
    graphdef: nnx.GraphDef, compiler_options: dict[str, Any] | None = None
) -> Callable[[nnx.State, nnx.State, Array], Array]:
    """`logits = predict(params, batch_stats, images)`, jitted. `compiler_options` default
    to `eval_compiler_options()`."""
    options = eval_compiler_options() if compiler_options is None else compiler_options

    def _logits(params: nnx.State, batch_stats: nnx.State, images: Array) -> Array:
        return apply(graphdef, params, batch_stats, images)  # (its name names the program)

    return jax.jit(_logits, compiler_options=options)


def predictor(
    model: ShuffleNetV2,
    compiler_options: dict[str, Any] | None = None,
    *,
    stages: bool = False,
) -> Callable[[Array], Array | dict[str, Array]]:
    """`logits = predict(images)` for `model`'s weights as they are now (every stage's output
    with `stages`). The weights are split off once and passed as a flat list of arrays: a
    call walks no module graph (as `nnx.jit` on the module does) and flattens no `nnx.State`
    (about 1 ms per call, a seventh of a 1.0x batch-1 inference on a 2-vCPU machine)."""
    graphdef, params, batch_stats = split_model(model)
    leaves, treedef = jax.tree.flatten((params, batch_stats))
    options = eval_compiler_options() if compiler_options is None else compiler_options

    def logits(leaves: list[Array], images: Array) -> Array | dict[str, Array]:
        return apply(graphdef, *jax.tree.unflatten(treedef, leaves), images, stages=stages)

    return functools.partial(jax.jit(logits, compiler_options=options), leaves)
