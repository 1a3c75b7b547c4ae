"""ShuffleNet V2 as an ONNX graph, written layer by layer from a BatchNorm-folded model.

Each layer maps to the ONNX operator that computes it (Conv with its folded bias, Relu,
MaxPool, Split, Concat, the shuffle as Reshape-Transpose-Reshape, GlobalAveragePool, Gemm),
the graph torchvision's own export gives, which ONNX Runtime fuses and quantizes well. The
graph is NCHW inside; `layout` says whether its input is NHWC (as this model's) or NCHW.
"""

from __future__ import annotations

import numpy as np
import onnx
from flax import nnx
from onnx import TensorProto, helper, numpy_helper

from shufflenet_jax.model.layers import Bias, Conv2d, MaxPool
from shufflenet_jax.model.network import STAGE_NAMES, ShuffleNetV2, ShuffleUnit

OPSET = 17
IR_VERSION = 8  # what opset 17 needs; readable by every ONNX Runtime since 1.11
LAYOUTS = ("nhwc", "nchw")


class _Graph:
    """Nodes and initializers being collected, each output named after its layer."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.weights.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> list[str]:
        names = [name] if outputs == 1 else [f"{name}:{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=name, **attrs))
        return names


def _conv(g: _Graph, conv: Conv2d, bias: Bias, x: str, name: str) -> str:
    k = np.asarray(conv.kernel[...])  # HWIO
    groups = k.shape[-1] if conv.kind == "depthwise" else 1
    pad = k.shape[0] // 2
    w = g.weight(f"{name}.weight", k.transpose(3, 2, 0, 1))  # OIHW
    b = g.weight(f"{name}.bias", np.asarray(bias.bias[...]))
    return g.node(
        "Conv",
        [x, w, b],
        name,
        kernel_shape=list(k.shape[:2]),
        strides=[conv.stride] * 2,
        pads=[pad] * 4,
        group=groups,
    )[0]


def _sequential(g: _Graph, seq: nnx.Sequential, x: str, name: str) -> str:
    layers = list(seq.layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, Conv2d):
            if i + 1 == len(layers) or not isinstance(layers[i + 1], Bias):
                raise ValueError(f"{name}.{i}: export needs a BatchNorm-folded model")
            x = _conv(g, layer, layers[i + 1], x, f"{name}.{i}")
        elif layer is nnx.relu:
            x = g.node("Relu", [x], f"{name}.{i}")[0]
        elif not isinstance(layer, Bias):
            raise ValueError(f"{name}.{i}: no ONNX export for {type(layer).__name__}")
    return x


def _unit(g: _Graph, unit: ShuffleUnit, x: str, channels: int, size: tuple, name: str) -> str:
    if unit.stride == 1:
        half = g.weight(f"{name}.split", np.array([channels // 2] * 2, np.int64))
        keep, x2 = g.node("Split", [x, half], f"{name}.split", outputs=2, axis=1)
        halves = [keep, _sequential(g, unit.branch2, x2, f"{name}.branch2")]
    else:
        halves = [
            _sequential(g, unit.branch1, x, f"{name}.branch1"),
            _sequential(g, unit.branch2, x, f"{name}.branch2"),
        ]
    out = g.node("Concat", halves, f"{name}.concat", axis=1)[0]
    return _shuffle(g, out, channels, size, name)


def _shuffle(g: _Graph, x: str, channels: int, size: tuple, name: str) -> str:
    """Two-group channel shuffle, as torchvision writes it: (N, 2, C/2, H, W), swap, back."""
    grouped = g.weight(f"{name}.grouped", np.array([0, 2, channels // 2, *size], np.int64))
    flat = g.weight(f"{name}.flat", np.array([0, channels, *size], np.int64))
    x = g.node("Reshape", [x, grouped], f"{name}.shuffle.grouped")[0]
    x = g.node("Transpose", [x], f"{name}.shuffle.swap", perm=[0, 2, 1, 3, 4])[0]
    return g.node("Reshape", [x, flat], f"{name}.shuffle")[0]


def _down(size: tuple[int, int]) -> tuple[int, int]:
    """Spatial size after a 3x3 window of stride 2 and padding 1."""
    return tuple((s - 1) // 2 + 1 for s in size)


def to_onnx(
    model: ShuffleNetV2, image_size: int, batch: int | None = None, layout: str = "nhwc"
) -> onnx.ModelProto:
    """`model` (BatchNorm folded: `fold_batchnorm`) as an ONNX model taking float32 images of
    `image_size` squared in `layout` and giving logits; `batch` None makes the batch dynamic."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    g, n = _Graph(), batch if batch is not None else "batch"
    shape = [n, image_size, image_size, 3] if layout == "nhwc" else [n, 3, image_size, image_size]
    x = "images"
    if layout == "nhwc":
        x = g.node("Transpose", [x], "to_nchw", perm=[0, 3, 1, 2])[0]
    x = _sequential(g, model.conv1, x, "conv1")
    if not isinstance(model.maxpool, MaxPool):
        raise ValueError(f"no ONNX export for {type(model.maxpool).__name__}")
    x = g.node("MaxPool", [x], "maxpool", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)[0]
    size = _down(_down((image_size, image_size)))
    for stage in STAGE_NAMES[2:5]:
        for i, unit in enumerate(getattr(model, stage).layers):
            size = _down(size) if unit.stride == 2 else size
            channels = unit.branch2.layers[-3].kernel.shape[-1] * 2
            x = _unit(g, unit, x, channels, size, f"{stage}.{i}")
    x = _sequential(g, model.conv5, x, "conv5")
    x = g.node("GlobalAveragePool", [x], "pool")[0]
    x = g.node("Flatten", [x], "flatten", axis=1)[0]
    w = g.weight("fc.weight", np.asarray(model.fc.kernel[...]))
    b = g.weight("fc.bias", np.asarray(model.fc.bias[...]))
    g.node("Gemm", [x, w, b], "logits")
    graph = helper.make_graph(
        g.nodes,
        "shufflenet_v2",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, model.num_classes])],
        g.weights,
    )
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    out.ir_version = IR_VERSION
    onnx.checker.check_model(out)
    return out
