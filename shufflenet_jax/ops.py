"""Array functions behind the ShuffleNet V2 layers: channel shuffle and convolution variants.

All functions take and return NHWC arrays. Each convolution kind has several implementations that
compute the same function; they differ only in how XLA compiles them (see docs/performance.md).
In bfloat16 or float16 every sum, forward and in the gradients, accumulates in float32 and
rounds once (`accumulation_dtype`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from shufflenet_jax import native

Array = jax.Array
_NHWC = ("NHWC", "HWIO", "NHWC")


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype sums over `dtype` values accumulate in: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


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


SHUFFLE_IMPLS: dict[str, Callable[[Array, int], Array]] = {
    "transpose": channel_shuffle,
    "stack": channel_shuffle_stack,
    "gather": channel_shuffle_gather,
}


def conv_lax(x: Array, kernel: Array, stride: int, groups: int = 1) -> Array:
    """Reference convolution via lax.conv, padded k//2 on every side (PyTorch's `padding=k//2`)."""
    pad = kernel.shape[0] // 2
    return lax.conv_general_dilated(
        x,
        kernel.astype(x.dtype),
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=_NHWC,
        feature_group_count=groups,
        preferred_element_type=accumulation_dtype(x.dtype),
    ).astype(x.dtype)


def _windows(x: Array, kh: int, kw: int, stride: int, pad_value: float = 0.0) -> list[Array]:
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


def conv_im2col(x: Array, kernel: Array, stride: int) -> Array:
    """Dense convolution as one matmul over the kh*kw*C_in stacked windows (im2col).

    For the 3-channel stem XLA CPU's convolution is about 2x slower, forward and backward
    (benchmarks/ops.py).
    """
    kh, kw, cin, cout = kernel.shape
    patches = jnp.concatenate(_windows(x, kh, kw, stride), axis=-1)
    return _matmul_channels(patches, kernel.reshape(kh * kw * cin, cout))


