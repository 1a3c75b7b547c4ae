"""The images an int8 export calibrates on and is checked on: a config's training and
held-out images, preprocessed as for evaluation (center crops, standardized float32 NHWC)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np

from shufflenet_jax.data import configured
from shufflenet_jax.data import pipeline as input_pipeline
from shufflenet_jax.data.normalization import standardize


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
    for b in standardized_batches(
        config, configured.load_split(config, config.data.eval_split), config.train.eval_batch_size
    ):
        chunks.append(b["image"][b["mask"]])
        if sum(map(len, chunks)) >= limit:
            break
    images = np.concatenate(chunks)[:limit]
    return images, f"images of {config.data.dataset}'s {config.data.eval_split} split"
