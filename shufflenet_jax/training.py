"""Data-parallel training: a jitted pure step over a device mesh, orbax checkpoints, resume.

The batch is sharded over a `data` mesh axis; parameters, BatchNorm statistics, optimizer state
and EMA are replicated, so BatchNorm statistics are those of the global batch (XLA inserts the
cross-device reductions). The same code runs on one device, on many, and across processes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shufflenet_jax import checkpoint, input_pipeline, optim
from shufflenet_jax.models import ShuffleNetV2, abstract_model, check_width
from shufflenet_jax.ops import accumulation_dtype
from shufflenet_jax.steps import eval_compiler_options, train_compiler_options

log = logging.getLogger(__name__)
Batch = dict[str, Any]


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as one replicated pytree."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: Any
    ema_params: nnx.State | None


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D `data` mesh over the first `num_devices` devices (0: all, of every process)."""
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices}, but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


def check_batch(global_batch: int, mesh: Mesh, what: str = "batch_size") -> int:
    """This process's share of `global_batch`; an error unless it splits evenly over devices."""
    devices, processes = mesh.devices.size, jax.process_count()
    if global_batch <= 0 or global_batch % devices:
        raise ValueError(
            f"{what}={global_batch} is not divisible by the {devices} devices of the mesh; "
            f"use a multiple of {devices}"
        )
    return global_batch // processes


def to_global(batch: Batch, sharding: NamedSharding) -> Batch:
    """This process's rows of the batch -> global arrays sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def train_transform(config: Any) -> input_pipeline.TrainTransform:
    """The config's training augmentation."""
    return input_pipeline.TrainTransform(
        image_size=config.image_size,
        scale=tuple(config.crop_scale),
        flip=config.flip,
        color_jitter=config.color_jitter,
    )


def eval_dataset(config: Any, split: input_pipeline.Split, batch_size: int) -> grain.IterDataset:
    """This process's padded evaluation batches of `split` with the config's preprocessing."""
    return input_pipeline.eval_dataset(
        split,
        batch_size=batch_size,
        transform=input_pipeline.EvalTransform(config.image_size, config.eval_resize),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        skip_corrupt=config.skip_corrupt,
        worker_count=config.worker_count,
        read_threads=config.read_threads,
    )


def create_model(config: Any) -> ShuffleNetV2:
    """A fresh model (one compiled initializer), or `config.init_from` with a new head if the
    number of classes differs."""
    width = check_width(config.width)
    model = nnx.jit(lambda: ShuffleNetV2(width, config.num_classes, rngs=nnx.Rngs(config.seed)))()
    if config.init_from:
        pretrained = checkpoint.restore_model(config.init_from, width=width)
        values = nnx.to_pure_dict(nnx.state(pretrained))
        if pretrained.num_classes != config.num_classes:
            del values["fc"]  # a new head for the new classes, freshly initialized
        nnx.update(model, values)
    return model


def create_optimizer_and_state(config: Any, model: ShuffleNetV2):
    """(graphdef, tx, state) for `model`: step 0, a fresh optimizer state, EMA = the params."""
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    tx = optim.make_optimizer(config, params)
    ema = jax.tree.map(jnp.copy, params) if config.ema_decay > 0 else None
    state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params), ema)
    return graphdef, tx, state


def compute_dtype(config: Any) -> jnp.dtype:
    """float32, bfloat16 (parameters and BN statistics stay float32), or float64 for numerical
    checks (needs `jax_enable_x64`)."""
    if config.compute_dtype not in ("float32", "bfloat16", "float64"):
        raise ValueError(
            f"compute_dtype must be float32, bfloat16 or float64, got {config.compute_dtype!r}"
        )
    if config.compute_dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("compute_dtype float64 needs jax_enable_x64")
    return jnp.dtype(config.compute_dtype)


