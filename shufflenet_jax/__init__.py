"""ShuffleNet V2 in JAX / Flax NNX.

`model` (the network, which model a config describes, its file format), `ops` (array
functions, XLA or C++ chosen at lowering), `kernels` (the C++), `interop` (torchvision weights,
comparison, export), `data` (datasets and the input pipeline), `train` (state, step, loop),
`evaluation`, `aot` (compiling for GPUs and TPUs without them) and `process` (program setup).
"""

from shufflenet_jax.model import (
    STAGE_NAMES,
    Impl,
    ShuffleNetV2,
    ShuffleUnit,
    check_width,
    fold_batchnorm,
    shufflenet_v2_x0_5,
    shufflenet_v2_x1_0,
    shufflenet_v2_x1_5,
    shufflenet_v2_x2_0,
)
from shufflenet_jax.ops import channel_shuffle
from shufflenet_jax.train.step import predictor

__all__ = [
    "STAGE_NAMES",
    "Impl",
    "ShuffleNetV2",
    "ShuffleUnit",
    "channel_shuffle",
    "check_width",
    "fold_batchnorm",
    "predictor",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
]
