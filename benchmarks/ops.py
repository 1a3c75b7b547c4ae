"""Forward and gradient time of each convolution / pooling implementation at ShuffleNet V2 1.0x
shapes (batch 32, 224x224 input), in one process: where the whole-network numbers come from.

    python benchmarks/ops.py [--batch 32] [--repeats 5] [--json OUT]

Each row is an op at the shape where the network uses it; times are medians in milliseconds of
the jitted forward and of the jitted gradient w.r.t. input and weights (a weighted sum as loss),
gradients compiled with the training step's options
(`compiler_options.train_compiler_options`). The last rows time formulations of the depthwise
weight gradient alone (candidates for a custom VJP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lab import variants
from shufflenet_jax import ops
from shufflenet_jax.compiler_options import train_compiler_options
from shufflenet_jax.ops import conv


def _ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def cases(batch: int):
    """(name, implementation, op(x, w), x shape, w shape) at the network's shapes."""
    for impl, fn in variants.DENSE.items():
        yield (
            "stem 3x3/2 3->24",
            impl,
            lambda x, w, fn=fn: fn(x, w, 2),
            (batch, 224, 224, 3),
            (3, 3, 3, 24),
        )
    for impl, fn in variants.DEPTHWISE.items():
        yield (
            "dw 3x3/1 28x28x58",
            impl,
            lambda x, w, fn=fn: fn(x, w, 1),
            (batch, 28, 28, 58),
            (3, 3, 1, 58),
        )
        yield (
            "dw 3x3/2 56x56x58",
            impl,
            lambda x, w, fn=fn: fn(x, w, 2),
            (batch, 56, 56, 58),
            (3, 3, 1, 58),
        )
    for impl, fn in variants.POINTWISE.items():
        yield "1x1 28x28 58->58", impl, fn, (batch, 28, 28, 58), (1, 1, 58, 58)
        yield "1x1 56x56 24->58", impl, fn, (batch, 56, 56, 24), (1, 1, 24, 58)


def _dw_kernel_grad_autodiff(x, g, k, stride):
    return jax.grad(lambda k: jnp.sum(conv.depthwise_shifted(x, k, stride) * g))(k)


def _dw_kernel_grad_per_tap(x, g, k, stride):
    """One sum over N, H, W per tap of window * output gradient."""
    taps = [jnp.sum(w * g, axis=(0, 1, 2)) for w in ops._windows(x, 3, 3, stride)]
    return jnp.stack(taps).reshape(k.shape)


def _dw_kernel_grad_channel_major(x, g, k, stride):
    """Per-tap sums over the minor axis after moving the channels first (row reductions)."""
    n, h, w, c = x.shape
    xc = jnp.transpose(x, (3, 0, 1, 2)).reshape(c * n, h, w, 1)
    gc = jnp.transpose(g, (3, 0, 1, 2)).reshape(c, -1)
    taps = [jnp.sum(v.reshape(c, -1) * gc, axis=1) for v in ops._windows(xc, 3, 3, stride)]
    return jnp.stack(taps).reshape(k.shape)


# Formulations of the depthwise kernel gradient tried as custom-VJP candidates.
DW_KERNEL_GRADS = {
    "autodiff": _dw_kernel_grad_autodiff,
    "per-tap": _dw_kernel_grad_per_tap,
    "chan-major": _dw_kernel_grad_channel_major,
}


def _record(rows: list, op: str, impl: str, forward_ms: float, grad_ms: float) -> None:
    rows.append({"op": op, "impl": impl, "forward_ms": forward_ms, "grad_ms": grad_ms})
    print(f"{op:<26}{impl:<9}forward {forward_ms:8.1f} ms   gradient {grad_ms:8.1f} ms", flush=True)


def _grad_of_weighted_sum(fn, g, argnums):
    loss = jax.grad(lambda *a: jnp.sum(fn(*a) * g), argnums=argnums)
    return jax.jit(loss, compiler_options=train_compiler_options())


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    r = args.repeats
    rng = np.random.default_rng(0)
    rows: list = []
    for name, impl, fn, xs, ws in cases(args.batch):
        x = jnp.asarray(rng.standard_normal(xs, np.float32))
        w = jnp.asarray(rng.standard_normal(ws, np.float32))
        g = jnp.asarray(rng.standard_normal(jax.eval_shape(fn, x, w).shape, np.float32))
        grad = _grad_of_weighted_sum(fn, g, (0, 1))
        _record(rows, name, impl, _ms(jax.jit(fn), x, w, repeats=r), _ms(grad, x, w, repeats=r))
    x = jnp.asarray(rng.standard_normal((args.batch, 112, 112, 24), np.float32))
    g = jnp.asarray(rng.standard_normal((args.batch, 56, 56, 24), np.float32))

    def xla_pool(x):  # XLA's own reduce_window gradient (select-and-scatter), for contrast
        window, strides = (1, 3, 3, 1), (1, 2, 2, 1)
        pad = ((0, 0), (1, 1), (1, 1), (0, 0))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pad)

    for impl, fn in (("ours", ops.max_pool_3x3_s2), ("xla", xla_pool)):
        grad = _grad_of_weighted_sum(fn, g, 0)
        forward = _ms(jax.jit(fn), x, repeats=r)
        _record(rows, "maxpool 3x3/2 112x112x24", impl, forward, _ms(grad, x, repeats=r))
    for stride, shape in ((1, (args.batch, 28, 28, 58)), (2, (args.batch, 56, 56, 58))):
        x = jnp.asarray(rng.standard_normal(shape, np.float32))
        k = jnp.asarray(rng.standard_normal((3, 3, 1, shape[-1]), np.float32))
        g = jnp.asarray(
            rng.standard_normal(
                jax.eval_shape(partial(conv.depthwise_shifted, stride=stride), x, k).shape,
                np.float32,
            )
        )
        for impl, fn in DW_KERNEL_GRADS.items():
            grad = jax.jit(
                lambda x, g, k, fn=fn, stride=stride: fn(x, g, k, stride),
                compiler_options=train_compiler_options(),
            )
            np.testing.assert_allclose(
                grad(x, g, k), _dw_kernel_grad_autodiff(x, g, k, stride), rtol=1e-4, atol=1e-2
            )
            name = f"dw 3x3/{stride} kernel grad only"
            _record(rows, name, impl, float("nan"), _ms(grad, x, g, k, repeats=r))
    if args.json:
        with open(args.json, "w") as f:
            report = {"batch": args.batch, "backend": jax.default_backend(), "rows": rows}
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