def make_train_step(config: Any, graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """`state, metrics = train_step(state, batch)`, pure; smoothed cross-entropy; EMA update."""
    dtype = compute_dtype(config)
    smoothing, num_classes, ema_decay = config.label_smoothing, config.num_classes, config.ema_decay

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        def loss_fn(params, batch_stats):
            compute = jax.tree.map(lambda p: p.astype(dtype), params)
            model = nnx.merge(graphdef, compute, batch_stats, copy=True)
            model.train()
            # float32 logits for bfloat16 compute; float64 stays float64 end to end
            logits = model(batch["image"].astype(dtype)).astype(accumulation_dtype(dtype))
            targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        metrics = {"loss": loss, "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state, ema)
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh):
    """`sums, predictions = eval_step(params, batch_stats, batch)`: masked counts of correct
    top-1 and top-5, summed cross-entropy and the number of real examples; and each row's top-1
    class with the batch's `index` and `mask`. Jitted with `eval_compiler_options()`, its
    outputs replicated over `mesh`."""

    def eval_step(params, batch_stats, batch):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        model.eval()
        logits = model(batch["image"]).astype(jnp.float32)
        labels, mask = batch["label"], batch["mask"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jax.lax.top_k(logits, 5)[1]
        sums = {
            "correct_top1": jnp.sum((top5[:, 0] == labels) & mask),
            "correct_top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) & mask),
            "loss_sum": jnp.sum(jnp.where(mask, loss, 0.0)),
            "count": jnp.sum(mask),
        }
        return sums, {"top1": top5[:, 0], "index": batch["index"], "mask": mask}

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(eval_step, out_shardings=replicated, compiler_options=eval_compiler_options())


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    n = max(sums["count"], 1)
    return {
        "top1": sums["correct_top1"] / n,
        "top5": sums["correct_top5"] / n,
        "loss": sums["loss_sum"] / n,
        "examples": int(sums["count"]),
    }


def evaluate(
    eval_step: Callable,
    params: nnx.State,
    batch_stats: nnx.State,
    batches: Iterable[Batch],
    sharding: NamedSharding,
    predictions: np.ndarray | None = None,
) -> dict[str, float]:
    """Top-1, top-5, mean loss and the example count over `batches` (per-process eval batches).
    With `predictions` (one slot per record), each example's top-1 class is stored at its index;
    `eval_step` must then return replicated outputs."""
    totals: dict[str, float] = {}
    for batch in batches:
        local = {k: batch[k] for k in ("image", "label", "mask", "index")}
        sums, rows = eval_step(params, batch_stats, to_global(local, sharding))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + v
        if predictions is not None:
            top1, index, mask = (np.asarray(rows[k]) for k in ("top1", "index", "mask"))
            predictions[index[mask]] = top1[mask]
    return summarize_eval({k: float(v) for k, v in totals.items()})


class StopRequest:
    """Set by SIGTERM/SIGINT; the loop finishes its step, saves and returns."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("received signal %d: finishing the current step, then saving", signum)
        self.signal = signum

    def requested(self, in_flight: Any = None) -> bool:
        """Whether any process got a signal. With several processes this is a collective: it
        first waits for `in_flight` (the step just dispatched), because XLA:CPU runs programs
        asynchronously and two processes could otherwise pair the step's gloo collectives with
        this one's in different orders and deadlock (seen in the two-process test)."""
        flag = np.array(self.signal is not None)
        if jax.process_count() > 1:  # every process must stop at the same step
            jax.block_until_ready(in_flight)
            flag = np.any(multihost_utils.process_allgather(flag))
        return bool(flag)


class MetricsLog:
    """Console lines, TensorBoard scalars and `metrics.jsonl` (written by process 0 only)."""

    def __init__(self, workdir: Path) -> None:
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._jsonl = open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, kind: str, step: int, values: dict[str, float], line: str) -> None:
        if not self.enabled:
            return
        print(line, flush=True)
        self._jsonl.write(json.dumps({"event": kind, "step": step, **values}) + "\n")
        self._jsonl.flush()
        for k, v in values.items():
            if isinstance(v, int | float):
                self._tb.add_scalar(f"{kind}/{k}", v, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def _checkpoint_manager(directory: Path, keep: int, best: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=not best,
        best_fn=(lambda m: m["top1"]) if best else None,
        best_mode="max",
        create=True,
    )
    # orbax rejects relative paths when it saves (README's `--workdir runs/digits` is one)
    return ocp.CheckpointManager(directory.absolute(), options=options)


def model_description(config: Any) -> dict[str, Any]:
    return {"width": check_width(config.width), "num_classes": config.num_classes}


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


def abstract_state(config: Any) -> TrainState:
    """The shapes and dtypes of a `TrainState` for `config`, computing nothing."""
    model = abstract_model(check_width(config.width), config.num_classes)
    _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    opt_state = jax.eval_shape(optim.make_optimizer(config, params).init, params)
    ema = params if config.ema_decay > 0 else None
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, batch_stats, opt_state, ema)


def restore_latest(
    manager: ocp.CheckpointManager,
    config: Any,
    sharding: jax.sharding.Sharding,
    data_iter: Any = None,
) -> TrainState | None:
    """The newest checkpoint that restores cleanly (older ones after a warning), or None.
    Arrays are placed with `sharding`; `data_iter`, if given, is set to the saved position."""
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract_state(config)
    )
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            _check_same_model(meta["meta"], config, Path(manager.directory))
            items = {"state": ocp.args.StandardRestore(target)}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            return manager.restore(step, args=ocp.args.Composite(**items))["state"]
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


