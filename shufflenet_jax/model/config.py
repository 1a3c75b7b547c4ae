"""Which model a config describes: its `model` section as the constructor's arguments, for
training, evaluation, export and the ahead-of-time compiles alike."""

from __future__ import annotations

from typing import Any

from shufflenet_jax.model.layers import Impl
from shufflenet_jax.model.network import check_width


def model_kwargs(config: Any) -> dict[str, Any]:
    """The constructor arguments `config.model` gives, besides the random generator."""
    m = config.model
    return dict(
        width=check_width(m.width),
        num_classes=m.num_classes,
        unbiased_running_var=m.unbiased_running_var,
        impl=Impl(kernels=m.kernels),
    )
