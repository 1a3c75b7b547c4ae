"""Evaluate trained, converted or torchvision models; BN re-calibration; classify images."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflenet_jax.data import configured
from shufflenet_jax.data import pipeline as input_pipeline
from shufflenet_jax.data.augment import make_augment
from shufflenet_jax.data.normalization import standardize
from shufflenet_jax.interop import convert, export
from shufflenet_jax.model import checkpoint
from shufflenet_jax.model.config import model_kwargs
from shufflenet_jax.model.layers import BatchNorm
from shufflenet_jax.model.network import ShuffleNetV2, abstract_model
from shufflenet_jax.train import checkpoints, parallel, step


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped with the package)."""
    text = resources.files("shufflenet_jax.data").joinpath("imagenet_classes.txt").read_text()
    return text.splitlines()


def _check_model(model: ShuffleNetV2, config: Any, source: str) -> None:
    kwargs = model_kwargs(config)
    width, classes = kwargs["width"], kwargs["num_classes"]
    if (model.width, model.num_classes) != (width, classes):
        raise ValueError(
            f"{source} holds a {model.width}x model with {model.num_classes} classes; the config "
            f"asks for {width}x with {classes}"
        )


def load_models(
    config: Any,
    *,
    workdir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    torch_weights: str | os.PathLike | None = None,
    report: Callable[[str], None] = lambda line: None,
) -> dict[str, ShuffleNetV2]:
    """The model(s) to evaluate from exactly one source: {"model": ..., "ema": ...(if any)};
    `report` gets a line saying what was loaded (for a workdir: which checkpoint step)."""
    given = [x for x in (workdir, checkpoint_dir, torch_weights) if x is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --workdir, --checkpoint, --torch_weights")
    if checkpoint_dir is not None:
        model = checkpoint.restore_model(checkpoint_dir)
        _check_model(model, config, str(checkpoint_dir))
        report(f"weights: the model checkpoint {checkpoint_dir}")
        return {"model": model}
    if torch_weights is not None:
        model = convert.load_torchvision(str(torch_weights))
        _check_model(model, config, str(torch_weights))
        report(f"weights: the torchvision file {torch_weights}")
        return {"model": model}
    weights = checkpoints.latest_weights(config, workdir)
    if weights is None:
        raise ValueError(f"{workdir} has no usable training checkpoint")
    graphdef = nnx.graphdef(abstract_model(**model_kwargs(config)))
    models = {"model": nnx.merge(graphdef, weights["params"], weights["batch_stats"])}
    if "ema_params" in weights:
        models["ema"] = nnx.merge(graphdef, weights["ema_params"], weights["batch_stats"])
    step = int(weights["step"])
    report(f"weights: step {step} of {Path(workdir) / 'checkpoints'} ({', '.join(models)})")
    return models


def eval_split(config: Any, split: str | None = None) -> input_pipeline.Split:
    """`split` of the config's dataset, by default its `eval_split`."""
    return configured.load_split(config, split or config.data.eval_split)


def evaluate_model(
    model: ShuffleNetV2, config: Any, split: input_pipeline.Split
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics over every example of `split` once, on all devices, and the top-1 prediction of
    each example by record index (-1 for records skipped as corrupt)."""
    mesh = parallel.make_mesh(config.train.num_devices)
    local_batch = parallel.check_batch(config.train.eval_batch_size, mesh, "eval_batch_size")
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    # restored weights sit on one device; the batches are split over the mesh's
    params, batch_stats = jax.device_put((params, batch_stats), parallel.replicated(mesh))
    eval_step = step.make_eval_step(graphdef, mesh)
    batches = configured.eval_dataset(config, split, local_batch)
    predictions = np.full(len(split), -1, np.int64)
    start = time.perf_counter()
    sharding = parallel.data_sharding(mesh)
    metrics = step.evaluate(eval_step, params, batch_stats, batches, sharding, predictions)
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
    split = configured.load_split(config, config.data.train_split)
    batch = config.train.batch_size // jax.process_count()
    augment = jax.jit(make_augment(config.train.seed, config.data.color_jitter))

    def stream():
        for n, b in enumerate(configured.train_dataset(config, split, batch)):
            yield {"image": augment(n, b["image"])}

    return {
        name: recalibrate_batchnorm(model, stream(), num_batches) for name, model in models.items()
    }


def standardized_batches(config: Any, split: input_pipeline.Split, batch: int) -> Iterator[dict]:
    """`split`'s evaluation batches (center crops, padded, with `mask`) as standardized
    float32 NumPy images: what an exported model takes."""
    for b in configured.eval_dataset(config, split, batch):
        yield {**b, "image": np.asarray(standardize(jnp.asarray(b["image"])))}


def calibration_images(config: Any, num_batches: int, batch: int) -> list[np.ndarray]:
    """`num_batches` batches of the config's training images, preprocessed as for evaluation:
    the data an int8 export calibrates its activation ranges on."""
    split = configured.load_split(config, config.data.train_split)
    batches = standardized_batches(config, split, batch)
    return [b["image"] for b, _ in zip(batches, range(num_batches), strict=False)]


def held_out_images(config: Any, limit: int) -> tuple[np.ndarray, str]:
    """Up to `limit` images of the config's evaluation split, preprocessed as for evaluation,
    and a description naming them: what an int8 export's agreement is measured on."""
    chunks = []
    for b in standardized_batches(config, eval_split(config), config.train.eval_batch_size):
        chunks.append(b["image"][b["mask"]])
        if sum(map(len, chunks)) >= limit:
            break
    images = np.concatenate(chunks)[:limit]
    return images, f"images of {config.data.dataset}'s {config.data.eval_split} split"


def evaluate_exported(path: str | os.PathLike, config: Any, split: input_pipeline.Split) -> dict:
    """Top-1, top-5, mean loss, count and images/s of an exported model file
    (`interop.export`) over `split`, as `evaluate_model` gives for a model."""
    predict = export.load(path)
    start = time.perf_counter()
    metrics = _exported_metrics(predict, config, split, config.train.eval_batch_size)
    metrics["images_per_second"] = metrics["examples"] / max(time.perf_counter() - start, 1e-9)
    return metrics


def _exported_metrics(
    predict: Callable[[np.ndarray], np.ndarray],
    config: Any,
    split: input_pipeline.Split,
    batch: int,
) -> dict[str, float]:
    sums = dict.fromkeys(("correct_top1", "correct_top5", "loss_sum", "count"), 0.0)
    for b in standardized_batches(config, split, batch):
        logits = predict(b["image"]).astype(np.float64)
        labels, mask = b["label"], b["mask"].astype(bool)
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        shifted = logits - logits.max(-1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        sums["correct_top1"] += np.sum((top5[:, 0] == labels) & mask)
        sums["correct_top5"] += np.sum((top5 == labels[:, None]).any(-1) & mask)
        sums["loss_sum"] += -np.sum(np.take_along_axis(log_p, labels[:, None], -1)[:, 0] * mask)
        sums["count"] += mask.sum()
    return step.summarize_eval({k: float(v) for k, v in sums.items()})
