"""The channel shuffle (its alternative formulations: `lab.variants`)."""

from __future__ import annotations

from functools import partial

import jax

from shufflenet_jax.ops.common import check_array

Array = jax.Array


@partial(jax.jit, static_argnames="groups")
def channel_shuffle(x: Array, groups: int) -> Array:
    """Interleave `groups` channel groups: output k*groups+g is input channel g*(C/groups)+k."""
    check_array(x, (None,) * 4, None, "channel_shuffle expects an NHWC array of rank 4")
    n, h, w, c = x.shape
    if groups < 1 or c % groups:
        raise ValueError(
            f"channel_shuffle: {c} channels cannot be split into {groups} equal groups"
        )
    return x.reshape(n, h, w, groups, c // groups).swapaxes(3, 4).reshape(n, h, w, c)
