"""Array functions behind the layers, on NHWC arrays; the kernel family computing each is the
one the model's `Impl` names (`dispatch`: XLA's formulation, or the C++ `shufflenet_jax.kernels`
on the CPU where they apply). In
bfloat16 or float16 every sum accumulates in float32 and rounds once (`accumulation_dtype`)."""

from shufflenet_jax.ops.common import accumulation_dtype
from shufflenet_jax.ops.conv import (
    conv_cpp,
    conv_im2col,
    conv_lax,
    depthwise_cpp,
    depthwise_lax,
    depthwise_shifted,
    pointwise_dot,
    pointwise_lax,
)
from shufflenet_jax.ops.fused import UnitConvs, fused_stage, fused_stem_pool
from shufflenet_jax.ops.norm import batch_norm_train
from shufflenet_jax.ops.pool import global_average_pool, max_pool_3x3_s2
from shufflenet_jax.ops.shuffle import channel_shuffle

__all__ = [
    "UnitConvs",
    "accumulation_dtype",
    "batch_norm_train",
    "channel_shuffle",
    "conv_cpp",
    "conv_im2col",
    "conv_lax",
    "depthwise_cpp",
    "depthwise_lax",
    "depthwise_shifted",
    "fused_stage",
    "fused_stem_pool",
    "global_average_pool",
    "max_pool_3x3_s2",
    "pointwise_dot",
    "pointwise_lax",
]
