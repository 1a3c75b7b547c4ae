"""ShuffleNet V2 in JAX / Flax NNX.

`model` (the network), `ops` (array functions, XLA or C++ by platform), `interop` (torchvision
weights, comparison, the model checkpoint format), `data` (datasets and the input pipeline),
`train` (state, step, loop), `evaluation`, and `process` (program-wide setup).
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
