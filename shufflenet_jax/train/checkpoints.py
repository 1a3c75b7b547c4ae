"""Training checkpoints: orbax managers for the newest states and the best model, saving a
state with its data position, and restoring the newest one that reads back cleanly."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from shufflenet_jax.model.config import model_kwargs
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.network import abstract_model
from shufflenet_jax.train.state import TrainState, abstract_state, uses_ema

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
    kwargs = model_kwargs(config)
    return {"width": kwargs["width"], "num_classes": kwargs["num_classes"]}


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


class CheckpointError(RuntimeError):
    """A save was refused or failed, or a checkpoint does not match what was saved."""


def digests(tree: Any) -> dict[str, str]:
    """The SHA-256 of every array's bytes, by its path in `tree` (a TrainState's as a dict of its
    fields; replicated arrays: the first local copy), as a checkpoint records them."""
    return {name: _sha256(data) for name, data in _host_arrays(tree)}


def _host_arrays(tree: Any) -> Iterator[tuple[str, np.ndarray]]:
    if isinstance(tree, TrainState):
        tree = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        local = leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf
        yield jax.tree_util.keystr(path), np.ascontiguousarray(np.asarray(local))


def _sha256(data: np.ndarray) -> str:
    return hashlib.sha256(data.tobytes()).hexdigest()


def verify(tree: Any, recorded: dict[str, str] | None) -> None:
    """An error naming the first array whose digest differs from the recorded one (None: a
    checkpoint from before digests were recorded), or that is not finite."""
    for name, data in _host_arrays(tree):  # each array copied to the host once
        if recorded is not None and _sha256(data) != recorded.get(name):
            raise CheckpointError(f"array {name} does not match its recorded digest")
        if not np.all(np.isfinite(data)):
            raise CheckpointError(f"array {name} holds non-finite values")


def save(
    manager: ocp.CheckpointManager, step: int, state: TrainState, config: Any, data_iter: Any
) -> None:
    """Starts saving `state`, its digests and the data iterator's position as checkpoint `step`;
    an error if orbax refuses (a step at or after it exists)."""
    meta = {
        **model_description(config),
        "step": step,
        "dataset": config.data.dataset,
        "digests": digests(state),
    }
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave(meta),
        data=grain.checkpoint.CheckpointSave(data_iter),
    )
    try:  # orbax writes in the background, and re-raises an earlier save's error here
        saved = manager.save(step, args=args)
    except Exception as e:  # noqa: BLE001  (whatever the write raised)
        raise CheckpointError(f"saving in {manager.directory} failed: {_reason(e)}") from e
    if not saved:
        raise CheckpointError(
            f"orbax refused to save step {step} in {manager.directory} (its newest step is "
            f"{manager.latest_step()}); nothing was written"
        )


def check_saves(manager: ocp.CheckpointManager, wait: bool = False) -> None:
    """Raises a one-line CheckpointError if a background save has failed (with `wait`, after
    waiting for the running one)."""
    try:
        if wait:
            manager.wait_until_finished()
        manager.check_for_errors()
    except Exception as e:  # noqa: BLE001  (orbax re-raises whatever the write raised)
        raise CheckpointError(f"saving in {manager.directory} failed: {_reason(e)}") from e


def _reason(e: BaseException) -> str:
    """The error's first line, cut at 250 characters, and the OS error TensorStore names by its
    number somewhere in a long message."""
    first = (str(e).strip().splitlines() or [""])[0]
    if len(first) > 250:
        first = first[:250] + " ..."
    code = re.search(r"os_error_code='?(\d+)", str(e))
    if code:
        first += f" [OS error {code[1]}: {os.strerror(int(code[1]))}]"
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _move_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> None:
    """Moves an unusable step to DIR/corrupt/STEP (never deleted), so that saves go on from an
    older step (orbax refuses steps older than the newest directory). Every process calls it
    for the same step: process 0 moves, the others wait for the move before reloading."""
    directory = Path(manager.directory)
    target, n = directory / "corrupt" / str(step), 1
    while target.exists():
        target, n = directory / "corrupt" / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        target.parent.mkdir(exist_ok=True)
        os.replace(directory / str(step), target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
    log.warning(
        "checkpoint %d in %s is unusable (%s); moved to %s", step, directory, reason, target
    )
    manager.reload()


def _usable_everywhere(reason: str | None) -> bool:
    """Whether no process found the step unusable (`reason` is this process's finding, None if
    it restored cleanly): one host's transient read failure makes it unusable for all, so that
    every process resumes from the same step."""
    if jax.process_count() == 1:
        return reason is None
    return bool(np.all(multihost_utils.process_allgather(np.array(reason is None))))


def _newest_first(manager: ocp.CheckpointManager, config: Any, restore_step):
    """restore_step(step) for the newest step whose checkpoint restores on every process, is of
    this model and matches its digests; unusable ones are moved aside with a warning; None if
    none is left."""
    for step in sorted(manager.all_steps(), reverse=True):
        restored, reason = None, None
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            _check_same_model(meta["meta"], config, Path(manager.directory))
            restored = restore_step(step)
            verify(restored, meta["meta"].get("digests"))
        except ForeignCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001  (a truncated file raises many kinds)
            reason = _reason(e)
        if _usable_everywhere(reason):
            return restored
        _move_aside(manager, step, reason or "unusable on another process")
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
    _, params, batch_stats = split_model(abstract_model(**model_kwargs(config)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    step = jax.ShapeDtypeStruct((), jnp.int32)
    target = {"step": step, "params": params, "batch_stats": batch_stats}
    if uses_ema(config):
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
