"""The steps, one module for train.py, eval.py, the tests and the benchmarks: jitted pure
functions over the state pytrees (no NNX graph work per call), compiled with the XLA options
that suit each on the backend, and sharded over a mesh when given one."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from shufflenet_jax.data.augment import make_augment
from shufflenet_jax.data.normalization import standardize
from shufflenet_jax.model.network import ShuffleNetV2
from shufflenet_jax.ops import accumulation_dtype
from shufflenet_jax.train.parallel import data_sharding, replicated, to_global
from shufflenet_jax.train.state import TrainState, compute_dtype

Array = jax.Array


def split_model(model: ShuffleNetV2) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, batch_stats): the static structure and the two kinds of arrays."""
    return nnx.split(model, nnx.Param, nnx.BatchStat)


@functools.cache
def _xla_accepts(name: str, value: Any) -> bool:
    """Whether this jaxlib's XLA knows the compile option (XLA:CPU's options come and go
    between releases; an unknown one is an error at compile time)."""
    probe = jax.jit(lambda x: x + 1, compiler_options={name: value})
    try:
        probe.lower(jnp.zeros((), jnp.float32)).compile()
    except jax.errors.JaxRuntimeError as e:
        if "No such compile option" in str(e):
            return False
        raise
    return True


def _known(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if _xla_accepts(k, v)}


def train_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for compiling a training step on `backend` (default: JAX's default backend).

    On the CPU, XLA's older loop emitters compile the backward pass's large element-wise
    fusions into faster code than the default fusion emitters, and YNNPACK's dot fusions help
    training (docs/performance.md). Other backends keep XLA's defaults; options this XLA does
    not know (newer jaxlibs dropped the loop emitters' switch) are left out.
    """
    if (backend or jax.default_backend()) == "cpu":
        return _known(
            {
                "xla_cpu_use_fusion_emitters": False,
                "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT",
            }
        )
    return {}


def eval_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for compiling an inference step on `backend` (default: JAX's default backend).

    On the CPU the 1x1 convolutions' matmuls run faster as XLA's own dot kernels than as
    YNNPACK calls; YNNPACK then keeps only the reductions (docs/performance.md).
    """
    if (backend or jax.default_backend()) == "cpu":
        return _known({"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"})
    return {}


Batch = dict[str, Array]


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


def _logits(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, images: Array):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    model.eval()
    return model(images)


def make_predict(
    graphdef: nnx.GraphDef, compiler_options: dict[str, Any] | None = None
) -> Callable[[nnx.State, nnx.State, Array], Array]:
    """`logits = predict(params, batch_stats, images)`, jitted, BatchNorm on running statistics
    (so the fused inference path). `compiler_options` default to `eval_compiler_options()`."""
    options = eval_compiler_options() if compiler_options is None else compiler_options
    return jax.jit(functools.partial(_logits, graphdef), compiler_options=options)


def predictor(
    model: ShuffleNetV2, compiler_options: dict[str, Any] | None = None
) -> Callable[[Array], Array]:
    """`logits = predict(images)` for `model`'s weights as they are now, BatchNorm on running
    statistics, jitted. The weights are split off once and passed as a flat list of arrays: a
    call walks no module graph (as `nnx.jit` on the module does) and flattens no `nnx.State`
    (about 1 ms per call, a seventh of a 1.0x batch-1 inference on a 2-vCPU machine)."""
    graphdef, params, batch_stats = split_model(model)
    leaves, treedef = jax.tree.flatten((params, batch_stats))
    options = eval_compiler_options() if compiler_options is None else compiler_options

    def logits(leaves: list[Array], images: Array) -> Array:
        return _logits(graphdef, *jax.tree.unflatten(treedef, leaves), images)

    return functools.partial(jax.jit(logits, compiler_options=options), leaves)


def make_eval_step(graphdef: nnx.GraphDef, mesh: Mesh | None = None, backend: str | None = None):
    """`sums, predictions = eval_step(params, batch_stats, batch)`: masked counts of correct
    top-1 and top-5, summed cross-entropy and the number of real examples; and each row's top-1
    class with the batch's `index` and `mask`. uint8 images are normalized first (the eval
    stream's crops: `data.normalization.standardize`). Jitted with `eval_compiler_options(backend)`,
    its outputs replicated over `mesh` when given."""

    def eval_step(params, batch_stats, batch):
        images = batch["image"]
        if images.dtype == jnp.uint8:
            images = standardize(images)
        logits = _logits(graphdef, params, batch_stats, images).astype(jnp.float32)
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

    shardings = {} if mesh is None else dict(out_shardings=replicated(mesh))
    return jax.jit(eval_step, compiler_options=eval_compiler_options(backend), **shardings)


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
