"""ShuffleNet V2 in JAX / Flax NNX.

`model` (the network, its inference path, which model a config describes, its file format),
`ops` (array functions; the kernel family chosen by the model's `Impl`), `kernels` (the C++),
`interop` (torchvision weights, comparison, export), `data` (datasets, the input pipeline,
calibration images), `train` (state, step, loop), `sources`, `evaluation`, `recalibration`,
`classification`, `aot` (compiling for GPUs and TPUs without them), `process` (start-up),
`cli` (one-line errors) and `compiler_options`. Importing this loads JAX, Flax and chex: no
orbax, grain or TensorFlow, and optax only as `flax.nnx` imports it (tests/test_imports.py).
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
from shufflenet_jax.model.inference import predictor
from shufflenet_jax.ops import channel_shuffle

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
