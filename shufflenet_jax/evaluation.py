"""Evaluate trained, converted or torchvision models; BN re-calibration; classify images."""

from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from shufflenet_jax import checkpoint, convert, input_pipeline, training
from shufflenet_jax.layers import BatchNorm
from shufflenet_jax.models import ShuffleNetV2, abstract_model, check_width


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped with the package)."""
    text = resources.files("shufflenet_jax").joinpath("imagenet_classes.txt").read_text()
    return text.splitlines()


def _check_model(model: ShuffleNetV2, config: Any, source: str) -> None:
    width = check_width(config.width)
    if (model.width, model.num_classes) != (width, config.num_classes):
        raise ValueError(
            f"{source} holds a {model.width}x model with {model.num_classes} classes; the config "
            f"asks for {width}x with {config.num_classes}"
        )


def load_models(
    config: Any,
    *,
    workdir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    torch_weights: str | os.PathLike | None = None,
) -> dict[str, ShuffleNetV2]:
    """The model(s) to evaluate from exactly one source: {"model": ..., "ema": ...(if any)}."""
    given = [x for x in (workdir, checkpoint_dir, torch_weights) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --workdir, --checkpoint, --torch_weights")
    if checkpoint_dir is not None:
        model = checkpoint.restore_model(checkpoint_dir)
        _check_model(model, config, str(checkpoint_dir))
        return {"model": model}
    if torch_weights is not None:
        model = convert.load_torchvision(str(torch_weights))
        _check_model(model, config, str(torch_weights))
        return {"model": model}
    state = training.latest_state(config, workdir)
    if state is None:
        raise ValueError(f"{workdir} has no usable training checkpoint")
    graphdef, _, _ = nnx.split(
        abstract_model(check_width(config.width), config.num_classes), nnx.Param, nnx.BatchStat
    )
    models = {"model": nnx.merge(graphdef, state.params, state.batch_stats)}
    if state.ema_params is not None:
        models["ema"] = nnx.merge(graphdef, state.ema_params, state.batch_stats)
    return models


def eval_split(config: Any, split: str | None = None) -> input_pipeline.Split:
    return input_pipeline.load_split(config.dataset, split or config.eval_split, config.data_dir)


def evaluate_model(
    model: ShuffleNetV2, config: Any, split: input_pipeline.Split
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics over every example of `split` once, on all devices, and the top-1 prediction of
    each example by record index (-1 for records skipped as corrupt)."""
    mesh = training.make_mesh(config.num_devices)
    data = NamedSharding(mesh, PartitionSpec("data"))
    local_batch = training.check_batch(config.eval_batch_size, mesh, "eval_batch_size")
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    eval_step = training.make_eval_step(graphdef, mesh)
    batches = training.eval_dataset(config, split, local_batch)
    predictions = np.full(len(split), -1, np.int64)
    start = time.perf_counter()
    metrics = training.evaluate(eval_step, params, batch_stats, batches, data, predictions)
    seconds = time.perf_counter() - start
    metrics["images_per_second"] = metrics["examples"] / max(seconds, 1e-9)
    return metrics, predictions


def recalibrate_batchnorm(model: ShuffleNetV2, batches: Any, num_batches: int) -> ShuffleNetV2:
    """A copy of `model` whose BatchNorm running statistics are the cumulative average of the
    batch statistics over `num_batches` training batches (the official post-training pass)."""
    result_graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
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


def classify_images(
    model: ShuffleNetV2,
    paths: list[str],
    transform: input_pipeline.EvalTransform,
    class_names: list[str] | None = None,
    k: int = 5,
) -> list[dict[str, Any]]:
    """Top-k (class, probability) per image; an image that cannot be read gets an `error`."""
    model.eval()
    forward = nnx.jit(lambda m, x: jax.nn.softmax(m(x), -1))
    results = []
    for path in paths:
        try:
            image = input_pipeline.decode_image(Path(path).read_bytes(), path)
        except (OSError, input_pipeline.CorruptImageError) as e:
            results.append({"image": path, "error": str(e)})
            continue
        probs = np.asarray(forward(model, transform(image)[None]))[0]
        top = np.argsort(-probs)[:k]
        names = [class_names[i] if class_names else str(i) for i in top]
        results.append(
            {
                "image": path,
                "top": [
                    {"class": int(i), "name": n, "probability": float(probs[i])}
                    for i, n in zip(top, names, strict=True)
                ],
            }
        )
    return results


def recalibrate_models(
    models: dict[str, ShuffleNetV2], config: Any, num_batches: int
) -> dict[str, ShuffleNetV2]:
    """`recalibrate_batchnorm` of each model over the config's (augmented) training stream."""
    split = input_pipeline.load_split(config.dataset, config.train_split, config.data_dir)
    out = {}
    for name, model in models.items():
        stream = iter(
            input_pipeline.train_dataset(
                split,
                batch_size=config.batch_size // jax.process_count(),
                transform=training.train_transform(config),
                seed=config.seed,
                worker_count=config.worker_count,
                read_threads=config.read_threads,
            )
        )
        out[name] = recalibrate_batchnorm(model, stream, num_batches)
    return out
