"""ShuffleNet V2 (Ma et al., ECCV 2018) in Flax NNX, laid out like torchvision's implementation.

Attribute names follow torchvision (`conv1`, `maxpool`, `stage2`..`stage4`, `branch1`, `branch2`,
`conv5`, `fc`), and every torchvision `nn.Sequential` is an `nnx.Sequential`, so the state_dict key
`stage2.0.branch2.3.weight` is the model path `stage2.layers.0.branch2.layers.3.kernel`.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from shufflenet_jax import ops
from shufflenet_jax.model.layers import (
    BatchNorm,
    Bias,
    Conv2d,
    Impl,
    MaxPool,
    inference_norm,
    is_inference_norm,
)
from shufflenet_jax.ops.common import check_array

Array = jax.Array

STAGE_REPEATS = (4, 8, 4)
# width -> output channels of conv1, stage2, stage3, stage4, conv5 (paper Table 5).
STAGE_OUT_CHANNELS: dict[float, tuple[int, int, int, int, int]] = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
STAGE_NAMES = ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")


def check_width(width: float | str) -> float:
    """Return `width` as one of the four ShuffleNet V2 widths, or raise naming the valid ones."""
    try:
        w = float(str(width).lower().removesuffix("x"))
    except ValueError:
        w = None
    if w not in STAGE_OUT_CHANNELS:
        valid = ", ".join(f"{k}" for k in STAGE_OUT_CHANNELS)
        raise ValueError(f"unknown ShuffleNet V2 width {width!r}; valid widths are {valid}")
    return w


def check_expected(
    source: str,
    width: float,
    num_classes: int,
    expected_width: float | str | None = None,
    expected_classes: int | None = None,
) -> None:
    """The one check of a model source (a checkpoint, a .pth, a run) holding a `width`x model
    with `num_classes` classes against what the caller expects (None: anything); an error
    naming both where they differ."""
    want_width = width if expected_width is None else check_width(expected_width)
    want_classes = num_classes if expected_classes is None else expected_classes
    if (width, num_classes) != (want_width, want_classes):
        raise ValueError(
            f"{source} holds a {width}x model with {num_classes} classes, but "
            f"{want_width}x with {want_classes} classes was asked for"
        )


class ShuffleUnit(nnx.Module):
    """The ShuffleNet V2 building block (torchvision's `InvertedResidual`).

    Stride 1: split the channels in half, keep one half, transform the other with `branch2`.
    Stride 2: both `branch1` and `branch2` see the whole input and halve the resolution.
    Either way the halves are concatenated and shuffled with two groups.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        impl: Impl = Impl(),  # noqa: B008  (frozen, so one shared default is safe)
        unbiased_running_var: bool = False,
        rngs: nnx.Rngs,
    ):
        if stride not in (1, 2):
            raise ValueError(f"ShuffleUnit stride must be 1 or 2, got {stride}")
        if out_channels % 2:
            raise ValueError(
                f"ShuffleUnit output channels must be even (two equal branches), got {out_channels}"
            )
        half = out_channels // 2
        if stride == 1 and in_channels != out_channels:
            raise ValueError(
                "a stride-1 ShuffleUnit keeps its channel count: "
                f"in_channels={in_channels} != out_channels={out_channels}"
            )
        self.stride = stride
        self.shuffle = impl.shuffle
        self.kernels = impl.kernels

        def conv(cin, cout, k, s=1, groups=1):
            return Conv2d(cin, cout, k, stride=s, groups=groups, impl=impl, rngs=rngs)

        def bn(c):
            return BatchNorm(c, unbiased_running_var=unbiased_running_var, kernels=impl.kernels)

        if stride == 2:
            self.branch1 = nnx.Sequential(
                conv(in_channels, in_channels, 3, stride, groups=in_channels),
                bn(in_channels),
                conv(in_channels, half, 1),
                bn(half),
                nnx.relu,
            )
        else:
            self.branch1 = None
        branch2_in = in_channels if stride == 2 else half
        self.branch2 = nnx.Sequential(
            conv(branch2_in, half, 1),
            bn(half),
            nnx.relu,
            conv(half, half, 3, stride, groups=half),
            bn(half),
            conv(half, half, 1),
            bn(half),
            nnx.relu,
        )

    def __call__(self, x: Array) -> Array:
        if self.stride == 1:
            x1, x2 = jnp.split(x, 2, axis=-1)
            out = jnp.concatenate([x1, self.branch2(x2)], axis=-1)
        else:
            out = jnp.concatenate([self.branch1(x), self.branch2(x)], axis=-1)
        return self.shuffle(out, 2)


