"""Training checkpoints: orbax managers for the newest states and the best model, saving a
state with its data position, and restoring the newest one that reads back cleanly."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from shufflenet_jax.model.network import abstract_model, check_width
from shufflenet_jax.train.state import TrainState, abstract_state, model_kwargs

log = logging.getLogger(__name__)


def checkpoint_manager(directory: Path, keep: int, best: bool = False) -> ocp.CheckpointManager:
    """Keeps the newest `keep` steps (saved in the background), or with `best` the one with the
    highest eval top-1 (saved at once)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=not best,
        best_fn=(lambda m: m["top1"]) if best else None,
        best_mode="max",
        create=True,
    )
    # orbax rejects relative paths when it saves (README's `--workdir runs/digits` is one)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def model_description(config: Any) -> dict[str, Any]:
    """What a checkpoint's `meta` item records of the model, to refuse another model's."""
    return {"width": check_width(config.model.width), "num_classes": config.model.num_classes}


class ForeignCheckpointError(ValueError):
    """The workdir's checkpoints are of another model than the config describes."""


def _check_same_model(meta: dict[str, Any], config: Any, directory: Path) -> None:
    ours = model_description(config)
    theirs = {k: meta.get(k) for k in ours}
    if theirs != ours:
        raise ForeignCheckpointError(
            f"{directory} holds checkpoints of another model ({theirs}); this config trains "
            f"{ours}. Use a new --workdir."
        )


def save(
    manager: ocp.CheckpointManager, step: int, state: TrainState, config: Any, data_iter: Any
) -> None:
    """Starts saving `state` and the data iterator's position as checkpoint `step`."""
    meta = {**model_description(config), "step": step, "dataset": config.data.dataset}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta),
            data=grain.checkpoint.CheckpointSave(data_iter),
        ),
    )


def _newest_first(manager: ocp.CheckpointManager, config: Any, restore_step):
    """restore_step(step) for the newest step whose checkpoint restores and is of this model;
    older ones after a warning naming what failed; None if none does."""
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            _check_same_model(meta["meta"], config, Path(manager.directory))
            return restore_step(step)
        except ForeignCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (a truncated file raises many kinds)
            log.warning(
                "checkpoint %d in %s is unusable (%s: %s); trying an older one",
                step,
                manager.directory,
                type(e).__name__,
                e,
            )
    return None


def restore_latest(
    manager: ocp.CheckpointManager,
    config: Any,
    sharding: jax.sharding.Sharding,
    data_iter: Any = None,
) -> TrainState | None:
    """The newest training state that restores cleanly, or None. Arrays are placed with
    `sharding`; `data_iter`, if given, is set to the saved position."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state(config)
    )

    def restore_step(step: int) -> TrainState:
        items = {"state": ocp.args.StandardRestore(target)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return manager.restore(step, args=ocp.args.Composite(**items))["state"]

    return _newest_first(manager, config, restore_step)


def latest_weights(config: Any, workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The newest usable checkpoint's `step`, `params`, `batch_stats` and (with EMA)
    `ema_params` in `workdir`, on the first device, read without the optimizer state; None if
    there is none."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    _, params, batch_stats = nnx.split(
        abstract_model(**model_kwargs(config)), nnx.Param, nnx.BatchStat
    )
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = jax.ShapeDtypeStruct((), jnp.int32)
    target = {"step": step, "params": params, "batch_stats": batch_stats}
    if config.optim.ema_decay > 0:
        target["ema_params"] = params
    restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
    manager = checkpoint_manager(directory, config.train.keep_checkpoints)

    def restore_step(step: int) -> dict[str, Any]:
        args = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
        return manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    try:
        return _newest_first(manager, config, restore_step)
    finally:
        manager.close()
