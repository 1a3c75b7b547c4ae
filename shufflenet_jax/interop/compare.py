"""Run torchvision and the converted JAX model on the same input and report their differences.

    python -m shufflenet_jax.interop.compare --width 1.0 [--torch_weights W.pth] [--image F]

Without --torch_weights, torchvision's model gets random weights and random BatchNorm running
statistics (not the identity defaults, which would hide layout mistakes). Both models run in
eval mode. For every stage (conv1, maxpool, stage2, stage3, stage4, conv5) and the logits it prints
the largest absolute difference, and that difference relative to the largest |value| of the
PyTorch output, then both top-5 predictions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from shufflenet_jax.cli import add_torch_weights
from shufflenet_jax.interop.convert import load_torch_state_dict, load_torchvision
from shufflenet_jax.model.inference import predictor
from shufflenet_jax.model.layers import Impl
from shufflenet_jax.model.network import STAGE_NAMES, ShuffleNetV2, check_width
from shufflenet_jax.ops.dispatch import KERNELS

TORCHVISION_BUILDERS = {
    0.5: "shufflenet_v2_x0_5",
    1.0: "shufflenet_v2_x1_0",
    1.5: "shufflenet_v2_x1_5",
    2.0: "shufflenet_v2_x2_0",
}
# torchvision's eval resize for each width's IMAGENET1K_V1 weights.
EVAL_RESIZE = {0.5: 256, 1.0: 256, 1.5: 232, 2.0: 232}


def randomize_batchnorm(model: Any, seed: int = 0) -> None:
    """Give every BatchNorm of a torch model random affine parameters and running statistics."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))


def random_torchvision_model(width: float, num_classes: int = 1000, seed: int = 0) -> Any:
    """torchvision's ShuffleNet V2 with seeded random weights and BatchNorm statistics."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, TORCHVISION_BUILDERS[check_width(width)])(
        weights=None, num_classes=num_classes
    )
    randomize_batchnorm(model, seed)
    return model


def torch_stages(model: Any, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Every stage's output (NHWC) and the logits of a torchvision ShuffleNetV2, as its forward."""
    import torch

    out = {}
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        for name in STAGE_NAMES:
            x = getattr(model, name)(x)
            out[name] = x.permute(0, 2, 3, 1).numpy()
        out["fc"] = model.fc(x.mean([2, 3])).numpy()
    return out


def jax_stages(model: ShuffleNetV2, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Every stage's output and the logits of the JAX model in inference, compiled."""
    out = predictor(model, stages=True)(x_nhwc)
    return {k: np.asarray(v) for k, v in out.items()}


def differences(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output: max |ours - ref|, max |ref|, and their ratio."""
    out = {}
    for name, r in ref.items():
        max_abs = float(np.max(np.abs(ours[name].astype(np.float64) - r)))
        scale = float(np.max(np.abs(r)))
        out[name] = {"max_abs_diff": max_abs, "max_abs_ref": scale, "rel_diff": max_abs / scale}
    return out


def top5(logits: np.ndarray) -> list[list[tuple[int, float]]]:
    """Top-5 (class, probability) for each row of logits."""
    z = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[:, :5]
    return [[(int(i), float(row[i])) for i in ids] for row, ids in zip(p, idx, strict=True)]


def load_image(path: str, width: float) -> np.ndarray:
    """One image with torchvision's ImageNet eval preprocessing, as a (1, 224, 224, 3) array."""
    from shufflenet_jax.data.pipeline import EvalTransform, decode_image

    with open(path, "rb") as f:
        image = decode_image(f.read(), path)
    return EvalTransform(resize_size=EVAL_RESIZE[width])(image)[None]


def compare(
    width: float | str = 1.0,
    weights: str | None = None,
    image: str | None = None,
    size: int = 224,
    batch: int = 2,
    seed: int = 0,
    kernels: str = "cpp",
) -> dict[str, Any]:
    """Build both models, run them on one input, and return the differences and top-5s; the
    JAX model computes with the `kernels` family (`model.layers.Impl`)."""
    import torch
    import torchvision

    width = check_width(width)
    if weights is None:
        torch_model = random_torchvision_model(width, seed=seed)
        jax_model = load_torchvision(torch_model, width, impl=Impl(kernels=kernels))
    else:
        state_dict = load_torch_state_dict(weights)
        # checks keys, shapes and width
        jax_model = load_torchvision(state_dict, width, impl=Impl(kernels=kernels))
        torch_model = getattr(torchvision.models, TORCHVISION_BUILDERS[width])(
            weights=None, num_classes=jax_model.num_classes
        )
        torch_model.load_state_dict(
            {k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False
        )
    torch_model.eval()
    jax_model.eval()
    if image is not None:
        x = load_image(image, width)
    else:
        x = np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)
    ref = torch_stages(torch_model, x)
    ours = jax_stages(jax_model, x)
    diffs = differences(ours, ref)
    return {
        "width": width,
        "weights": weights or "random (seeded), with random BatchNorm statistics",
        "input": image or f"random normal {list(x.shape)} NHWC",
        "max_abs_diff_logits": diffs["fc"]["max_abs_diff"],
        "max_abs_logit": diffs["fc"]["max_abs_ref"],
        "stages": diffs,
        "top5_torch": top5(ref["fc"]),
        "top5_jax": top5(ours["fc"]),
        "same_top1": bool(np.all(ref["fc"].argmax(-1) == ours["fc"].argmax(-1))),
    }


def format_report(r: dict[str, Any]) -> str:
    lines = [
        f"ShuffleNet V2 {r['width']}x  weights: {r['weights']}  input: {r['input']}",
        f"{'output':<10}{'max |jax - torch|':>20}{'max |torch|':>14}{'relative':>12}",
    ]
    for name, d in r["stages"].items():
        lines.append(
            f"{name:<10}{d['max_abs_diff']:>20.3e}{d['max_abs_ref']:>14.4g}{d['rel_diff']:>12.2e}"
        )
    for who in ("torch", "jax"):
        preds = ", ".join(f"{c} ({p:.4f})" for c, p in r[f"top5_{who}"][0])
        lines.append(f"top-5 {who:<5} (first image): {preds}")
    lines.append(f"same top-1 for every image: {r['same_top1']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", default="1.0", help="0.5, 1.0, 1.5 or 2.0")
    add_torch_weights(parser, "--weights", help="torchvision weights (default: random)")
    parser.add_argument(
        "--kernels", default="cpp", choices=list(KERNELS), help="the JAX side's kernel family"
    )
    parser.add_argument("--image", metavar="FILE", help="an image (default: random input)")
    parser.add_argument("--size", type=int, default=224, help="random input size (default 224)")
    parser.add_argument("--batch", type=int, default=2, help="random input batch (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        report = compare(
            args.width, args.torch_weights, args.image, args.size, args.batch, args.seed,
            args.kernels,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    print(json.dumps(report) if args.json else format_report(report))


if __name__ == "__main__":
    main()