def unit_convs(unit: ShuffleUnit) -> ops.UnitConvs:
    """An inference unit's convolutions, each with its BatchNorm's buffers, as the fused stage
    takes them (it folds them as it copies the kernels)."""

    def conv(conv: Conv2d, norm: BatchNorm | Bias) -> tuple[Array, tuple[Array, ...]]:
        return conv.kernel[...], inference_norm(norm)[0]

    b2 = unit.branch2.layers
    branch2 = (conv(b2[0], b2[1]), conv(b2[3], b2[4]), conv(b2[5], b2[6]))
    if unit.branch1 is None:
        return ops.UnitConvs(branch2)
    b1 = unit.branch1.layers
    return ops.UnitConvs(branch2, (conv(b1[0], b1[1]), conv(b1[2], b1[3])))


def _norm_eps(module: nnx.Module) -> float | None:
    """The eps that all of `module`'s inference norms share (0 for folded ones), or None if
    they differ: one C++ call takes one (XLA's layers then compute the module)."""
    norms = (m for _, m in nnx.iter_graph(module) if isinstance(m, BatchNorm | Bias))
    epsilons = {inference_norm(m)[1] for m in norms}
    return epsilons.pop() if len(epsilons) == 1 else None


def _stage_layers(stage: nnx.Sequential, x: Array) -> Array:
    return stage(x)


def _stage_fused(stage: nnx.Sequential, x: Array) -> Array:
    units = [unit_convs(unit) for unit in stage.layers]
    kernels = stage.layers[0].kernels
    return ops.fused_stage(x, units, _norm_eps(stage), lambda: stage(x), kernels)


def _stem_layers(conv1: nnx.Sequential, image: Array) -> Array:
    return ops.max_pool_3x3_s2(conv1(image))


def _stem_fused(conv1: nnx.Sequential, image: Array) -> Array:
    conv, norm = conv1.layers[:2]
    buffers, eps = inference_norm(norm)
    stem = lambda: _stem_layers(conv1, image)  # noqa: E731
    return ops.fused_stem_pool(image, conv.kernel[...], buffers, eps, stem, conv.kernels)


def _fused_with_layers_gradient(module: nnx.Module, fused, layers, x: Array) -> Array:
    """fused(module, x), differentiated as layers(module, x), the same function through XLA:
    the fused C++ calls have no gradients of their own (eval-mode fine-tuning needs them)."""
    graphdef, state = nnx.split(module)
    return _fused_forward(graphdef, fused, layers, x, state)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_forward(graphdef, fused, layers, x, state):
    return fused(nnx.merge(graphdef, state), x)


def _fused_forward_fwd(graphdef, fused, layers, x, state):
    return _fused_forward(graphdef, fused, layers, x, state), (x, state)


def _fused_forward_bwd(graphdef, fused, layers, residuals, g):
    x, state = residuals
    _, pullback = jax.vjp(lambda x, state: layers(nnx.merge(graphdef, state), x), x, state)
    return pullback(g)


_fused_forward.defvjp(_fused_forward_fwd, _fused_forward_bwd)


