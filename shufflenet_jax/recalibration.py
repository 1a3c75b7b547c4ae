"""BatchNorm re-calibration: running statistics recomputed as the average of batch statistics
over training batches (the official post-training pass for the released models)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from shufflenet_jax.data import configured
from shufflenet_jax.data.augment import make_augment
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.layers import BatchNorm
from shufflenet_jax.model.network import ShuffleNetV2


def recalibrate_batchnorm(model: ShuffleNetV2, batches: Any, num_batches: int) -> ShuffleNetV2:
    """A copy of `model` whose BatchNorm running statistics are the cumulative average of the
    batch statistics over `num_batches` training batches (the official post-training pass)."""
    result_graphdef, params, batch_stats = split_model(model)
    probe = nnx.clone(model)
    for _, module in nnx.iter_graph(probe):
        if isinstance(module, BatchNorm):
            module.momentum = 0.0  # a train-mode call then stores exactly this batch's statistics
    graphdef = nnx.graphdef(probe)

    @jax.jit
    def batch_statistics(params, batch_stats, images):
        m = nnx.merge(graphdef, params, batch_stats, copy=True)
        m.train()
        m(images)
        return nnx.state(m, nnx.BatchStat)

    average = None
    for k in range(1, num_batches + 1):
        stats = batch_statistics(params, batch_stats, jnp.asarray(next(batches)["image"]))
        average = (
            stats
            if average is None
            else jax.tree.map(lambda a, s, k=k: a + (s - a) / k, average, stats)
        )
    if average is None:
        raise ValueError("recalibrate_bn needs at least one batch")
    return nnx.merge(result_graphdef, params, average)


def recalibrate_models(
    models: dict[str, ShuffleNetV2], config: Any, num_batches: int
) -> dict[str, ShuffleNetV2]:
    """`recalibrate_batchnorm` of each model over the config's (augmented) training stream."""
    split = configured.load_split(config, config.data.train_split)
    batch = config.train.batch_size // jax.process_count()
    augment = jax.jit(make_augment(config.train.seed, config.data.color_jitter))

    def stream():
        for n, b in enumerate(configured.train_dataset(config, split, batch)):
            yield {"image": augment(n, b["image"])}

    return {
        name: recalibrate_batchnorm(model, stream(), num_batches) for name, model in models.items()
    }
