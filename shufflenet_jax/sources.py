"""Where a model to evaluate comes from, decided in one place: a training run (its newest
checkpoint, with its EMA weights), a model checkpoint directory or a torchvision .pth file,
each checked against the config's model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from shufflenet_jax.interop import convert
from shufflenet_jax.model import model_file
from shufflenet_jax.model.config import model_kwargs
from shufflenet_jax.model.network import ShuffleNetV2, abstract_model
from shufflenet_jax.train import checkpoints


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
    expected = model_kwargs(config)  # width and classes checked, the rest build the model
    if checkpoint_dir is not None:
        model = model_file.restore_model(checkpoint_dir, **expected)
        report(f"weights: the model checkpoint {checkpoint_dir}")
        return {"model": model}
    if torch_weights is not None:
        model = convert.load_torchvision(str(torch_weights), **expected)
        report(f"weights: the torchvision file {torch_weights}")
        return {"model": model}
    weights = checkpoints.latest_weights(config, workdir)
    if weights is None:
        raise ValueError(f"{workdir} has no usable training checkpoint")
    graphdef = nnx.graphdef(abstract_model(**expected))
    models = {"model": nnx.merge(graphdef, weights["params"], weights["batch_stats"])}
    if "ema_params" in weights:
        models["ema"] = nnx.merge(graphdef, weights["ema_params"], weights["batch_stats"])
    step = int(weights["step"])
    report(f"weights: step {step} of {Path(workdir) / 'checkpoints'} ({', '.join(models)})")
    return models
