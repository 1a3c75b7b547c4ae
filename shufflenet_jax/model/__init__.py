"""The network: leaf layers, ShuffleNet V2 itself, BatchNorm folding, the layer summary, which
model a config describes (`config`) and the model's file format (`checkpoint`)."""

from shufflenet_jax.model.folded import fold_batchnorm
from shufflenet_jax.model.layers import Impl
from shufflenet_jax.model.network import (
    STAGE_NAMES,
    ShuffleNetV2,
    ShuffleUnit,
    abstract_model,
    check_width,
    shufflenet_v2_x0_5,
    shufflenet_v2_x1_0,
    shufflenet_v2_x1_5,
    shufflenet_v2_x2_0,
    with_values,
)

__all__ = [
    "STAGE_NAMES",
    "Impl",
    "ShuffleNetV2",
    "ShuffleUnit",
    "abstract_model",
    "check_width",
    "fold_batchnorm",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "with_values",
]
