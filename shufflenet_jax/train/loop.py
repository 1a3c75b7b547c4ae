"""The training loop: data-parallel steps over a device mesh, with hooks for logging,
evaluation, checkpoints, the non-finite loss check and signals; resumes from checkpoints.

The batch is sharded over a `data` mesh axis; parameters, BatchNorm statistics, optimizer state
and EMA are replicated, so BatchNorm statistics are those of the global batch (XLA inserts the
cross-device reductions). The same code runs on one device, on many, and across processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from shufflenet_jax.data import configured
from shufflenet_jax.train import checkpoints, hooks, parallel, step
from shufflenet_jax.train import workdir as workdir_lib
from shufflenet_jax.train.state import TrainState, create_model, create_train_state

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Result:
    """What a call to `train_and_evaluate` ended with."""

    state: TrainState
    eval_metrics: dict[str, float] | None
    stopped_by_signal: bool


def train_and_evaluate(
    config: Any,
    workdir: str | os.PathLike,
    *,
    stop_after: int | None = None,
    train_batches: Iterator[dict] | None = None,
) -> Result:
    """Train per `config` in `workdir`, resuming from its newest good checkpoint.

    `stop_after` ends this call after that many total steps (saving a checkpoint), as a
    preemption would; `train_batches` replaces the dataset's stream (per-process batches).
    The config's cadences and the workdir are checked before anything compiles; process 0
    holds the workdir's lock for the run.
    """
    hooks.check_cadences(config)
    workdir = Path(workdir)
    created = workdir_lib.prepare(workdir)
    lock = workdir_lib.locked(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock, workdir_lib.removed_if_left_empty(workdir, created):
        return _train(config, workdir, stop_after, train_batches)


def _train(config: Any, workdir: Path, stop_after: int | None, train_batches) -> Result:
    t = config.train
    mesh = parallel.make_mesh(t.num_devices)
    data, replicated = parallel.data_sharding(mesh), parallel.replicated(mesh)
    local_batch = parallel.check_batch(t.batch_size, mesh)
    local_eval_batch = parallel.check_batch(t.eval_batch_size, mesh, "eval_batch_size")
    train_split = configured.load_split(config, config.data.train_split)
    eval_split = configured.load_split(config, config.data.eval_split)
    data_iter = iter(configured.train_dataset(config, train_split, local_batch))

    graphdef, tx, state = create_train_state(config, create_model(config))
    latest = checkpoints.checkpoint_manager(workdir / "checkpoints", t.keep_checkpoints)
    restored = checkpoints.restore_latest(latest, config, replicated, data_iter)
    if restored is not None:
        state = restored
        log.info("resumed from step %d in %s", int(state.step), workdir / "checkpoints")
        if jax.process_index() == 0:  # the normal course of a run: a line, not a warning
            print(f"resumed from step {int(state.step)} in {workdir / 'checkpoints'}", flush=True)
    state = jax.device_put(state, replicated)
    train_step = step.train_step_for(config, graphdef, tx, mesh)
    train_step = parallel.compiled_together(train_step, "train")
    eval_step = parallel.compiled_together(step.make_eval_step(graphdef, mesh), "eval")

    def evaluate(params, batch_stats):
        batches = configured.eval_dataset(config, eval_split, local_eval_batch)
        return step.evaluate(eval_step, params, batch_stats, batches, data)

    metrics_log = hooks.MetricsLog(workdir)
    evaluator = hooks.Evaluate(config, evaluate, graphdef, metrics_log, workdir / "best")

    batches = data_iter if train_batches is None else train_batches
    feed = parallel.DevicePrefetch(batches, data, config.data.prefetch_batches, data_iter.get_state)
    acting = [
        hooks.ProgressLog(config, metrics_log, len(train_split)),
        evaluator,
        hooks.Checkpoint(config, latest, feed.position),
    ]
    loop_hooks = [hooks.LossCheck(acting, workdir / "checkpoints", latest.latest_step), *acting]
    end = t.total_steps if stop_after is None else min(stop_after, t.total_steps)
    n, stopped = int(state.step), False
    try:
        with hooks.StopRequest() as stop:
            while n < end:
                state, metrics = train_step(state, next(feed))
                n += 1
                stopped = stop.requested(in_flight=metrics)
                for hook in loop_hooks:
                    hook(n, state, metrics, last=n == end or stopped)
                if stopped:
                    break
    finally:
        with contextlib.ExitStack() as closing:  # each closes even if another's close fails
            for closable in (feed, metrics_log, *loop_hooks):
                closing.callback(closable.close)
    if stopped:  # the hooks have closed: the save has completed
        log.warning("stopped at step %d after a signal; checkpoint %d saved", n, n)
    return Result(state, evaluator.metrics, stopped)
