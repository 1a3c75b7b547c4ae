"""The on-disk format of a model: one orbax checkpoint directory with two items.

- `model`: JSON with the constructor arguments (`width`, `num_classes`) and free-form provenance;
- `state`: every `nnx.Param` and `nnx.BatchStat` as `nnx.to_pure_dict` lays them out.

`python -m shufflenet_jax.interop.convert` writes it; evaluation and fine-tuning restore it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from shufflenet_jax.model.network import ShuffleNetV2, abstract_model, check_expected, with_values

MODEL_ITEM = "model"
STATE_ITEM = "state"


def model_save_args(model: ShuffleNetV2, **provenance: Any) -> ocp.args.Composite:
    """The orbax save arguments of this format, for a Checkpointer or a CheckpointManager."""
    config = {"width": model.width, "num_classes": model.num_classes, **provenance}
    state = nnx.to_pure_dict(nnx.state(model))
    return ocp.args.Composite(
        **{MODEL_ITEM: ocp.args.JsonSave(config), STATE_ITEM: ocp.args.StandardSave(state)}
    )


def save_model(directory: str | os.PathLike, model: ShuffleNetV2, **provenance: Any) -> None:
    """Write `model` to a new checkpoint `directory` (which must not exist yet)."""
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        ckptr.save(os.path.abspath(directory), args=model_save_args(model, **provenance))


def model_directory(path: str | os.PathLike) -> str:
    """The model checkpoint `path` names: itself, or a training run's best model (`path` the
    run's workdir or its `best/`). Anything else is an error naming what was expected."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.isdir(os.path.join(path, MODEL_ITEM)):
        return path
    best = path if os.path.basename(path) == "best" else os.path.join(path, "best")
    steps = sorted(
        (int(d) for d in os.listdir(best) if d.isdigit()) if os.path.isdir(best) else [],
    )
    if steps and os.path.isdir(os.path.join(best, str(steps[-1]), MODEL_ITEM)):
        return os.path.join(best, str(steps[-1]))
    run = _run_of(path)
    where = f"; that run's models are in {os.path.join(run, 'best')}" if run else ""
    raise FileNotFoundError(
        f"{path} is not a shufflenet_jax model checkpoint (no '{MODEL_ITEM}' item) nor a "
        f"training run with a best model (no best/STEP){where}"
    )


def _run_of(path: str) -> str | None:
    """The training workdir above `path` (`WORKDIR/checkpoints[/STEP]`), if it has models."""
    for candidate in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.basename(path) != "best" and os.path.isdir(os.path.join(candidate, "best")):
            return candidate
    return None


def read_model_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The `model` item of a checkpoint (or of a run's best model, `model_directory`):
    width, num_classes and provenance."""
    path = model_directory(directory)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        return ckptr.restore(path, args=ocp.args.Composite(**{MODEL_ITEM: ocp.args.JsonRestore()}))[
            MODEL_ITEM
        ]


def restore_model(
    directory: str | os.PathLike,
    width: float | str | None = None,
    num_classes: int | None = None,
    **model_kwargs: Any,
) -> ShuffleNetV2:
    """Load a checkpoint written by `save_model` (or a run's best model: `model_directory`). A
    `width` or `num_classes` that disagrees with the checkpoint is an error; `model_kwargs`
    (e.g. `impl`) go to the constructor."""
    directory = model_directory(directory)
    config = read_model_config(directory)
    check_expected(str(directory), config["width"], config["num_classes"], width, num_classes)
    abstract = abstract_model(config["width"], config["num_classes"], **model_kwargs)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
        nnx.to_pure_dict(nnx.state(abstract)),
    )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
        restored = ckptr.restore(
            os.path.abspath(directory),
            args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)}),
        )
    return with_values(abstract, restored[STATE_ITEM])
