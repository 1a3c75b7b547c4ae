"""The package's C++, in one room: the network's CPU kernels (XLA FFI calls, `calls`), their
build and cache (`build`), and the sources (`csrc/`, with the data pipeline's JPEG decoder and
resize, which `data/` loads through `build`). Nothing is built on import: `load()` builds and
registers the kernels, and tracing asks only `loaded()`."""

from shufflenet_jax.kernels.build import CppBuildError
from shufflenet_jax.kernels.calls import (
    ConvNorm,
    DownUnitWeights,
    UnitWeights,
    batch_norm_grad_sums,
    channel_moments,
    dense_weight_grad,
    depthwise_weight_grad,
    load,
    loaded,
    pack_unit,
    shuffle_stage,
    status,
    stem_conv,
    stem_pool,
)

__all__ = [
    "ConvNorm",
    "DownUnitWeights",
    "CppBuildError",
    "UnitWeights",
    "batch_norm_grad_sums",
    "channel_moments",
    "dense_weight_grad",
    "depthwise_weight_grad",
    "load",
    "loaded",
    "pack_unit",
    "shuffle_stage",
    "status",
    "stem_conv",
    "stem_pool",
]
