"""How far each op's low-precision results and gradients are from float64 on the same values.

    python -m lab.precision [--dtype bfloat16] [--batch 8] [--only NAME] [--json OUT]

Inputs, weights and the output cotangent are rounded to the low precision once; the float64
reference sees exactly those values, so what differs is the op's own low-precision arithmetic.
`OP_CASES` lists every implementation of every op at the network's shapes; tests bound their
errors and benchmarks/device_check.sh measures them on an accelerator.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lab import variants
from shufflenet_jax import ops
from shufflenet_jax.model.layers import BatchNorm

Array = jax.Array


def relative_error(got: Any, want: Any) -> float:
    """Norm-wise relative error ||got - want|| / ||want||, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def rounded_normal(
    seed: int, shape: Sequence[int], scale: float = 1.0, shift: float = 0.0, dtype=jnp.bfloat16
) -> np.ndarray:
    """Normal values of standard deviation `scale` and mean `shift`, rounded to `dtype`, as a
    float64 numpy array."""
    x = shift + scale * jax.random.normal(jax.random.key(seed), tuple(shape), jnp.float32)
    return np.asarray(x.astype(dtype), np.float64)


def _vjp(fn: Callable, args: Sequence[np.ndarray], cotangent: np.ndarray, dtype) -> list:
    out, pullback = jax.vjp(fn, *[jnp.asarray(a, dtype) for a in args])
    return [out, *pullback(jnp.asarray(cotangent, out.dtype))]


def low_precision_errors(
    fn: Callable, reference: Callable, args: Sequence[np.ndarray], dtype=jnp.bfloat16, seed=0
) -> dict[str, float]:
    """Relative errors of fn's output and of its gradient w.r.t. each argument, computed in
    `dtype`, against `reference` in float64 on the same rounded args and a random cotangent."""
    out = jax.eval_shape(fn, *[jnp.asarray(a, dtype) for a in args])
    cotangent = rounded_normal(seed + 100, out.shape, dtype=dtype)
    got = _vjp(fn, args, cotangent, dtype)
    with jax.enable_x64(True):
        want = [np.asarray(a) for a in _vjp(reference, args, cotangent, jnp.float64)]
    names = ["output"] + [f"grad_arg{i}" for i in range(len(args))]
    return {n: relative_error(g, w) for n, g, w in zip(names, got, want, strict=True)}


def _bn_eval(x: Array, scale: Array, bias: Array) -> Array:
    c = x.shape[-1]
    bn = BatchNorm(c, use_running_average=True)
    bn.mean, bn.var = nnx.BatchStat(jnp.full(c, 0.25)), nnx.BatchStat(jnp.full(c, 2.0))
    bn.scale, bn.bias = nnx.Param(scale), nnx.Param(bias)
    return bn(x)


def _head(x: Array, kernel: Array) -> Array:
    fc = nnx.Linear(*kernel.shape, rngs=nnx.Rngs(0))
    fc.kernel, fc.bias = nnx.Param(kernel), nnx.Param(jnp.zeros(kernel.shape[1], kernel.dtype))
    return fc(ops.global_average_pool(x))


def _bn_train(x: Array, scale: Array, bias: Array) -> Array:
    return ops.batch_norm_train(x, scale, bias, 1e-5, "cpp")[0]


def _op_cases(batch: int) -> dict[str, tuple[Callable, Callable, list[tuple]]]:
    """name: (fn, float64 reference, [(shape, scale[, shift]) per argument of `rounded_normal`])
    at the network's shapes:
    stage 2's depthwise convs at 1.0x (28x28x58) and 0.5x's stride-2 branch 1 (56x56x24), the
    stem, a 1x1 conv of stage 2 and conv5, BatchNorm after the stem, the max-pool, the head."""
    n = batch
    cases = {}
    for name, impl in variants.DEPTHWISE.items():
        for h, c, s in ((28, 58, 1), (56, 24, 2)):
            cases[f"depthwise_{name}_{h}x{h}x{c}_s{s}"] = (
                lambda x, k, impl=impl, s=s: impl(x, k, s),
                lambda x, k, s=s: ops.depthwise_lax(x, k, s),
                [((n, h, h, c), 1.0), ((3, 3, 1, c), 1 / 3)],
            )
    for name, impl in variants.DENSE.items():
        cases[f"stem_{name}_224x224x3"] = (
            lambda x, k, impl=impl: impl(x, k, 2),
            lambda x, k: ops.conv_lax(x, k, 2),
            [((n // 2 or 1, 224, 224, 3), 1.0), ((3, 3, 3, 24), 1 / 5)],
        )
    for name, impl in variants.POINTWISE.items():
        for h, cin, cout in ((28, 116, 58), (7, 464, 1024)):
            cases[f"pointwise_{name}_{h}x{h}x{cin}to{cout}"] = (
                impl,
                ops.pointwise_lax,
                [((n, h, h, cin), 1.0), ((1, 1, cin, cout), cin**-0.5)],
            )
    for h, c in ((112, 24), (28, 58)):
        cases[f"batch_norm_train_{h}x{h}x{c}"] = (
            _bn_train,
            _bn_train,
            [((n, h, h, c), 2.0, 1.0), ((c,), 1.0), ((c,), 1.0)],
        )
    cases["batch_norm_eval_28x28x58"] = (
        _bn_eval,
        _bn_eval,
        [((n, 28, 28, 58), 1.0), ((58,), 1.0), ((58,), 1.0)],
    )
    cases["max_pool_112x112x24"] = (
        ops.max_pool_3x3_s2,
        ops.max_pool_3x3_s2,
        [((n, 112, 112, 24), 1.0)],
    )
    cases["pool_and_classifier_7x7x1024"] = (
        _head,
        _head,
        [((8 * n, 7, 7, 1024), 1.0), ((1024, 1000), 1 / 32)],
    )
    return cases


OP_CASES = _op_cases(batch=8)


def op_errors(name: str, dtype=jnp.bfloat16, cases: dict | None = None) -> dict[str, float]:
    """`low_precision_errors` of one entry of `OP_CASES` (or of `cases`)."""
    fn, reference, arg_specs = (cases or OP_CASES)[name]
    args = [rounded_normal(i + 1, *spec, dtype=dtype) for i, spec in enumerate(arg_specs)]
    return low_precision_errors(fn, reference, args, dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch", type=int, default=8, help="images per op case")
    p.add_argument("--only", nargs="*", help="case names (default: all)")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    cases = _op_cases(args.batch)
    results = {}
    for name in args.only or sorted(cases):
        results[name] = op_errors(name, jnp.dtype(args.dtype), cases)
        worst = max(results[name].items(), key=lambda kv: kv[1])
        print(f"{name:<42} worst relative error {worst[1]:.2e} ({worst[0]})", flush=True)
    if args.json:
        report = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
        report |= {"jax": jax.__version__, "dtype": args.dtype, "batch": args.batch}
        with open(args.json, "w") as f:
            json.dump(report | {"errors": results}, f, indent=1)


if __name__ == "__main__":
    main()
