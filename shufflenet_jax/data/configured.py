"""The input pipeline as a config's `data` section describes it, for training and evaluation."""

from __future__ import annotations

from typing import Any

import grain
import jax

from shufflenet_jax.data import pipeline


def load_split(config: Any, split: str) -> pipeline.Split:
    """`split` of the config's dataset; an error if its classes are not the model's."""
    d = config.data
    loaded = pipeline.load_split(d.dataset, split, d.data_dir)
    if loaded.num_classes != config.model.num_classes:
        raise ValueError(
            f"{d.dataset} has {loaded.num_classes} classes, config.model.num_classes is "
            f"{config.model.num_classes}"
        )
    return loaded


def train_transform(config: Any) -> pipeline.TrainTransform:
    """The config's training augmentation."""
    d = config.data
    return pipeline.TrainTransform(image_size=d.image_size, scale=tuple(d.crop_scale), flip=d.flip)


def train_dataset(config: Any, split: pipeline.Split, batch_size: int) -> grain.IterDataset:
    """This process's endless, seeded, augmented training batches of `split`."""
    transform, seed = train_transform(config), config.train.seed
    return pipeline.train_dataset(split, batch_size=batch_size, transform=transform, seed=seed,
                                  **_reading(config))  # fmt: skip


def eval_dataset(config: Any, split: pipeline.Split, batch_size: int) -> grain.IterDataset:
    """This process's padded evaluation batches of `split` with the config's preprocessing."""
    transform = pipeline.EvalTransform(config.data.image_size, config.data.eval_resize)
    return pipeline.eval_dataset(split, batch_size=batch_size, transform=transform,
                                 **_reading(config))  # fmt: skip


def _reading(config: Any) -> dict[str, Any]:
    """How this process reads its share of a split, as the config's `data` section says."""
    d = config.data
    return dict(
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        skip_corrupt=d.skip_corrupt,
        worker_count=d.worker_count,
        read_threads=d.read_threads,
        read_buffer_batches=d.read_buffer_batches,
    )
