"""The paper's guideline experiments (Tables 1-4) as JAX functions with their analytic FLOPs.

Each table is a list of rows; a row builds `(fn, args)` for one network and knows its analytic
multiply-accumulate count. Setups follow the paper (10 stacked blocks, 56x56 inputs, random
weights); where it is silent the choices are stated here:
- G1: a block is a 1x1 conv c1->c2 then c2->c1, no BatchNorm or ReLU between them.
- G2: a block is one 1x1 group conv c->c with g groups (written as a grouped matmul).
- G3: "k-series": k 1x1 convs c'->c' in a row, c' = round(c / sqrt(k)) so the FLOPs match;
  "k-parallel": k 1x1 convs c->c/k side by side on the same input, outputs concatenated.
- G4: a ResNet bottleneck with every conv c->c (1x1, 3x3, 1x1), ReLU after the first two
  convs and after the shortcut addition; "no ReLU" drops all three, "no shortcut" the addition.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = 10
SIZE = 56


@dataclasses.dataclass(frozen=True)
class Row:
    """One network of a table: its label, builder and the paper's measurements (if any)."""

    label: str
    build: Callable[[int, int], tuple[Callable, tuple]]  # (batch, seed) -> (fn, args)
    macs_per_image: int
    paper_gpu: float | None = None  # batches/s, GTX 1080Ti
    paper_arm: float | None = None  # images/s, Snapdragon 810


def _weights(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, np.float32) * np.sqrt(2.0 / shape[-2]))


def _input(rng: np.random.Generator, batch: int, channels: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal((batch, SIZE, SIZE, channels), np.float32))


def _pointwise(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("bhwc,cd->bhwd", x, w)


def g1_row(c1: int, c2: int, gpu: float | None = None, arm: float | None = None) -> Row:
    def build(batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        ws = [(_weights(rng, c1, c2), _weights(rng, c2, c1)) for _ in range(BLOCKS)]

        def fn(ws, x):
            for a, b in ws:
                x = _pointwise(_pointwise(x, a), b)
            return x

        return fn, (ws, _input(rng, batch, c1))

    return Row(f"c1:c2 = {c1}:{c2}", build, BLOCKS * 2 * SIZE * SIZE * c1 * c2, gpu, arm)


def g2_row(c: int, groups: int, gpu: float | None = None) -> Row:
    def build(batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        ws = [_weights(rng, groups, c // groups, c // groups) for _ in range(BLOCKS)]

        def fn(ws, x):
            b, h, w, _ = x.shape
            for k in ws:
                x = jnp.einsum("bhwgi,gio->bhwgo", x.reshape(b, h, w, groups, -1), k)
                x = x.reshape(b, h, w, c)
            return x

        return fn, (ws, _input(rng, batch, c))

    return Row(f"g = {groups}, c = {c}", build, BLOCKS * SIZE * SIZE * c * c // groups, gpu)


def g3_row(c: int, fragments: int, parallel: bool, gpu: float | None = None) -> Row:
    width = c if parallel else round(c / math.sqrt(fragments))

    def build(batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        if parallel:
            ws = [
                [_weights(rng, c, c // fragments) for _ in range(fragments)] for _ in range(BLOCKS)
            ]
        else:
            ws = [[_weights(rng, width, width) for _ in range(fragments)] for _ in range(BLOCKS)]

        def fn(ws, x):
            for block in ws:
                if parallel:
                    x = jnp.concatenate([_pointwise(x, w) for w in block], axis=-1)
                else:
                    for w in block:
                        x = _pointwise(x, w)
            return x

        return fn, (ws, _input(rng, batch, width))

    if fragments == 1:
        label = "1-fragment"
    else:
        label = f"{fragments}-fragment-{'parallel' if parallel else 'series'}"
    macs = BLOCKS * SIZE * SIZE * (c * c if parallel else fragments * width * width)
    return Row(label, build, macs, gpu)


def g4_row(c: int, relu: bool, shortcut: bool, gpu: float | None = None) -> Row:
    def build(batch: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        ws = [
            (_weights(rng, c, c), _weights(rng, 3, 3, c, c), _weights(rng, c, c))
            for _ in range(BLOCKS)
        ]
        act = jax.nn.relu if relu else (lambda v: v)

        def fn(ws, x):
            for a, k, b in ws:
                y = act(_pointwise(x, a))
                y = jax.lax.conv_general_dilated(
                    y, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                y = _pointwise(act(y), b)
                x = act(y + x) if shortcut else act(y)
            return x

        return fn, (ws, _input(rng, batch, c))

    label = {
        (True, True): "ReLU and shortcut",
        (False, True): "no ReLU",
        (True, False): "no shortcut",
        (False, False): "neither",
    }[(relu, shortcut)]
    # a padded 3x3 conv makes (3H-2)(3W-2) in-bounds multiply-adds per channel pair, not 9HW
    taps = (3 * SIZE - 2) ** 2
    return Row(label, build, BLOCKS * c * c * (2 * SIZE * SIZE + taps), gpu)


def tables(multiplier: int = 1) -> dict[str, list[Row]]:
    """Tables 1-4 at channel multiplier 1 (the paper's "x1" column), 2 or 4."""
    m = multiplier
    gpu1 = {1: (1480, 1296, 876, 748)}.get(m, (None,) * 4)
    arm1 = {1: (76.2, 72.9, 69.1, 57.6)}.get(m, (None,) * 4)
    g1_gpu = [(128, 128), (90, 180), (52, 312), (36, 432)]
    gpu2 = {1: (2451, 1725, 1026, 634)}.get(m, (None,) * 4)
    gpu3 = {1: (2446, 1790, 752, 1537, 691)}.get(m, (None,) * 5)
    gpu4 = {1: (2427, 2647, 2672, 2842)}.get(m, (None,) * 4)
    return {
        "G1 (Table 1): equal channel widths minimize memory access cost": [
            g1_row(c1 * m, c2 * m, g, a) for (c1, c2), g, a in zip(g1_gpu, gpu1, arm1, strict=True)
        ],
        "G2 (Table 2): group convolution increases memory access cost": [
            g2_row(c * m, g, p)
            for (c, g), p in zip([(128, 1), (180, 2), (256, 4), (360, 8)], gpu2, strict=True)
        ],
        "G3 (Table 3): network fragmentation reduces parallelism": [
            g3_row(128 * m, k, par, p)
            for (k, par), p in zip(
                [(1, False), (2, False), (4, False), (2, True), (4, True)], gpu3, strict=True
            )
        ],
        "G4 (Table 4): element-wise operations are not negligible": [
            g4_row(32 * m, relu, short, p)
            for (relu, short), p in zip(
                [(True, True), (True, False), (False, True), (False, False)], gpu4, strict=True
            )
        ],
    }
