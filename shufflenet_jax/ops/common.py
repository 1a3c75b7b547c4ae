"""Helpers shared by the ops: the check of an array at a public boundary, the accumulation
dtype, window views, channel matmuls."""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def check_array(x: Any, shape: tuple[int | None, ...], kind: type | None, expected: str) -> None:
    """One clear ValueError, "`expected`; got DTYPE[SHAPE]", where `x` is not an array of
    `shape` (None: any size; so the rank too) with a dtype of `kind` (float, int; None: any):
    chex's checks, on the static shape, so free inside a jitted function."""
    try:
        chex.assert_shape(x, shape)
        if kind is not None:
            chex.assert_type(x, kind)
    except AssertionError:
        got = f"{getattr(x, 'dtype', type(x).__name__)}{list(getattr(x, 'shape', ()))}"
        raise ValueError(f"{expected}; got {got}") from None


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype sums over `dtype` values accumulate in: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def windows(x: Array, kh: int, kw: int, stride: int, pad_value: float = 0.0) -> list[Array]:
    """The kh*kw strided views of x (padded by k//2 with `pad_value`) that a kh x kw window
    operation combines, in row-major tap order."""
    n, h, w, c = x.shape
    ph, pw = kh // 2, kw // 2
    ho, wo = (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=pad_value)
    return [
        lax.slice(
            xp,
            (0, i, j, 0),
            (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
            (1, stride, stride, 1),
        )
        for i in range(kh)
        for j in range(kw)
    ]


def matmul_channels(x: Array, w: Array) -> Array:
    """(N, H, W, C) x (C, D) as one 2-D matmul over N*H*W rows (and 2-D matmuls in its gradient)."""
    n, h, w_, c = x.shape
    acc = accumulation_dtype(x.dtype)
    y = jnp.matmul(x.reshape(n * h * w_, c), w.astype(x.dtype), preferred_element_type=acc)
    return y.astype(x.dtype).reshape(n, h, w_, w.shape[1])
