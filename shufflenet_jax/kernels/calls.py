"""The network's C++ CPU kernels (`csrc/`: depthwise_grad.cc, dense_grad.cc, batch_norm.cc,
inference.cc, sharing common.h), called through XLA's FFI, and the weight
records the fused inference kernels read.

XLA:CPU computes the depthwise weight gradient as nine reductions over materialized shifted
windows, the 3-channel stem's weight gradient through stacked windows, and BatchNorm's
per-channel sums as one reduction each; the C++ kernels read their inputs once. For inference
with BatchNorm folded, the stem with its max-pool and each stage of units run as one call,
keeping each image's activations in the cache between layers (docs/performance.md).

Nothing is compiled or registered on import: `load()` does it once per process, called by
the first trace of a model whose kernel family is "cpp" (`ops.dispatch`), by the first direct
call here, or ahead by `setup_process` (train.py, eval.py).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from shufflenet_jax.kernels.build import build_library, load_or_warn, march

Array = jax.Array

_TARGETS = {  # FFI target name: C++ handler symbol
    "shufflenet_depthwise_kernel_grad": "ShufflenetDepthwiseKernelGrad",
    "shufflenet_dense_kernel_grad": "ShufflenetDenseKernelGrad",
    "shufflenet_channel_moments": "ShufflenetChannelMoments",
    "shufflenet_batch_norm_grad_sums": "ShufflenetBatchNormGradSums",
    "shufflenet_stage": "ShufflenetStage",
    "shufflenet_stem_pool": "ShufflenetStemPool",
    "shufflenet_stem_conv": "ShufflenetStemConv",
}
_state: dict[str, bool | str] = {}  # "loaded": registered with XLA; "error": why not


def load() -> bool:
    """Builds (first time) or loads the kernels and registers them with XLA, once per
    process; False, with one warning naming the reason, where they do not build here (XLA's
    formulations then run everywhere)."""
    if "loaded" not in _state:
        library, why = load_or_warn("kernels", "C++ kernels", "XLA's formulations run")
        _state["error"] = why
        if library is not None:
            for target, symbol in _TARGETS.items():
                handler = jax.ffi.pycapsule(getattr(library, symbol))
                jax.ffi.register_ffi_target(target, handler, platform="cpu")
        _state["loaded"] = library is not None
    return bool(_state["loaded"])


def loaded() -> bool:
    """Whether `load()` has registered the kernels: what tracing asks (it never builds)."""
    return bool(_state.get("loaded"))


def status() -> str:
    """Where the loaded kernels are, or why XLA's formulations run instead."""
    if loaded():
        return f"{build_library('kernels')} (-march={march()})"
    reason = _state.get("error", "not loaded (shufflenet_jax.kernels.load())")
    return f"unavailable, XLA's formulations run: {reason}"


def _call(target: str, shape: tuple[int, ...], *args: Array, **attrs: float) -> Array:
    if not load():  # a direct call is a choice of the C++: built and registered on first use
        raise RuntimeError(f"{target}: the C++ kernels are unavailable here: {_state['error']}")
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    call = jax.ffi.ffi_call(target, out, vmap_method="sequential")
    typed = {k: np.float32(v) if isinstance(v, float) else np.int64(v) for k, v in attrs.items()}
    return call(*args, **typed)


def _check_float32(name: str, *arrays: Array) -> None:
    if any(a.dtype != jnp.float32 for a in arrays):
        raise ValueError(f"{name}: needs float32, got {', '.join(str(a.dtype) for a in arrays)}")


