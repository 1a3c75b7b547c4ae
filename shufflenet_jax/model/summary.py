"""Layer-by-layer model summary (output shape, parameters, multiply-adds), torchsummary style.

    python -m shufflenet_jax.model.summary --width 1.0 [--size 224 | --size 193x257] [--json]

Multiply-adds (MACs) count the convolutions and the fully connected layer, the convention of
torchvision's `GFLOPS` metadata and of the paper's "FLOPs". BatchNorm, ReLU, pooling, concat and
shuffle are listed with 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from shufflenet_jax.model.layers import Conv2d
from shufflenet_jax.model.network import (
    STAGE_OUT_CHANNELS,
    ShuffleNetV2,
    abstract_model,
    check_width,
)

# Paper Table 8, complexity in MFLOPs (multiply-adds) at 224x224.
PAPER_MFLOPS = {0.5: 41, 1.0: 146, 1.5: 299, 2.0: 591}


@dataclasses.dataclass(frozen=True)
class LayerRow:
    name: str  # torchvision-style dotted path, e.g. "stage2.0.branch2.3"
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


def _layer_kind(layer: Callable) -> str:
    if isinstance(layer, Conv2d):
        k = layer.kernel.shape
        return f"Conv2d {k[0]}x{k[1]} {layer.kind}"
    return getattr(layer, "__name__", type(layer).__name__)


def param_count(module: Callable) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded, as in PyTorch)."""
    if not isinstance(module, nnx.Module):
        return 0
    return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _output_shape(layer: Callable, x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    if isinstance(layer, nnx.Module):
        return nnx.eval_shape(lambda m, a: m(a), layer, x)
    return jax.eval_shape(layer, x)


def _leaf_row(name: str, layer: Callable, x: jax.ShapeDtypeStruct) -> LayerRow:
    y = _output_shape(layer, x)
    if isinstance(layer, Conv2d):
        macs = math.prod(y.shape[1:3]) * math.prod(layer.kernel.shape)
    elif isinstance(layer, nnx.Linear):
        macs = math.prod(layer.kernel.shape)
    else:
        macs = 0
    return LayerRow(name, _layer_kind(layer), y.shape, param_count(layer), macs)


def _sequential_rows(prefix: str, seq: nnx.Sequential, x, rows: list[LayerRow]):
    for i, layer in enumerate(seq.layers):
        rows.append(_leaf_row(f"{prefix}.{i}", layer, x))
        x = jax.ShapeDtypeStruct(rows[-1].output_shape, x.dtype)
    return x


def layer_rows(model: ShuffleNetV2, height: int, width: int) -> list[LayerRow]:
    """One row per leaf layer (and per unit's concat+shuffle), for a single image of the given size.

    `model` may be abstract (from `nnx.eval_shape`): only shapes are computed.
    """
    model = nnx.clone(model)
    model.eval()
    x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    rows: list[LayerRow] = []
    x = _sequential_rows("conv1", model.conv1, x, rows)
    rows.append(_leaf_row("maxpool", model.maxpool, x))
    x = jax.ShapeDtypeStruct(rows[-1].output_shape, x.dtype)
    for stage in ("stage2", "stage3", "stage4"):
        for i, unit in enumerate(getattr(model, stage).layers):
            prefix = f"{stage}.{i}"
            if unit.branch1 is not None:
                _sequential_rows(f"{prefix}.branch1", unit.branch1, x, rows)
                branch2_in = x
            else:  # stride 1: branch2 sees the second half of the channels
                branch2_in = jax.ShapeDtypeStruct((*x.shape[:3], x.shape[3] // 2), x.dtype)
            _sequential_rows(f"{prefix}.branch2", unit.branch2, branch2_in, rows)
            y = _output_shape(unit, x)
            rows.append(LayerRow(f"{prefix}", "concat+channel_shuffle", y.shape, 0, 0))
            x = y
    x = _sequential_rows("conv5", model.conv5, x, rows)
    rows.append(LayerRow("avgpool", "global mean", (1, x.shape[3]), 0, 0))
    rows.append(_leaf_row("fc", model.fc, jax.ShapeDtypeStruct((1, x.shape[3]), x.dtype)))
    return rows


def official_layout_extra_macs(width: float, height: int, w: int) -> int:
    """MACs the official megvii model has beyond torchvision's (only stage 2's first unit differs).

    There the projection branch's 1x1 maps in->in (not in->out/2) and the main branch's last 1x1
    maps out/2 -> out-in (not out/2 -> out/2). The paper's Table 8 FLOPs count that layout.
    """
    cin, cout = STAGE_OUT_CHANNELS[width][0], STAGE_OUT_CHANNELS[width][1]
    half = cout // 2

    def down(n):  # a 3x3 stride-2 pad-1 conv or pool
        return (n - 1) // 2 + 1

    spatial = math.prod(down(down(down(n))) for n in (height, w))
    return spatial * (cin * cin - cin * half + half * (cout - cin) - half * half)


def summarize(width: float | str, height: int = 224, w: int | None = None, num_classes: int = 1000):
    """The summary as a dict: rows, totals, and how the MAC count relates to the paper's."""
    width = check_width(width)
    w = height if w is None else w
    model = abstract_model(width, num_classes)
    rows = layer_rows(model, height, w)
    params = param_count(model)
    macs = sum(r.macs for r in rows)
    extra = official_layout_extra_macs(width, height, w)
    return {
        "width": width,
        "input_size": [height, w],
        "num_classes": num_classes,
        "params": params,
        "macs": macs,
        "official_layout_macs": macs + extra,
        "paper_mflops": PAPER_MFLOPS[width]
        if (height, w, num_classes) == (224, 224, 1000)
        else None,
        "layers": [dataclasses.asdict(r) for r in rows],
    }


def format_summary(s: dict) -> str:
    """Render `summarize`'s dict as a torchsummary-like table."""
    line = "-" * 92
    out = [
        line,
        f"{'Layer':<24}{'Type':<28}{'Output Shape':<20}{'Param #':>10}{'MACs':>10}",
        "=" * 92,
    ]
    for r in s["layers"]:
        shape = str([-1, *r["output_shape"][1:]])
        out.append(f"{r['name']:<24}{r['kind']:<28}{shape:<20}{r['params']:>10,}{r['macs']:>10,}")
    out += [
        "=" * 92,
        f"ShuffleNet V2 {s['width']}x, input {s['input_size'][0]}x{s['input_size'][1]}x3, "
        f"{s['num_classes']} classes",
        f"Total params: {s['params']:,}",
        f"Total multiply-adds: {s['macs']:,} ({s['macs'] / 1e6:.1f}M)",
    ]
    extra = s["official_layout_macs"] - s["macs"]
    note = (
        "Paper relation: the paper counts the official megvii layout, whose first stage-2 unit "
        "maps in->in in the projection branch and out/2->out-in at the end of the main branch; "
        f"that layout has {extra / 1e6:+.2f}M multiply-adds, "
        f"{s['official_layout_macs'] / 1e6:.1f}M in all"
    )
    if s["paper_mflops"] is not None:
        paper = s["paper_mflops"] * 1e6
        note += (
            f"; the paper's Table 8 gives {s['paper_mflops']}M "
            f"({(s['official_layout_macs'] - paper) / paper:+.1%})."
        )
    else:
        note += " (the paper reports 224x224 with 1000 classes only)."
    out += [note, line]
    return "\n".join(out)


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        h = w = None
    if h is None or h < 1 or w < 1:
        raise argparse.ArgumentTypeError(
            f"size must be N or HxW with positive integers, got {text!r}"
        )
    return h, w


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", default="1.0", help="0.5, 1.0, 1.5 or 2.0")
    parser.add_argument(
        "--size", type=_parse_size, default=(224, 224), help="N or HxW (default 224)"
    )
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the table"
    )
    args = parser.parse_args(argv)
    try:
        width = check_width(args.width)
    except ValueError as e:
        parser.error(str(e))
    s = summarize(width, *args.size, num_classes=args.num_classes)
    print(json.dumps(s) if args.json else format_summary(s))


if __name__ == "__main__":
    main()
