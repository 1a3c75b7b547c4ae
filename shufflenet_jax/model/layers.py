"""Leaf layers with PyTorch semantics: bias-free convolution, BatchNorm, max-pool, bias."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from shufflenet_jax import ops
from shufflenet_jax.ops.dispatch import check_kernels

Array = jax.Array


# each kernel family's dense (stem) and depthwise convolution; the 1x1 convolutions are
# XLA's dots in both, the shuffle XLA's transpose
FAMILY_CONVS: dict[str, tuple[Callable[[Array, Array, int], Array], ...]] = {
    "cpp": (ops.conv_cpp, ops.depthwise_cpp),
    "xla": (ops.conv_im2col, ops.depthwise_shifted),
}


@dataclasses.dataclass(frozen=True)
class Impl:
    """How the network computes each op: the model's one implementation switch, given to the
    constructor (programs: `config.model.kernels`; experiments: `lab.variants`). Every choice
    computes the same function (tests); the defaults are the fastest measured.

    `kernels` names the kernel family (`ops.dispatch.KERNELS`: "cpp", the C++ CPU kernels in
    float32 on the CPU and XLA elsewhere; "xla", XLA everywhere): it decides BatchNorm's sums,
    the fused inference calls and, unless given, `dense(x, weight, stride)` (the stem's 3x3)
    and `depthwise(x, weight, stride)` (the 3x3 depthwise). `pointwise(x, weight)` is the 1x1
    convolutions, `shuffle(x, groups)` the channel shuffle; `fused_inference` runs an
    inference model's stem and stages as fused calls (`ops.fused_stem_pool`, `ops.fused_stage`).
    """

    kernels: str = "cpp"
    dense: Callable[[Array, Array, int], Array] | None = None
    depthwise: Callable[[Array, Array, int], Array] | None = None
    pointwise: Callable[[Array, Array], Array] = ops.pointwise_dot
    shuffle: Callable[[Array, int], Array] = ops.channel_shuffle
    fused_inference: bool = True

    def __post_init__(self):
        dense, depthwise = FAMILY_CONVS[check_kernels(self.kernels)]
        object.__setattr__(self, "dense", self.dense or dense)
        object.__setattr__(self, "depthwise", self.depthwise or depthwise)


def _conv_kind(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int
) -> str:
    if groups == 1 and kernel_size == 1 and stride == 1:
        return "pointwise"
    if groups == in_channels == out_channels and groups > 1:
        return "depthwise"
    if groups == 1:
        return "dense"
    raise ValueError(
        f"unsupported convolution: {in_channels}->{out_channels} channels with groups={groups}"
    )


class Conv2d(nnx.Module):
    """Bias-free 2-D convolution padded by kernel_size//2 on every side (PyTorch's `padding=k//2`).

    Its weight is the parameter `kernel` (Flax's name, kept in every checkpoint), HWIO: (k, k,
    in_channels // groups, out_channels). Each kind of convolution (dense, depthwise, 1x1
    pointwise) is computed by the function `impl` gives for it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        impl: Impl = Impl(),  # noqa: B008  (frozen, so one shared default is safe)
        rngs: nnx.Rngs,
    ):
        self.kind = _conv_kind(in_channels, out_channels, kernel_size, stride, groups)
        self.fn = getattr(impl, self.kind)
        self.kernels = impl.kernels  # the family, for the fused inference calls
        self.stride = stride
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))

    def __call__(self, x: Array) -> Array:
        if self.kind == "pointwise":
            return self.fn(x, self.kernel[...])
        return self.fn(x, self.kernel[...], self.stride)


class BatchNorm(nnx.Module):
    """BatchNorm over N, H, W with PyTorch's defaults (eps 1e-5, momentum 0.1 == Flax 0.9).

    Statistics are computed in float32 (float64 for float64 input). In training mode the running
    variance is updated with the biased batch variance (Flax's convention) unless
    `unbiased_running_var=True`, which stores the unbiased n/(n-1) estimate as PyTorch does;
    normalisation always uses the biased variance. `kernels` is the family that computes the
    training-mode sums (`Impl.kernels`).
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        unbiased_running_var: bool = False,
        use_running_average: bool = False,
        kernels: str = "cpp",
    ):
        self.num_features = num_features
        self.kernels = check_kernels(kernels)
        self.momentum = momentum
        self.epsilon = epsilon
        self.unbiased_running_var = unbiased_running_var
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        if self.use_running_average:
            # in the accumulation dtype, so scale's and bias's gradients sum in it
            xf = x.astype(ops.accumulation_dtype(x.dtype))
            inv = jax.lax.rsqrt(self.var[...] + self.epsilon) * self.scale[...]
            return ((xf - self.mean[...]) * inv + self.bias[...]).astype(x.dtype)
        n = x.shape[0] * x.shape[1] * x.shape[2]
        if n == 0:  # its statistics would be NaN and spoil the running ones
            raise ValueError(f"BatchNorm in training mode got an empty batch of shape {x.shape}")
        y, mean, var = ops.batch_norm_train(
            x, self.scale[...], self.bias[...], self.epsilon, self.kernels
        )
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        stored_var = var * (n / max(n - 1, 1)) if self.unbiased_running_var else var
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1 - m) * mean
        self.var[...] = m * self.var[...] + (1 - m) * stored_var
        return y


class MaxPool(nnx.Module):
    """PyTorch's MaxPool2d(kernel_size=3, stride=2, padding=1); parameter-free."""

    def __call__(self, x: Array) -> Array:
        return ops.max_pool_3x3_s2(x)


class Bias(nnx.Module):
    """Adds a per-channel bias: what a BatchNorm becomes once folded into the conv before it."""

    def __init__(self, bias: Array):
        self.bias = nnx.Param(jnp.asarray(bias))

    def __call__(self, x: Array) -> Array:
        return (x.astype(ops.accumulation_dtype(x.dtype)) + self.bias[...]).astype(x.dtype)


def folded_conv(conv: Conv2d, norm: BatchNorm | Bias) -> tuple[Array, Array]:
    """(kernel, bias) of `conv` followed by `norm` as one convolution with a bias, for
    inference: an eval-mode BatchNorm's `(x - mean) * s + beta` with `s = gamma / sqrt(var +
    eps)` scales each output channel of the kernel; a `Bias` (already folded) is kept."""
    if isinstance(norm, Bias):
        return conv.kernel[...], norm.bias[...]
    s = norm.scale[...] * jax.lax.rsqrt(norm.var[...] + norm.epsilon)
    return conv.kernel[...] * s, norm.bias[...] - norm.mean[...] * s


def inference_norm(norm: BatchNorm | Bias) -> tuple[tuple[Array, Array, Array, Array], float]:
    """((gamma, beta, mean, var), eps) of an inference norm, for the C++ calls that fold it: a
    `Bias` b as gamma 1, beta b, mean 0, var 1 with eps 0, which is exactly y + b."""
    if isinstance(norm, Bias):
        b = norm.bias[...]
        return (jnp.ones_like(b), b, jnp.zeros_like(b), jnp.ones_like(b)), 0.0
    return (norm.scale[...], norm.bias[...], norm.mean[...], norm.var[...]), norm.epsilon


def is_inference_norm(layer: nnx.Module) -> bool:
    """Whether `layer` normalizes with fixed statistics: a folded `Bias` or an eval-mode
    BatchNorm."""
    return isinstance(layer, Bias) or (isinstance(layer, BatchNorm) and layer.use_running_average)
