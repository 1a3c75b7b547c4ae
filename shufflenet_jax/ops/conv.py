"""Convolutions: dense (the stem), depthwise and 1x1, each taking NHWC input and its HWIO
weight. The "cpp" family's (`conv_cpp`, `depthwise_cpp`: C++ kernels on the CPU in float32),
the "xla" family's they are built from (`conv_im2col`, `conv_taps`, `depthwise_shifted`,
`pointwise_dot`) and the `lax.conv` references (`*_lax`, what exports use); the experiments'
alternatives and the names that choose among all of them: `lab.variants`."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from shufflenet_jax import kernels
from shufflenet_jax.ops.common import accumulation_dtype, matmul_channels, windows
from shufflenet_jax.ops.dispatch import cpp_applies, on_cpu, with_cpu_weight_grad

Array = jax.Array
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_lax(x: Array, weight: Array, stride: int, groups: int = 1) -> Array:
    """Reference convolution via lax.conv, padded k//2 on every side (PyTorch's `padding=k//2`)."""
    pad = weight.shape[0] // 2
    return lax.conv_general_dilated(
        x,
        weight.astype(x.dtype),
        window_strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        dimension_numbers=_NHWC,
        feature_group_count=groups,
        preferred_element_type=accumulation_dtype(x.dtype),
    ).astype(x.dtype)


def conv_im2col(x: Array, weight: Array, stride: int) -> Array:
    """Dense convolution as one matmul over the kh*kw*C_in stacked windows (im2col).

    For the 3-channel stem it beats XLA CPU's convolution, forward and backward
    (benchmarks/ops.py, docs/performance.md).
    """
    kh, kw, cin, cout = weight.shape
    patches = jnp.concatenate(windows(x, kh, kw, stride), axis=-1)
    return matmul_channels(patches, weight.reshape(kh * kw * cin, cout))


def conv_taps(x: Array, weight: Array, stride: int) -> Array:
    """Dense convolution as kh*kw*C_in broadcast multiply-adds: one element-wise loop.

    For the 3-channel stem this forward pass beats im2col on XLA:CPU (no stacked windows are
    written); its gradient is im2col's, where one matmul beats the loop (docs/performance.md).
    """
    return _conv_taps(x, weight, stride)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_taps(x: Array, weight: Array, stride: int) -> Array:
    kh, kw, cin, _ = weight.shape
    acc = accumulation_dtype(x.dtype)
    k = weight.astype(x.dtype).astype(acc)
    out = None
    for t, window in enumerate(windows(x.astype(acc), kh, kw, stride)):
        for c in range(cin):
            term = window[..., c : c + 1] * k[t // kw, t % kw, c]
            out = term if out is None else out + term
    return out.astype(x.dtype)


def _conv_taps_fwd(x: Array, weight: Array, stride: int) -> tuple[Array, tuple[Array, Array]]:
    return _conv_taps(x, weight, stride), (x, weight)


def _conv_taps_bwd(stride: int, res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, weight = res
    _, pullback = jax.vjp(lambda x, k: conv_im2col(x, k, stride), x, weight)
    return pullback(g)


_conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def conv_cpp(x: Array, weight: Array, stride: int) -> Array:
    """Dense convolution for the 3-channel stem: on the CPU in float32, a C++ forward pass for
    3x3 stride 2 (`kernels.stem_conv`; `conv_taps` for other shapes) and a C++ weight gradient
    (XLA writes and multiplies im2col's stacked windows).

    Its input gradient (never needed for images) is im2col's. Other dtypes and backends, and
    weights with more than 64 outputs, use `conv_im2col` throughout (not `conv_taps`: its fused
    loop can round differently when the batch is sharded, which float64 1-vs-8-device training
    then shows at 1e-10).
    """
    return _conv_cpp(x, weight, stride)


def _stem_cpp(x: Array, weight: Array) -> bool:
    square = weight.shape[0] == weight.shape[1]
    return square and weight.shape[3] <= 64 and cpp_applies("cpp", x, weight)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpp(x: Array, weight: Array, stride: int) -> Array:
    y = conv_im2col(x, weight, stride)
    if _stem_cpp(x, weight):
        if weight.shape[:2] == (3, 3) and stride == 2:
            y = on_cpu("cpp", kernels.stem_conv, y, x, weight)
        else:
            y = on_cpu("cpp", lambda x, k: conv_taps(x, k, stride), y, x, weight)
    return y


def _conv_cpp_fwd(x: Array, weight: Array, stride: int):
    return _conv_cpp(x, weight, stride), (x, weight)


def _conv_cpp_bwd(stride: int, res: tuple[Array, Array], g: Array):
    x, weight = res
    return with_cpu_weight_grad(
        lambda x, k: conv_im2col(x, k, stride),
        lambda x, g: kernels.dense_weight_grad(x, g, weight.shape, stride),
        _stem_cpp(x, weight) and g.dtype == jnp.float32,
        x,
        weight,
        g,
    )


_conv_cpp.defvjp(_conv_cpp_fwd, _conv_cpp_bwd)


def depthwise_lax(x: Array, weight: Array, stride: int) -> Array:
    """Depthwise conv as a grouped `lax.conv` (weight HWIO with I=1): the reference path."""
    return conv_lax(x, weight, stride, groups=x.shape[-1])


def depthwise_shifted(x: Array, weight: Array, stride: int) -> Array:
    """Depthwise conv as kh*kw shifted multiply-adds over the padded input.

    XLA fuses the whole sum into one element-wise loop, which on CPU is much faster than the
    grouped convolution (benchmarks/ops.py, docs/performance.md).
    """
    kh, kw = weight.shape[:2]
    acc = accumulation_dtype(x.dtype)
    k = weight.astype(x.dtype).astype(acc)
    out = None
    for t, window in enumerate(windows(x.astype(acc), kh, kw, stride)):
        term = window * k[t // kw, t % kw, 0]
        out = term if out is None else out + term
    return out.astype(x.dtype)


def depthwise_cpp(x: Array, weight: Array, stride: int) -> Array:
    """`depthwise_shifted` whose float32 3x3 weight gradient on the CPU is a C++ kernel.

    XLA:CPU materializes the nine shifted windows for that gradient; the kernel
    (kernels.depthwise_weight_grad) reads input and output gradient once. Other dtypes, weight
    sizes and backends, or a machine where the kernel cannot be built, use XLA's gradient.
    """
    return _depthwise_cpp(x, weight, stride)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise_cpp(x: Array, weight: Array, stride: int) -> Array:
    return depthwise_shifted(x, weight, stride)


def _depthwise_cpp_fwd(x: Array, weight: Array, stride: int):
    return depthwise_shifted(x, weight, stride), (x, weight)


def _depthwise_cpp_bwd(stride: int, res: tuple[Array, Array], g: Array):
    x, weight = res
    return with_cpu_weight_grad(
        lambda x, k: depthwise_shifted(x, k, stride),
        lambda x, g: kernels.depthwise_weight_grad(x, g, stride),
        weight.shape[:2] == (3, 3) and stride in (1, 2) and cpp_applies("cpp", x, g, weight),
        x,
        weight,
        g,
    )


_depthwise_cpp.defvjp(_depthwise_cpp_fwd, _depthwise_cpp_bwd)


def pointwise_lax(x: Array, weight: Array) -> Array:
    """1x1 convolution through `lax.conv`: the reference path."""
    return conv_lax(x, weight, stride=1)


def pointwise_dot(x: Array, weight: Array) -> Array:
    """1x1 convolution as a matmul over the channels."""
    return matmul_channels(x, weight[0, 0])