def conv_taps(x: Array, kernel: Array, stride: int) -> Array:
    """Dense convolution as kh*kw*C_in broadcast multiply-adds: one element-wise loop.

    For the 3-channel stem this forward pass is about 2.5x faster than im2col on XLA:CPU (no
    stacked windows are written); its gradient is im2col's, where one matmul beats the loop.
    """
    return _conv_taps(x, kernel, stride)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_taps(x: Array, kernel: Array, stride: int) -> Array:
    kh, kw, cin, _ = kernel.shape
    acc = accumulation_dtype(x.dtype)
    k = kernel.astype(x.dtype).astype(acc)
    out = None
    for t, window in enumerate(_windows(x.astype(acc), kh, kw, stride)):
        for c in range(cin):
            term = window[..., c : c + 1] * k[t // kw, t % kw, c]
            out = term if out is None else out + term
    return out.astype(x.dtype)


def _conv_taps_fwd(x: Array, kernel: Array, stride: int) -> tuple[Array, tuple[Array, Array]]:
    return _conv_taps(x, kernel, stride), (x, kernel)


def _conv_taps_bwd(stride: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    _, pullback = jax.vjp(lambda x, k: conv_im2col(x, k, stride), x, kernel)
    return pullback(g)


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def _native_usable(*arrays: Array) -> bool:
    """Whether the C++ kernels apply: float32 arrays, the CPU as JAX's default backend (so
    that nothing is compiled with g++ for a GPU or TPU run) and a library that builds here."""
    float32 = all(a.dtype == jnp.float32 for a in arrays)
    return float32 and jax.default_backend() == "cpu" and native.available()


def _on_cpu(kernel: Callable[..., Any], otherwise: Any, *args: Array) -> Any:
    """kernel(*args) when XLA compiles for the CPU, else `otherwise` (an array or a tuple of
    them, chosen at lowering)."""
    return lax.platform_dependent(
        otherwise, *args, cpu=lambda _, *a: kernel(*a), default=lambda o, *_: o
    )


def folded_stage_native(x: Array, units: list[tuple[Array, ...]], reference: Array) -> Array:
    """`native.shuffle_stage(x, units)` when compiling for the CPU in float32 with the C++
    kernels built; otherwise `reference`, the same stage computed by XLA (chosen at lowering)."""
    flat = [a for unit in units for a in unit]
    if not _native_usable(x, *flat):
        return reference
    sizes = [len(unit) for unit in units]

    def kernel(x: Array, *flat: Array) -> Array:
        it = iter(flat)
        return native.shuffle_stage(x, [tuple(next(it) for _ in range(k)) for k in sizes])

    return _on_cpu(kernel, reference, x, *flat)


def folded_stem_native(x: Array, kernel: Array, bias: Array, reference: Array) -> Array:
    """`native.stem_pool(x, kernel, bias)` when compiling for the CPU in float32 with the C++
    kernels built; otherwise `reference`, the same stem and max-pool computed by XLA."""
    if not _native_usable(x, kernel, bias):
        return reference
    return _on_cpu(native.stem_pool, reference, x, kernel, bias)


def _grads_with_cpu_kernel_grad(
    xla_fn: Callable[[Array, Array], Array],
    kernel_grad: Callable[[Array, Array], Array],
    use_kernel: bool,
    x: Array,
    kernel: Array,
    g: Array,
) -> tuple[Array, Array]:
    """xla_fn's gradients w.r.t. (x, kernel) for output gradient g, the kernel's from
    kernel_grad(x, g) instead when use_kernel and compiling for the CPU (XLA drops the other)."""
    _, pullback = jax.vjp(xla_fn, x, kernel)
    dx, dk = pullback(g)
    if use_kernel:
        dk = _on_cpu(kernel_grad, dk, x, g)
    return dx, dk


def conv_native(x: Array, kernel: Array, stride: int) -> Array:
    """Dense convolution for the 3-channel stem: on the CPU in float32, a C++ forward pass for
    3x3 stride 2 (`native.stem_conv`; `conv_taps` for other shapes) and a C++ kernel gradient
    (XLA writes and multiplies im2col's stacked windows).

    Its input gradient (never needed for images) is im2col's. Other dtypes and backends, and
    kernels with more than 64 outputs, use `conv_im2col` throughout (not `conv_taps`: its fused
    loop can round differently when the batch is sharded, which float64 1-vs-8-device training
    then shows at 1e-10).
    """
    return _conv_native(x, kernel, stride)


def _stem_native(x: Array, kernel: Array) -> bool:
    square = kernel.shape[0] == kernel.shape[1]
    return square and kernel.shape[3] <= 64 and _native_usable(x, kernel)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_native(x: Array, kernel: Array, stride: int) -> Array:
    y = conv_im2col(x, kernel, stride)
    if _stem_native(x, kernel):
        if kernel.shape[:2] == (3, 3) and stride == 2:
            y = _on_cpu(native.stem_conv, y, x, kernel)
        else:
            y = _on_cpu(lambda x, k: conv_taps(x, k, stride), y, x, kernel)
    return y


def _conv_native_fwd(x: Array, kernel: Array, stride: int):
    return _conv_native(x, kernel, stride), (x, kernel)


def _conv_native_bwd(stride: int, res: tuple[Array, Array], g: Array):
    x, kernel = res
    return _grads_with_cpu_kernel_grad(
        lambda x, k: conv_im2col(x, k, stride),
        lambda x, g: native.dense_kernel_grad(x, g, kernel.shape, stride),
        _stem_native(x, kernel) and g.dtype == jnp.float32,
        x,
        kernel,
        g,
    )


_conv_native.defvjp(_conv_native_fwd, _conv_native_bwd)


def depthwise_lax(x: Array, kernel: Array, stride: int) -> Array:
    """Depthwise conv as a grouped `lax.conv` (kernel HWIO with I=1): the reference path."""
    return conv_lax(x, kernel, stride, groups=x.shape[-1])


def depthwise_shifted(x: Array, kernel: Array, stride: int) -> Array:
    """Depthwise conv as kh*kw shifted multiply-adds over the padded input.

    XLA fuses the whole sum into one element-wise loop, which on CPU is an order of magnitude faster
    than the grouped convolution (../shared/reference/cpu_measurements.md).
    """
    kh, kw = kernel.shape[:2]
    acc = accumulation_dtype(x.dtype)
    k = kernel.astype(x.dtype).astype(acc)
    out = None
    for t, window in enumerate(_windows(x.astype(acc), kh, kw, stride)):
        term = window * k[t // kw, t % kw, 0]
        out = term if out is None else out + term
    return out.astype(x.dtype)


def depthwise_native(x: Array, kernel: Array, stride: int) -> Array:
    """`depthwise_shifted` whose float32 3x3 kernel gradient on the CPU is a C++ kernel.

    XLA:CPU materializes the nine shifted windows for that gradient; the kernel
    (native.depthwise_kernel_grad) reads input and output gradient once. Other dtypes, kernel
    sizes and backends, or a machine where the kernel cannot be built, use XLA's gradient.
    """
    return _depthwise_native(x, kernel, stride)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_native(x: Array, kernel: Array, stride: int) -> Array:
    return depthwise_shifted(x, kernel, stride)


def _depthwise_native_fwd(x: Array, kernel: Array, stride: int):
    return depthwise_shifted(x, kernel, stride), (x, kernel)


def _depthwise_native_bwd(stride: int, res: tuple[Array, Array], g: Array):
    x, kernel = res
    return _grads_with_cpu_kernel_grad(
        lambda x, k: depthwise_shifted(x, k, stride),
        lambda x, g: native.depthwise_kernel_grad(x, g, stride),
        kernel.shape[:2] == (3, 3) and stride in (1, 2) and _native_usable(x, g, kernel),
        x,
        kernel,
        g,
    )


_depthwise_native.defvjp(_depthwise_native_fwd, _depthwise_native_bwd)


def pointwise_lax(x: Array, kernel: Array) -> Array:
    """1x1 convolution through `lax.conv`: the reference path."""
    return conv_lax(x, kernel, stride=1)


def _matmul_channels(x: Array, w: Array) -> Array:
    """(N, H, W, C) x (C, D) as one 2-D matmul over N*H*W rows (and 2-D matmuls in its gradient)."""
    n, h, w_, c = x.shape
    acc = accumulation_dtype(x.dtype)
    y = jnp.matmul(x.reshape(n * h * w_, c), w.astype(x.dtype), preferred_element_type=acc)
    return y.astype(x.dtype).reshape(n, h, w_, w.shape[1])


def pointwise_dot(x: Array, kernel: Array) -> Array:
    """1x1 convolution as a matmul over the channels."""
    return _matmul_channels(x, kernel[0, 0])


def pointwise_einsum(x: Array, kernel: Array) -> Array:
    """1x1 convolution as a 4-D einsum over the channels."""
    acc = accumulation_dtype(x.dtype)
    k = kernel[0, 0].astype(x.dtype)
    return jnp.einsum("nhwc,cd->nhwd", x, k, preferred_element_type=acc).astype(x.dtype)


DEPTHWISE_IMPLS: dict[str, Callable[[Array, Array, int], Array]] = {
    "lax": depthwise_lax,
    "shifted": depthwise_shifted,
    "native": depthwise_native,
}
DENSE_IMPLS: dict[str, Callable[[Array, Array, int], Array]] = {
    "lax": conv_lax,
    "im2col": conv_im2col,
    "taps": conv_taps,
    "native": conv_native,
}
POINTWISE_IMPLS: dict[str, Callable[[Array, Array], Array]] = {
    "lax": pointwise_lax,
    "dot": pointwise_dot,
    "einsum": pointwise_einsum,
}


def _batch_norm(x: Array, scale: Array, bias: Array, eps: float):
    """(y, mean, var, 1/sqrt(var + eps)): batch statistics over N, H, W in two passes (one C++
    pass on the CPU in float32), then the normalized, scaled and shifted x."""
    xf = x.astype(accumulation_dtype(x.dtype))
    mean = xf.mean(axis=(0, 1, 2))
    var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
    if x.size and _native_usable(x):
        mean, var = _on_cpu(native.channel_moments, (mean, var), x)
    inv = lax.rsqrt(var + eps)
    y = ((xf - mean) * (inv * scale) + bias).astype(x.dtype)
    return y, mean, var, inv


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: Array, scale: Array, bias: Array, eps: float) -> tuple[Array, Array, Array]:
    """Training-mode BatchNorm over N, H, W: (normalized x, batch mean, biased batch variance).

    Statistics in float32 (float64 for float64 x). Its gradient is the closed form with two
    reductions (sum of g, sum of g * x_hat); autodiff of the same formula reduces about six
    times per layer, and on XLA:CPU each reduction is a separate pass (docs/performance.md).
    """
    return _batch_norm(x, scale, bias, eps)[:3]


def _batch_norm_fwd(x: Array, scale: Array, bias: Array, eps: float):
    y, mean, var, inv = _batch_norm(x, scale, bias, eps)
    return (y, mean, var), (x, mean, inv, scale)


def _batch_norm_bwd(eps: float, res, cotangents):
    x, mean, inv, scale = res
    gy, gmean, gvar = cotangents
    n = x.shape[0] * x.shape[1] * x.shape[2]
    centered = x.astype(mean.dtype) - mean
    g = gy.astype(mean.dtype)
    sums = g.sum(axis=(0, 1, 2)), (g * centered).sum(axis=(0, 1, 2))
    if x.size and _native_usable(x, gy, mean):
        sums = _on_cpu(native.batch_norm_grad_sums, sums, gy, x, mean)
    dbias, dscale = sums[0], sums[1] * inv
    dx = (scale * inv / n) * (n * g - dbias - centered * (inv * dscale))
    # the mean and variance outputs feed the running statistics, normally not the loss
    dx = dx + (gmean + 2.0 * gvar * centered) / n
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


batch_norm_train.defvjp(_batch_norm_fwd, _batch_norm_bwd)


@jax.custom_vjp
def max_pool_3x3_s2(x: Array) -> Array:
    """PyTorch's MaxPool2d(3, stride=2, padding=1); padding never wins the max.

    The maximum of the nine strided views, one element-wise loop (XLA CPU's `reduce_window` is a
    separate, slower loop). The gradient goes to the first maximum of each window in row-major
    order, as PyTorch's does; it too is element-wise over the views, where XLA's own
    `reduce_window` gradient (select-and-scatter) takes about twice as long (benchmarks/ops.py).
    """
    views = _windows(x, 3, 3, 2, pad_value=-jnp.inf)
    out = views[0]
    for v in views[1:]:
        out = jnp.maximum(out, v)
    return out


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    out = max_pool_3x3_s2.fun(x)
    return out, (x, out)


def _max_pool_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array]:
    x, out = res
    # overlapping windows add up to four gradients per input: in the accumulation dtype
    acc = accumulation_dtype(x.dtype)
    views, to_input = jax.vjp(lambda x: _windows(x.astype(acc), 3, 3, 2, -jnp.inf), x)
    taken = jnp.zeros(out.shape, bool)
    routed = []
    g, out = g.astype(acc), out.astype(acc)
    for v in views:
        hit = (v == out) & ~taken
        taken = taken | hit
        routed.append(jnp.where(hit, g, jnp.zeros_like(g)))
    return to_input(routed)


def global_average_pool(x: Array) -> Array:
    """Mean over H and W of NHWC x, in the accumulation dtype (float32 for bfloat16 x), so the
    classifier after it runs at that precision too."""
    return x.astype(accumulation_dtype(x.dtype)).mean(axis=(1, 2))


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)