class ShuffleNetV2(nnx.Module):
    """ShuffleNet V2 for NHWC RGB images of any size (down to 1x1), returning class logits.

    `impl` chooses how each op is computed (`Impl`; all choices compute the same function). In
    inference (eval mode, or folded by `fold_batchnorm`) the stem with its max-pool and each
    stage run as one fused call each (C++ on the CPU in float32, XLA elsewhere), with XLA's
    layers' gradients. `unbiased_running_var=True` makes BatchNorm's running variance follow
    PyTorch (unbiased) instead of Flax (biased); it only matters in training mode.
    """

    def __init__(
        self,
        width: float | str = 1.0,
        num_classes: int = 1000,
        *,
        impl: Impl = Impl(),  # noqa: B008  (frozen, so one shared default is safe)
        unbiased_running_var: bool = False,
        rngs: nnx.Rngs,
    ):
        self.width = check_width(width)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.fused_inference = impl.fused_inference
        self.kernels = impl.kernels
        c1, *stage_channels, c5 = STAGE_OUT_CHANNELS[self.width]
        bn_kw = dict(unbiased_running_var=unbiased_running_var)

        self.conv1 = nnx.Sequential(
            Conv2d(3, c1, 3, stride=2, impl=impl, rngs=rngs),
            BatchNorm(c1, kernels=impl.kernels, **bn_kw),
            nnx.relu,
        )
        self.maxpool = MaxPool()
        cin = c1
        for name, repeats, cout in zip(
            STAGE_NAMES[2:5], STAGE_REPEATS, stage_channels, strict=True
        ):
            unit_kw = dict(impl=impl, rngs=rngs, **bn_kw)
            units = [ShuffleUnit(cin, cout, 2, **unit_kw)]
            units += [ShuffleUnit(cout, cout, 1, **unit_kw) for _ in range(repeats - 1)]
            setattr(self, name, nnx.Sequential(*units))
            cin = cout
        self.conv5 = nnx.Sequential(
            Conv2d(cin, c5, 1, impl=impl, rngs=rngs),
            BatchNorm(c5, kernels=impl.kernels, **bn_kw),
            nnx.relu,
        )
        self.fc = nnx.Linear(c5, num_classes, rngs=rngs)

    @property
    def inference(self) -> bool:
        """Whether BatchNorm uses fixed statistics (eval mode, or folded into biases)."""
        return is_inference_norm(self.conv1.layers[1])

    def stages(self, x: Array) -> dict[str, Array]:
        """Outputs of every stage in `STAGE_NAMES` and the logits (`fc`), for stage-wise checks."""
        check_array(
            x,
            (None, None, None, 3),
            float,
            "ShuffleNetV2 expects NHWC RGB input of shape (batch, height, width, 3), floating",
        )
        if self.fused_inference and self.inference:
            out = self._fused_stages(x)
        else:
            out, h = {}, x
            for name in STAGE_NAMES:
                h = out[name] = getattr(self, name)(h)
        out["fc"] = self.fc(ops.global_average_pool(out["conv5"]))
        return out

    def _fused_stages(self, image: Array) -> dict[str, Array]:
        out = {"conv1": self.conv1(image)}  # for stage-wise checks; unused, XLA drops it
        h = _fused_with_layers_gradient(self.conv1, _stem_fused, _stem_layers, image)
        out["maxpool"] = h
        for name in STAGE_NAMES[2:5]:
            stage = getattr(self, name)
            h = out[name] = _fused_with_layers_gradient(stage, _stage_fused, _stage_layers, h)
        out["conv5"] = self.conv5(h)
        return out

    def __call__(self, x: Array) -> Array:
        return self.stages(x)["fc"]


def shufflenet_v2_x0_5(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 0.5x (torchvision's `shufflenet_v2_x0_5`)."""
    return ShuffleNetV2(0.5, num_classes, rngs=rngs, **kwargs)


def shufflenet_v2_x1_0(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 1.0x (torchvision's `shufflenet_v2_x1_0`)."""
    return ShuffleNetV2(1.0, num_classes, rngs=rngs, **kwargs)


def shufflenet_v2_x1_5(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 1.5x (torchvision's `shufflenet_v2_x1_5`)."""
    return ShuffleNetV2(1.5, num_classes, rngs=rngs, **kwargs)


def shufflenet_v2_x2_0(num_classes: int = 1000, *, rngs: nnx.Rngs, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 2.0x (torchvision's `shufflenet_v2_x2_0`)."""
    return ShuffleNetV2(2.0, num_classes, rngs=rngs, **kwargs)


def abstract_model(width: float | str = 1.0, num_classes: int = 1000, **kwargs) -> ShuffleNetV2:
    """The model with `jax.ShapeDtypeStruct` leaves: built without computing, to be filled by
    `with_values` from a checkpoint or converted weights."""
    return nnx.eval_shape(lambda: ShuffleNetV2(width, num_classes, rngs=nnx.Rngs(0), **kwargs))


def with_values(abstract: ShuffleNetV2, values: dict) -> ShuffleNetV2:
    """A concrete copy of `abstract` holding `values`, a pure dict as `nnx.to_pure_dict` makes;
    a value that is not finite is an error naming its leaf (weights that could never predict)."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(values):
        if not np.all(np.isfinite(np.asarray(leaf))):
            name = ".".join(str(getattr(k, "key", k)) for k in path)
            raise ValueError(f"the weights hold non-finite values at {name}")
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, values))
    return nnx.merge(graphdef, state)
