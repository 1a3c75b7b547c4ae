"""ShuffleNet V2 in JAX / Flax NNX."""

from shufflenet_jax.models import (
    STAGE_NAMES,
    ShuffleNetV2,
    ShuffleUnit,
    check_width,
    shufflenet_v2_x0_5,
    shufflenet_v2_x1_0,
    shufflenet_v2_x1_5,
    shufflenet_v2_x2_0,
)
from shufflenet_jax.ops import channel_shuffle

__all__ = [
    "STAGE_NAMES",
    "ShuffleNetV2",
    "ShuffleUnit",
    "channel_shuffle",
    "check_width",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
]
