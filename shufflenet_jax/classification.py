"""Classifying image files with a model: top-k classes and probabilities, ImageNet's class
names shipped with the package."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import jax
import numpy as np

from shufflenet_jax.data import pipeline as input_pipeline
from shufflenet_jax.model.inference import predictor
from shufflenet_jax.model.network import ShuffleNetV2


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in label order (shipped with the package)."""
    text = resources.files("shufflenet_jax.data").joinpath("imagenet_classes.txt").read_text()
    return text.splitlines()


def classify_images(
    model: ShuffleNetV2,
    paths: list[str],
    transform: input_pipeline.EvalTransform,
    class_names: list[str] | None = None,
    k: int = 5,
) -> list[dict[str, Any]]:
    """Top-k (class, probability) per image; an image that cannot be read gets an `error`."""
    predict = predictor(model)
    results = []
    for path in paths:
        try:
            image = input_pipeline.decode_image(Path(path).read_bytes(), path)
        except (OSError, input_pipeline.CorruptImageError) as e:
            results.append({"image": path, "error": str(e)})
            continue
        probs = np.asarray(jax.nn.softmax(predict(transform(image)[None]), -1))[0]
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
