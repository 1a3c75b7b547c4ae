"""The channel shuffle and two equivalent formulations of it."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

Array = jax.Array


@partial(jax.jit, static_argnames="groups")
def channel_shuffle(x: Array, groups: int) -> Array:
    """Interleave `groups` channel groups: output k*groups+g is input channel g*(C/groups)+k."""
    if x.ndim != 4:
        raise ValueError(f"channel_shuffle expects an NHWC array of rank 4, got shape {x.shape}")
    n, h, w, c = x.shape
    if groups < 1 or c % groups:
        raise ValueError(
            f"channel_shuffle: {c} channels cannot be split into {groups} equal groups"
        )
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)


def channel_shuffle_stack(x: Array, groups: int) -> Array:
    """`channel_shuffle` written as split, stack on a new last axis, reshape (no transpose op)."""
    n, h, w, c = x.shape
    return jnp.stack(jnp.split(x, groups, axis=-1), axis=-1).reshape(n, h, w, c)


def channel_shuffle_gather(x: Array, groups: int) -> Array:
    """`channel_shuffle` as a gather with the permutation's index vector."""
    c = x.shape[-1]
    perm = jnp.arange(c).reshape(groups, c // groups).T.reshape(c)
    return jnp.take(x, perm, axis=-1)