def latest_state(config: Any, workdir: str | os.PathLike) -> TrainState | None:
    """The newest usable training state in `workdir` (on the first device), or None."""
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    manager = _checkpoint_manager(directory, config.keep_checkpoints)
    try:
        return restore_latest(manager, config, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    finally:
        manager.close()


@dataclasses.dataclass
class Result:
    """What a call to `train_and_evaluate` ended with."""

    state: TrainState
    eval_metrics: dict[str, float] | None
    stopped_by_signal: bool


def _first_non_finite(pending: list[tuple[int, jax.Array]]) -> tuple[int, float] | None:
    for step, loss in pending:
        value = float(loss)
        if not math.isfinite(value):
            return step, value
    return None


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(
    config: Any,
    workdir: str | os.PathLike,
    *,
    stop_after: int | None = None,
    train_batches: Iterator[Batch] | None = None,
) -> Result:
    """Train per `config` in `workdir`, resuming from its newest good checkpoint.

    `stop_after` ends this call after that many total steps (saving a checkpoint), as a
    preemption would; `train_batches` replaces the dataset's stream (per-process batches).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh(config.num_devices)
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    local_batch = check_batch(config.batch_size, mesh)
    local_eval_batch = check_batch(config.eval_batch_size, mesh, "eval_batch_size")
    pidx, pcount = jax.process_index(), jax.process_count()

    train_split = input_pipeline.load_split(config.dataset, config.train_split, config.data_dir)
    eval_split = input_pipeline.load_split(config.dataset, config.eval_split, config.data_dir)
    if train_split.num_classes != config.num_classes:
        raise ValueError(
            f"{config.dataset} has {train_split.num_classes} classes, config.num_classes is "
            f"{config.num_classes}"
        )
    train_ds = input_pipeline.train_dataset(
        train_split,
        batch_size=local_batch,
        transform=train_transform(config),
        seed=config.seed,
        process_index=pidx,
        process_count=pcount,
        skip_corrupt=config.skip_corrupt,
        worker_count=config.worker_count,
        read_threads=config.read_threads,
    )

    def eval_batches():
        return eval_dataset(config, eval_split, local_eval_batch)

    graphdef, tx, state = create_optimizer_and_state(config, create_model(config))
    data_iter = iter(train_ds)
    managers = {
        "latest": _checkpoint_manager(workdir / "checkpoints", config.keep_checkpoints),
        "best": _checkpoint_manager(workdir / "best", 1, best=True),
    }
    restored = restore_latest(managers["latest"], config, replicated, data_iter)
    if restored is not None:
        state = restored
        log.warning("resumed from step %d in %s", int(state.step), workdir / "checkpoints")
    state = jax.device_put(state, replicated)
    batches = data_iter if train_batches is None else train_batches

    train_step = jax.jit(
        make_train_step(config, graphdef, tx),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
        compiler_options=train_compiler_options(),
    )
    eval_step = make_eval_step(graphdef, mesh)
    lr_at = optim.schedule(config)
    metrics_log = MetricsLog(workdir)
    steps_per_epoch = len(train_split) / config.batch_size
    end = config.total_steps if stop_after is None else min(stop_after, config.total_steps)

    def save(step: int) -> None:
        meta = {**model_description(config), "step": step, "dataset": config.dataset}
        managers["latest"].save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave(meta),
                data=grain.checkpoint.CheckpointSave(data_iter),
            ),
        )

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(eval_step, state.params, state.batch_stats, eval_batches(), data_sharding)
        if state.ema_params is not None:
            ema = evaluate(
                eval_step, state.ema_params, state.batch_stats, eval_batches(), data_sharding
            )
            result.update({f"ema_{k}": v for k, v in ema.items() if k != "examples"})
        metrics_log.write(
            "eval",
            step,
            result,
            f"eval  step {step}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
            f"loss {result['loss']:.4f} ({result['examples']} examples)",
        )
        model = nnx.merge(graphdef, state.params, state.batch_stats)
        managers["best"].save(
            step,
            args=checkpoint.model_save_args(model, source=f"training step {step}"),
            metrics={"top1": result["top1"]},
        )
        return result

    step = int(state.step)
    pending: list[tuple[int, jax.Array]] = []
    eval_metrics = None
    stopped = False
    window_start, window_steps = time.perf_counter(), 0
    try:
        with StopRequest() as stop:
            while step < end:
                batch = next(batches)
                state, metrics = train_step(state, to_global(batch, data_sharding))
                step += 1
                window_steps += 1
                pending.append((step, metrics["loss"]))
                stopped = stop.requested(in_flight=metrics)
                last = step == end or stopped
                if step % config.log_every == 0 or last or step % config.checkpoint_every == 0:
                    bad = _first_non_finite(pending)
                    pending.clear()
                    if bad is not None:
                        raise FloatingPointError(
                            f"non-finite training loss {bad[1]} at step {bad[0]}; the last "
                            f"good checkpoint in {workdir / 'checkpoints'} is kept"
                        )
                if step % config.log_every == 0 or last:
                    elapsed = time.perf_counter() - window_start
                    ips = window_steps * config.batch_size / max(elapsed, 1e-9)
                    values = {
                        "loss": float(metrics["loss"]),
                        "top1": float(metrics["top1"]),
                        "lr": float(lr_at(max(step - 1, 0) // config.grad_accum_steps)),
                        "epoch": step / steps_per_epoch,
                        "images_per_second": ips,
                    }
                    eta = (config.total_steps - step) * config.batch_size / max(ips, 1e-9)
                    metrics_log.write(
                        "train",
                        step,
                        values,
                        f"step {step}/{config.total_steps} epoch {values['epoch']:.2f} "
                        f"loss {values['loss']:.4f} top-1 {values['top1']:.3f} "
                        f"lr {values['lr']:.4g} {ips:.1f} img/s ETA {_format_eta(eta)}",
                    )
                    window_start, window_steps = time.perf_counter(), 0
                at_end = step == config.total_steps and config.eval_at_end
                if step % config.eval_every == 0 or at_end:
                    eval_metrics = run_eval(step)
                if step % config.checkpoint_every == 0 or last:
                    save(step)
                if stopped:
                    log.warning("stopping at step %d after a signal; checkpoint saved", step)
                    break
    finally:
        for m in managers.values():
            m.wait_until_finished()
            m.close()
        metrics_log.close()
    return Result(state, eval_metrics, stopped)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """`jax.distributed.initialize`; CPU devices use gloo collectives (other backends ignore it)."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
