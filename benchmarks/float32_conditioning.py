"""How far float32 train-mode gradients of a random ShuffleNet V2 are from float64 ones.

    python benchmarks/float32_conditioning.py [--width 0.5] [--batch 8] [--size 64] [--seed 1]

For torchvision in float32, this package in float32, and this package against PyTorch (both
float32), prints the worst per-tensor gradient error relative to that tensor's largest float64
PyTorch gradient, and the tensor it occurs in. This is why tests/test_convert.py compares
train-mode gradients and SGD steps in float64: in float32 the two frameworks' rounding alone
moves some gradients by percents.
"""

from __future__ import annotations

import argparse
import copy

import jax
import numpy as np
import optax
import torch
from flax import nnx

from shufflenet_jax.interop.compare import random_torchvision_model
from shufflenet_jax.interop.convert import grads_to_torch, load_torchvision


def torch_grads(model, x, labels, dtype) -> dict[str, np.ndarray]:
    model = copy.deepcopy(model).to(dtype).train()
    logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dtype))
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
    return {k: p.grad.double().numpy() for k, p in model.named_parameters()}


def jax_grads(torch_model, x, labels) -> dict[str, np.ndarray]:
    model = load_torchvision(torch_model)
    model.train()

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), labels).mean()

    grads = grads_to_torch(model, nnx.jit(nnx.grad(loss_fn))(model))
    return {k: v.astype(np.float64) for k, v in grads.items()}


def worst(grads, reference, scale) -> tuple[float, str]:
    """Largest max|g - ref| / max|scale| over tensors whose gradient is not zero in theory."""
    errors = [
        (float(np.max(np.abs(grads[k] - reference[k])) / np.max(np.abs(scale[k]))), k)
        for k in scale
        if np.max(np.abs(scale[k])) > 1e-6
    ]
    return max(errors)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    torch_model = random_torchvision_model(args.width, num_classes=10, seed=args.seed)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=args.batch)
    t64 = torch_grads(torch_model, x, labels, torch.float64)
    t32 = torch_grads(torch_model, x, labels, torch.float32)
    j32 = jax_grads(torch_model, x, labels)
    shape = f"batch {args.batch}, {args.size}x{args.size}"
    print(f"ShuffleNet V2 {args.width}x, {shape}, train mode, jax {jax.__version__}")
    for name, grads, ref in (
        ("PyTorch float32 vs PyTorch float64", t32, t64),
        ("JAX float32 vs PyTorch float64", j32, t64),
        ("JAX float32 vs PyTorch float32", j32, t32),
    ):
        err, key = worst(grads, ref, t64)
        print(f"{name:<36} worst relative error {err:.1e} ({key})")


if __name__ == "__main__":
    main()
