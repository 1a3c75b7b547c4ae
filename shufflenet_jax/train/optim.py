"""Optimizer, learning-rate schedule and weight-decay mask from a training config."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate(config: Any) -> float:
    """Peak learning rate: `base_learning_rate` scaled linearly from `base_batch_size`."""
    o = config.optim
    global_batch = config.train.batch_size * o.grad_accum_steps
    return o.base_learning_rate * global_batch / o.base_batch_size


def schedule(config: Any) -> optax.Schedule:
    """Learning rate per optimizer update: optional linear warm-up, then linear or cosine to 0."""
    o, peak = config.optim, learning_rate(config)
    updates = config.train.total_steps // o.grad_accum_steps
    warmup = min(o.warmup_steps, updates)
    if o.schedule == "linear":
        decay = optax.linear_schedule(peak, 0.0, max(updates - warmup, 1))
    elif o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, max(updates - warmup, 1))
    else:
        raise ValueError(f"unknown schedule {o.schedule!r}; use 'linear' or 'cosine'")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
    """True exactly for convolution and linear kernels (not BatchNorm scales, not biases)."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _variable_name(p) == "kernel", params)


def _variable_name(path: tuple) -> str:
    """The attribute name of the variable a leaf belongs to (NNX adds a trailing `.value`)."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return str(names[-1]) if names else ""


def make_optimizer(config: Any, params: Any) -> optax.GradientTransformation:
    """SGD with momentum (optionally Nesterov) and coupled L2 weight decay on the kernels, as
    PyTorch's `SGD(weight_decay=...)` in the official recipe; `grad_accum_steps` > 1 averages
    that many micro-batch gradients per update."""
    o = config.optim
    if o.optimizer != "sgd":
        raise ValueError(f"unknown optimizer {o.optimizer!r}; this recipe uses 'sgd'")
    tx = optax.chain(
        optax.add_decayed_weights(o.weight_decay, mask=weight_decay_mask(params)),
        optax.sgd(schedule(config), momentum=o.momentum, nesterov=o.nesterov),
    )
    if o.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=o.grad_accum_steps)
    return tx
