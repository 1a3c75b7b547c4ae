"""BatchNorm in training mode with float32 statistics and a hand-written gradient."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from shufflenet_jax import kernels as cpp
from shufflenet_jax.ops.common import accumulation_dtype
from shufflenet_jax.ops.dispatch import on_cpu

Array = jax.Array


def _batch_norm(x: Array, scale: Array, bias: Array, eps: float, kernels: str):
    """(y, mean, var, 1/sqrt(var + eps)): batch statistics over N, H, W in two passes (one C++
    pass on the CPU in float32), then the normalized, scaled and shifted x."""
    xf = x.astype(accumulation_dtype(x.dtype))
    mean = xf.mean(axis=(0, 1, 2))
    var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
    if x.size:
        mean, var = on_cpu(kernels, cpp.channel_moments, (mean, var), x)
    inv = lax.rsqrt(var + eps)
    y = ((xf - mean) * (inv * scale) + bias).astype(x.dtype)
    return y, mean, var, inv


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_train(
    x: Array, scale: Array, bias: Array, eps: float, kernels: str
) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over N, H, W: (normalized x, batch mean, biased batch variance).

    Statistics in float32 (float64 for float64 x); `kernels` is the family that computes its
    per-channel sums (`ops.dispatch`). Its gradient is the closed form with two
    reductions (sum of g, sum of g * x_hat); autodiff of the same formula reduces about six
    times per layer, and on XLA:CPU each reduction is a separate pass (docs/performance.md).
    """
    return _batch_norm(x, scale, bias, eps, kernels)[:3]


def _batch_norm_fwd(x: Array, scale: Array, bias: Array, eps: float, kernels: str):
    y, mean, var, inv = _batch_norm(x, scale, bias, eps, kernels)
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(eps: float, kernels: str, res, cotangents):
    x, mean, inv, scale = res
    gy, gmean, gvar = cotangents
    n = x.shape[0] * x.shape[1] * x.shape[2]
    centered = x.astype(mean.dtype) - mean
    g = gy.astype(mean.dtype)
    sums = g.sum(axis=(0, 1, 2)), (g * centered).sum(axis=(0, 1, 2))
    if x.size:
        sums = on_cpu(kernels, cpp.batch_norm_grad_sums, sums, gy, x, mean)
    dbias, dscale = sums[0], sums[1] * inv
    dx = (scale * inv / n) * (n * g - dbias - centered * (inv * dscale))
    # the mean and variance outputs feed the running statistics, normally not the loss
    dx = dx + (gmean + 2.0 * gvar * centered) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)
