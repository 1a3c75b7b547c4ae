"""Fold every BatchNorm into the convolution before it, for inference.

In eval mode `BN(conv(x, k)) = conv(x, k * s) + (beta - mean * s)` with
`s = gamma / sqrt(var + eps)` per output channel, so each Conv2d -> BatchNorm pair becomes a
Conv2d with a rescaled kernel followed by a `Bias`. The folded model keeps torchvision's module
paths (the BatchNorm's slot holds the `Bias`) and computes the eval-mode function with fewer
element-wise passes; it has no training mode.
"""

from __future__ import annotations

from flax import nnx

from shufflenet_jax.model.layers import BatchNorm, Bias, Conv2d, folded_conv
from shufflenet_jax.model.network import ShuffleNetV2


def fold_batchnorm(model: ShuffleNetV2) -> ShuffleNetV2:
    """An inference-only copy of `model` with each BatchNorm folded into its preceding Conv2d."""
    folded = nnx.clone(model)
    for _, seq in nnx.iter_modules(folded):
        if not isinstance(seq, nnx.Sequential):
            continue
        layers = seq.layers
        for i in range(1, len(layers)):
            conv, bn = layers[i - 1], layers[i]
            if isinstance(conv, Conv2d) and isinstance(bn, BatchNorm):
                conv.kernel[...], bias = folded_conv(conv, bn)
                layers[i] = Bias(bias)
    return folded
