"""The steps, one module for train.py, eval.py, the tests and the benchmarks: jitted pure
functions over the state pytrees (no NNX graph work per call), compiled with the XLA options
that suit each on the backend, and sharded over a mesh when given one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from shufflenet_jax.compiler_options import eval_compiler_options, train_compiler_options
from shufflenet_jax.data.augment import make_augment
from shufflenet_jax.data.normalization import standardize
from shufflenet_jax.model.inference import apply
from shufflenet_jax.ops import accumulation_dtype
from shufflenet_jax.ops.common import check_array
from shufflenet_jax.train.parallel import data_sharding, replicated, to_global
from shufflenet_jax.train.state import TrainState, compute_dtype

Array = jax.Array


Batch = dict[str, Array]


def check_batch(batch: Batch, keys: tuple[str, ...]) -> None:
    """One clear error where a step's batch lacks one of `keys` or one is not what the step
    takes: NHWC RGB images (uint8 crops or standardized floats), and per image an integer
    label, a boolean `mask` (real, not padding) and an integer record `index`."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"the batch has no {', '.join(missing)} (it has {', '.join(batch)})")
    check_array(batch["image"], (None, None, None, 3), None, "batch['image'] must be NHWC RGB")
    n = batch["image"].shape[0]
    for key, kind in (("label", int), ("mask", bool), ("index", int)):
        if key in keys:
            check_array(
                batch[key], (n,), kind, f"batch[{key!r}] must be one {kind.__name__} per image"
            )


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    dtype: Any = jnp.float32,
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
    augment: Callable[[Array, Array], Array] | None = None,
    mesh: Mesh | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """`state, metrics = train_step(state, {"image": ..., "label": ...})`, jitted.

    Smoothed cross-entropy on integer labels in `dtype` (parameters and BatchNorm statistics
    stay float32, logits are float32 for bfloat16), BatchNorm in training mode, the optimizer
    update and, with `ema_decay` > 0, the EMA of the weights; metrics are the loss and top-1.
    uint8 images go through `augment(step, images)` first (`data.augment.make_augment`), or
    without one are only normalized, as the eval step does.
    The state is donated. With `mesh` the batch is split over its `data` axis and the state
    replicated. `compiler_options` default to `train_compiler_options()`.
    """

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        check_batch(batch, ("image", "label"))
        images = batch["image"]
        if images.dtype == jnp.uint8:
            images = standardize(images) if augment is None else augment(state.step, images)

        def loss_fn(params, batch_stats):
            compute = jax.tree.map(lambda p: p.astype(dtype), params)
            model = nnx.merge(graphdef, compute, batch_stats, copy=True)
            model.train()
            logits = model(images.astype(dtype)).astype(accumulation_dtype(dtype))
            targets = jax.nn.one_hot(batch["label"], logits.shape[-1])
            targets = optax.smooth_labels(targets, label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = _ema_update(ema, params, ema_decay, tx, opt_state)
        metrics = {"loss": loss, "top1": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}
        return TrainState(state.step + 1, params, batch_stats, opt_state, ema), metrics

    shardings = {}
    if mesh is not None:
        rep = replicated(mesh)
        shardings = dict(in_shardings=(rep, data_sharding(mesh)), out_shardings=(rep, rep))
    return jax.jit(
        train_step,
        donate_argnums=0,
        compiler_options=train_compiler_options() if compiler_options is None else compiler_options,
        **shardings,
    )


def _ema_update(
    ema: nnx.State, params: nnx.State, decay: float, tx: Any, opt_state: Any
) -> nnx.State:
    """decay * ema + (1 - decay) * params after an optimizer update; with gradient accumulation
    (optax.MultiSteps) the micro-steps that only accumulate leave the EMA as it is."""
    moved = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, params)
    if not isinstance(tx, optax.MultiSteps):
        return moved
    updated = tx.has_updated(opt_state)
    return jax.tree.map(lambda m, e: jnp.where(updated, m, e), moved, ema)


def train_step_for(
    config: Any,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    backend: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """`make_train_step` with the config's compute dtype, label smoothing, EMA and device-side
    augmentation: train.py's, compiled with the options for `backend` (default: JAX's)."""
    o = config.optim
    return make_train_step(
        graphdef,
        tx,
        dtype=compute_dtype(config),
        label_smoothing=o.label_smoothing,
        ema_decay=o.ema_decay,
        augment=make_augment(config.train.seed, config.data.color_jitter),
        mesh=mesh,
        compiler_options=train_compiler_options(backend),
    )


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None, backend: str | None = None):
    """`sums, predictions = eval_step(params, batch_stats, batch)`: masked counts of correct
    top-1 and top-5, summed cross-entropy and the number of real examples; and each row's top-1
    class with the batch's `index` and `mask`. uint8 images are normalized first (the eval
    stream's crops: `data.normalization.standardize`). Jitted with `eval_compiler_options(backend)`,
    its outputs replicated over `mesh` when given."""

    def eval_step(params, batch_stats, batch):
        check_batch(batch, ("image", "label", "mask", "index"))
        images = batch["image"]
        if images.dtype == jnp.uint8:
            images = standardize(images)
        logits = apply(graphdef, params, batch_stats, images).astype(jnp.float32)
        sums, top1 = classification_sums(logits, batch["label"], batch["mask"])
        return sums, {"top1": top1, "index": batch["index"], "mask": batch["mask"]}

    shardings = {} if mesh is None else dict(out_shardings=replicated(mesh))
    return jax.jit(eval_step, compiler_options=eval_compiler_options(backend), **shardings)


def classification_sums(
    logits: Array, labels: Array, mask: Array
) -> tuple[dict[str, Array], Array]:
    """Masked counts of correct top-1 and top-5, summed cross-entropy and the number of real
    examples, and each row's top-1 class: the one definition of the evaluation metrics, for
    the eval step and for an exported model's logits (`evaluation.evaluate_exported`)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    top5 = jax.lax.top_k(logits, 5)[1]
    sums = {
        "correct_top1": jnp.sum((top5[:, 0] == labels) & mask),
        "correct_top5": jnp.sum(jnp.any(top5 == labels[:, None], -1) & mask),
        "loss_sum": jnp.sum(jnp.where(mask, loss, 0.0)),
        "count": jnp.sum(mask),
    }
    return sums, top5[:, 0]


def summarize_eval(sums: dict[str, float]) -> dict[str, float]:
    """Top-1, top-5, mean loss and the example count from an eval step's summed counts."""
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
    """`eval_step` over `batches` (this process's eval batches): top-1, top-5, mean loss and the
    example count. With `predictions` (one slot per record), each example's top-1 class is
    stored at its index; `eval_step` must then return replicated outputs."""
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