def _conv_output_shape(x_shape, weight_shape, stride: int) -> tuple[int, int, int, int]:
    n, h, w, _ = x_shape
    kh, kw = weight_shape[:2]
    ph, pw = kh // 2, kw // 2
    return n, (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1, weight_shape[3]


def depthwise_weight_grad(x: Array, g: Array, stride: int) -> Array:
    """Gradient of a 3x3 depthwise conv (padding 1) w.r.t. its HWIO weight, on the CPU.

    x: the conv's float32 NHWC input; g: the gradient of its output. Returns (3, 3, 1, C).
    """
    if stride not in (1, 2):
        raise ValueError(f"depthwise_weight_grad: stride must be 1 or 2, got {stride}")
    c = x.shape[-1]
    want = _conv_output_shape(x.shape, (3, 3, 1, c), stride)
    if g.shape != want:
        raise ValueError(
            f"depthwise_weight_grad: output gradient has shape {g.shape}, expected {want} "
            f"for input {x.shape} at stride {stride}"
        )
    _check_float32("depthwise_weight_grad", x, g)
    dk = _call("shufflenet_depthwise_kernel_grad", (9, c), x, g, stride=stride)
    return dk.reshape(3, 3, 1, c)


def _check_dense(name: str, x: Array, weight_shape, stride: int) -> None:
    kh, kw, cin, cout = weight_shape
    if kh != kw or kh % 2 == 0 or stride < 1 or not 1 <= cout <= 64:
        raise ValueError(
            f"{name}: needs an odd square weight with 1 to 64 outputs and stride >= 1, "
            f"got weight {tuple(weight_shape)} and stride {stride}"
        )
    if x.ndim != 4 or x.shape[-1] != cin:
        raise ValueError(f"{name}: input {x.shape} is not NHWC with the weight's {cin} channels")


def dense_weight_grad(x: Array, g: Array, weight_shape: tuple[int, ...], stride: int) -> Array:
    """Gradient of a dense conv (odd square HWIO weight, padding k//2, at most 64 output
    channels) w.r.t. its weight: (kh, kw, C_in, C_out), on the CPU. For few input channels."""
    _check_dense("dense_weight_grad", x, weight_shape, stride)
    want = _conv_output_shape(x.shape, weight_shape, stride)
    if g.shape != want:
        raise ValueError(f"dense_weight_grad: output gradient has shape {g.shape}, expected {want}")
    _check_float32("dense_weight_grad", x, g)
    return _call("shufflenet_dense_kernel_grad", tuple(weight_shape), x, g, stride=stride)


def channel_moments(x: Array) -> tuple[Array, Array]:
    """Per-channel (last axis) mean and biased variance of float32 x, in one pass on the CPU."""
    _check_float32("channel_moments", x)
    if x.size == 0:
        raise ValueError(f"channel_moments: empty input {x.shape}")
    c = x.shape[-1]
    out = _call("shufflenet_channel_moments", (2, c), x)
    return out[0], out[1]


def batch_norm_grad_sums(g: Array, x: Array, mean: Array) -> tuple[Array, Array]:
    """Per-channel sums of g and of g * (x - mean) over all but the last axis, on the CPU."""
    _check_float32("batch_norm_grad_sums", g, x, mean)
    if g.shape != x.shape or mean.shape != x.shape[-1:]:
        raise ValueError(
            f"batch_norm_grad_sums: g {g.shape}, x {x.shape}, mean {mean.shape} do not match"
        )
    out = _call("shufflenet_batch_norm_grad_sums", (2, x.shape[-1]), g, x, mean)
    return out[0], out[1]


_NORM = ("gamma", "beta", "mean", "var")


def _conv_fields(prefix: str) -> list[tuple[str, type]]:
    return [(prefix, Array)] + [(f"{prefix}_{name}", Array) for name in _NORM]


UnitWeights = NamedTuple(
    "UnitWeights", _conv_fields("pw1") + _conv_fields("dw") + _conv_fields("pw2")
)
UnitWeights.__doc__ = """A stride-1 unit's weights in the order kernels.cc reads them: branch 2's
1x1 (C/2, half), 3x3 depthwise (9, half) and 1x1 (half, half) kernels, each followed by its
inference BatchNorm's gamma, beta, running mean and variance (half,). kernels.cc folds each
into its weight while copying it (a folded model passes gamma 1, mean 0, var 1 and eps 0)."""

DownUnitWeights = NamedTuple(
    "DownUnitWeights",
    list(UnitWeights.__annotations__.items())
    + _conv_fields("branch1_dw")
    + _conv_fields("branch1_pw"),
)
DownUnitWeights.__doc__ = """A stride-2 unit's weights: branch 2's as in `UnitWeights` (its
first 1x1 reads all C_in channels), then branch 1's depthwise (9, C_in) and 1x1 (C_in, half)
kernels, each followed by its BatchNorm's four buffers."""
_ONE, _DOWN = len(UnitWeights._fields), len(DownUnitWeights._fields)

ConvNorm = tuple[Array, tuple[Array, Array, Array, Array]]  # HWIO weight; gamma, beta, mean, var


def pack_unit(
    branch2: tuple[ConvNorm, ConvNorm, ConvNorm], branch1: tuple[ConvNorm, ...] = ()
) -> UnitWeights | DownUnitWeights:
    """A unit's convolutions, each an HWIO weight with its inference BatchNorm's buffers
    (branch 2: 1x1, 3x3 depthwise, 1x1; branch 1 of a stride-2 unit: 3x3 depthwise, 1x1), as
    the record `shuffle_stage` reads: kernels flattened to (taps * C_in, C_out)."""
    flat = []
    for weight, norm in (*branch2, *branch1):
        flat += [weight.reshape(-1, weight.shape[-1]), *norm]
    return DownUnitWeights(*flat) if branch1 else UnitWeights(*flat)


def shuffle_stage(x: Array, units: list[tuple[Array, ...]], eps: float) -> Array:
    """ShuffleNet V2 units in inference (each BatchNorm `eps`), one after another on float32
    NHWC x, on the CPU.

    Each unit is a `UnitWeights` (15 arrays, stride 1: branch 2 sees the second half of the
    channels, the first half passes through) or, first unit only, a `DownUnitWeights` (25,
    stride 2); ReLU follows each branch's last 1x1. Each unit returns its two branches
    concatenated and shuffled; each image goes through all units while in the cache.
    """
    if not units:
        raise ValueError("shuffle_stage: needs at least one unit")
    if x.ndim != 4:
        raise ValueError(f"shuffle_stage: x must be NHWC, got shape {x.shape}")
    n, h, w, c = x.shape
    first_stride = 2 if len(units[0]) == _DOWN else 1
    for i, unit in enumerate(units):
        _check_float32(f"shuffle_stage unit {i}", *unit)
        stride = 2 if len(unit) == _DOWN else 1
        if len(unit) not in (_ONE, _DOWN) or (i and stride == 2):
            raise ValueError(
                f"shuffle_stage: unit {i} has {len(unit)} weight arrays; the first unit takes "
                f"{_ONE} (stride 1) or {_DOWN} (stride 2), later units {_ONE}"
            )
        half = unit[0].shape[-1]
        cin = half if stride == 1 else c

        def conv(rows: int, cols: int) -> list[tuple[int, ...]]:
            return [(rows, cols)] + [(cols,)] * len(_NORM)

        want = conv(cin, half) + conv(9, half) + conv(half, half)
        want += conv(9, c) + conv(c, half) if stride == 2 else []
        got = [tuple(a.shape) for a in unit]
        if got != want or (stride == 1 and c != 2 * half):
            raise ValueError(
                f"shuffle_stage: unit {i} on input channels {c}: weight shapes {got}, "
                f"expected {want}" + (f" and {2 * half} input channels" if stride == 1 else "")
            )
        h, w, c = (h - 1) // stride + 1, (w - 1) // stride + 1, 2 * half
    weights = [a for unit in units for a in unit]
    shape = (n, h, w, c)
    return _call("shufflenet_stage", shape, x, *weights, first_stride=first_stride, eps=eps)


def stem_pool(x: Array, weight: Array, norm: tuple[Array, ...], eps: float) -> Array:
    """max_pool_3x3_s2(relu(BN(conv_3x3_s2(x, weight)))) on the CPU, both padded by 1: the
    ShuffleNet V2 stem in inference, `norm` its BatchNorm's (gamma, beta, mean, var). x float32
    NHWC, weight HWIO (3, 3, C_in, C_out)."""
    _check_float32("stem_pool", x, weight, *norm)
    cout = weight.shape[3:]
    if (
        x.ndim != 4
        or weight.shape[:3] != (3, 3, x.shape[-1])
        or len(norm) != len(_NORM)
        or any(a.shape != cout for a in norm)
    ):
        raise ValueError(
            f"stem_pool: x {x.shape} (NHWC), weight {weight.shape} (3, 3, C_in, C_out) and "
            f"BatchNorm {[a.shape for a in norm]} (4 of C_out) do not match"
        )
    n, h, w, _ = x.shape
    shape = (n, (h - 1) // 2 // 2 + 1, (w - 1) // 2 // 2 + 1, weight.shape[3])
    weight = weight.reshape(-1, weight.shape[3])
    return _call("shufflenet_stem_pool", shape, x, weight, *norm, eps=eps)


def stem_conv(x: Array, weight: Array) -> Array:
    """conv_3x3_s2(x, weight), padded by 1, on the CPU: the stem's convolution (training forward
    pass). x float32 NHWC, weight HWIO (3, 3, C_in, C_out)."""
    _check_float32("stem_conv", x, weight)
    if x.ndim != 4 or weight.ndim != 4 or weight.shape[:3] != (3, 3, x.shape[-1]):
        raise ValueError(
            f"stem_conv: x {x.shape} (NHWC) and weight {weight.shape} (3, 3, C_in, C_out) "
            "do not match"
        )
    n, h, w, _ = x.shape
    shape = (n, (h - 1) // 2 + 1, (w - 1) // 2 + 1, weight.shape[3])
    return _call("shufflenet_stem_conv", shape, x, weight.reshape(-1, weight.shape[3]))
