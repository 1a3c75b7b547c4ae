"""Evaluation: a model, or an exported model file, over every example of a split once, with
the metrics of `train.step.classification_sums`."""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from shufflenet_jax.data import configured
from shufflenet_jax.data import pipeline as input_pipeline
from shufflenet_jax.data.calibration import standardized_batches
from shufflenet_jax.interop import export
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.network import ShuffleNetV2
from shufflenet_jax.train import parallel, step


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
    graphdef, params, batch_stats = split_model(model)
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


def evaluate_exported(path: str | os.PathLike, config: Any, split: input_pipeline.Split) -> dict:
    """Top-1, top-5, mean loss, count and images/s of an exported model file
    (`interop.export`) over `split`, as `evaluate_model` gives for a model."""
    predict = export.load(path)
    start = time.perf_counter()
    sums_of = jax.jit(step.classification_sums)
    totals: dict[str, float] = {}
    for b in standardized_batches(config, split, config.train.eval_batch_size):
        sums, _ = sums_of(predict(b["image"]).astype(np.float32), b["label"], b["mask"])
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    metrics = step.summarize_eval(totals)
    metrics["images_per_second"] = metrics["examples"] / max(time.perf_counter() - start, 1e-9)
    return metrics
