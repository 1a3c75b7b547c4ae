"""The training state pytree and how a config creates it: model, optimizer, EMA."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from shufflenet_jax.model import model_file
from shufflenet_jax.model.config import model_kwargs
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.network import ShuffleNetV2, abstract_model
from shufflenet_jax.train import optim


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes, as one replicated pytree."""

    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    opt_state: Any
    ema_params: nnx.State | None


def create_model(config: Any) -> ShuffleNetV2:
    """A fresh model (one compiled initializer), or `config.model.init_from` with a new head if
    the number of classes differs."""
    kwargs = model_kwargs(config)
    model = nnx.jit(lambda: ShuffleNetV2(**kwargs, rngs=nnx.Rngs(config.train.seed)))()
    if config.model.init_from:
        pretrained = model_file.restore_model(config.model.init_from, width=kwargs["width"])
        values = nnx.to_pure_dict(nnx.state(pretrained))
        if pretrained.num_classes != kwargs["num_classes"]:
            del values["fc"]  # a new head for the new classes, freshly initialized
        nnx.update(model, values)
    return model


def uses_ema(config: Any) -> bool:
    """Whether training keeps an exponential moving average of the weights (`ema_params`):
    the one reading of `config.optim.ema_decay` outside the step's update itself."""
    return config.optim.ema_decay > 0


def create_train_state(config: Any, model: ShuffleNetV2):
    """(graphdef, tx, state) for `model`: step 0, a fresh optimizer state, EMA = the params."""
    graphdef, params, batch_stats = split_model(model)
    tx = optim.make_optimizer(config, params)
    ema = jax.tree.map(jnp.copy, params) if uses_ema(config) else None
    state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, tx.init(params), ema)
    return graphdef, tx, state


def abstract_state(config: Any) -> TrainState:
    """The shapes and dtypes of a `TrainState` for `config`, computing nothing."""
    model = abstract_model(**model_kwargs(config))
    _, params, batch_stats = split_model(model)
    opt_state = jax.eval_shape(optim.make_optimizer(config, params).init, params)
    ema = params if uses_ema(config) else None
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, batch_stats, opt_state, ema)


def compute_dtype(config: Any) -> jnp.dtype:
    """float32, bfloat16 (parameters and BN statistics stay float32), or float64 for numerical
    checks (needs `jax_enable_x64`)."""
    name = config.train.compute_dtype
    if name not in ("float32", "bfloat16", "float64"):
        raise ValueError(f"compute_dtype must be float32, bfloat16 or float64, got {name!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("compute_dtype float64 needs jax_enable_x64")
    return jnp.dtype(name)
