"""Convert torchvision ShuffleNet V2 weights to this package's model and back.

    python -m shufflenet_jax.interop.convert --torch_weights shufflenetv2_x1-5666bf0f80.pth \
        --out ckpt/x1_0
    python -m shufflenet_jax.interop.convert --to-torch --checkpoint ckpt/x1_0 --out x1_0.pth

The mapping is a rule, not a table: each numeric part of a torchvision key indexes an
`nnx.Sequential` (`stage2.0` -> `stage2.layers.0`); `weight` is a conv/linear `kernel` (rank 4 or 2)
or a BatchNorm `scale` (rank 1); `running_mean`/`running_var` are `mean`/`var`. Conv kernels go from
OIHW to HWIO, linear kernels from (out, in) to (in, out). `num_batches_tracked` has no counterpart.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from shufflenet_jax.model.network import (
    STAGE_NAMES,
    STAGE_OUT_CHANNELS,
    ShuffleNetV2,
    abstract_model,
    check_expected,
    with_values,
)

_LEAF_TO_NNX = {"running_mean": "mean", "running_var": "var", "bias": "bias"}
_LEAF_TO_TORCH = {
    "kernel": "weight",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


class WeightMismatchError(ValueError):
    """The weights do not fit the model: lists missing, unexpected and wrongly-shaped keys."""


def torch_key_to_path(key: str, ndim: int) -> tuple[str | int, ...]:
    """`stage2.0.branch2.3.weight` (rank 4) -> `stage2/layers/0/branch2/layers/3/kernel`."""
    *modules, leaf = key.split(".")
    path: list[str | int] = []
    for part in modules:
        path += ["layers", int(part)] if part.isdigit() else [part]
    if leaf == "weight":
        leaf = "scale" if ndim == 1 else "kernel"
    else:
        leaf = _LEAF_TO_NNX.get(leaf, leaf)
    return (*path, leaf)


def path_to_torch_key(path: Sequence[str | int]) -> str:
    """The inverse of `torch_key_to_path`."""
    *modules, leaf = path
    return ".".join([str(p) for p in modules if p != "layers"] + [_LEAF_TO_TORCH.get(leaf, leaf)])


# Axis permutations by rank: conv OIHW <-> HWIO, linear (out, in) <-> (in, out), vectors as is.
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}


def to_flax_layout(a: np.ndarray) -> np.ndarray:
    """OIHW conv kernel -> HWIO, (out, in) linear kernel -> (in, out); vectors unchanged."""
    return a.transpose(_TO_FLAX_AXES[a.ndim])


def to_torch_layout(a: np.ndarray) -> np.ndarray:
    """The inverse of `to_flax_layout`."""
    return a.transpose(_TO_TORCH_AXES[a.ndim])


def load_torch_state_dict(source: Any) -> dict[str, np.ndarray]:
    """A torchvision-style state_dict as float32 numpy arrays, from a `.pth` path, a state_dict,
    a checkpoint dict holding `state_dict`, or an `nn.Module`.

    Files are read with `torch.load(weights_only=True)`: a file that needs arbitrary code to
    unpickle is refused. A DataParallel `module.` prefix is removed; `num_batches_tracked` dropped.
    """
    import torch

    if isinstance(source, str | os.PathLike):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"{path} is not a file (a torchvision .pth state_dict is expected)")
        with open(path, "rb") as f:
            magic = f.read(2)
        if magic != b"PK" and magic[:1] != b"\x80":  # torch.save's zip archive, or a pickle
            raise ValueError(f"cannot read {path} as a torch weights file: neither torch.save's "
                             "zip archive nor a pickle")  # fmt: skip
        try:
            obj = torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            reason = str(e).strip().splitlines()[0]
            raise ValueError(
                f"refusing to load {path}: it is not a plain weights file and "
                f"unpickling it would run code ({reason})"
            ) from e
        except (EOFError, RuntimeError, OSError) as e:  # empty, truncated or not a torch file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"cannot read {path} as a torch weights file: {reason}") from e
    elif isinstance(source, torch.nn.Module):
        obj = source.state_dict()
    else:
        obj = source
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state_dict (a mapping of names to tensors), got {type(obj)}")
    out = {}
    for key, value in obj.items():
        key = key.removeprefix("module.")
        if key.endswith("num_batches_tracked"):
            continue
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().float().numpy()
        try:
            out[key] = np.asarray(value, np.float32)
        except (TypeError, ValueError) as e:
            raise WeightMismatchError(
                f"{key!r} holds a {type(value).__name__}, not a tensor of numbers"
            ) from e
    return out


def _require(state_dict: Mapping[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state_dict:
        raise WeightMismatchError(f"missing key {key!r}: this is not a ShuffleNet V2 state_dict")
    return state_dict[key]


def infer_width(state_dict: Mapping[str, np.ndarray]) -> float:
    """The width whose stage2 and conv5 channel counts match the tensors' shapes."""
    stage2 = 2 * _require(state_dict, "stage2.0.branch1.2.weight").shape[0]
    conv5 = _require(state_dict, "conv5.0.weight").shape[0]
    for width, channels in STAGE_OUT_CHANNELS.items():
        if channels[1] == stage2 and channels[4] == conv5:
            return width
    raise WeightMismatchError(
        f"no ShuffleNet V2 width has {stage2} stage2 channels and {conv5} conv5 channels"
    )


def infer_num_classes(state_dict: Mapping[str, np.ndarray]) -> int:
    return int(_require(state_dict, "fc.weight").shape[0])


def torch_to_values(state_dict: Mapping[str, np.ndarray], abstract: ShuffleNetV2) -> dict:
    """The state_dict as a pure dict for `with_values`, after checking it against the model.

    Raises WeightMismatchError listing every missing, unexpected and wrongly-shaped key.
    """
    expected = {tuple(p): v.shape for p, v in nnx.to_flat_state(nnx.state(abstract))}
    converted, seen = {}, set()
    unexpected, wrong_shape = [], []
    for key, value in state_dict.items():
        path = torch_key_to_path(key, value.ndim)
        seen.add(path)
        if path not in expected:
            unexpected.append(key)
        elif to_flax_layout(value).shape != expected[path]:
            needed = tuple(expected[path][i] for i in _TO_TORCH_AXES[len(expected[path])])
            wrong_shape.append(f"{key}: got {tuple(value.shape)}, model needs {needed}")
        else:
            converted[path] = to_flax_layout(value)
    missing = [path_to_torch_key(p) for p in expected if p not in seen]
    if missing or unexpected or wrong_shape:
        parts = [
            f"{title} ({len(keys)}): {', '.join(keys)}"
            for title, keys in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("wrongly-shaped keys", wrong_shape),
            )
            if keys
        ]
        raise WeightMismatchError(
            f"weights do not fit ShuffleNet V2 {abstract.width}x with {abstract.num_classes} "
            "classes; " + "; ".join(parts)
        )
    values: dict = {}
    for path, value in converted.items():
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return values


def load_torchvision(
    source: Any,
    width: float | str | None = None,
    num_classes: int | None = None,
    **model_kwargs: Any,
) -> ShuffleNetV2:
    """A ShuffleNetV2 holding torchvision weights (see `load_torch_state_dict` for `source`).

    Width and class count come from the tensors; a requested `width` or `num_classes` that
    disagrees is an error. `model_kwargs` (e.g. `impl`) go to the constructor.
    """
    state_dict = load_torch_state_dict(source)
    found_width, found_classes = infer_width(state_dict), infer_num_classes(state_dict)
    where = os.fspath(source) if isinstance(source, str | os.PathLike) else "the state_dict"
    where += " (judged from the shapes of stage2.0.branch1.2.weight, conv5.0.weight and fc.weight)"
    try:
        check_expected(where, found_width, found_classes, width, num_classes)
    except ValueError as e:
        raise WeightMismatchError(str(e)) from None
    abstract = abstract_model(found_width, found_classes, **model_kwargs)
    return with_values(abstract, torch_to_values(state_dict, abstract))


def to_torch_state_dict(model: ShuffleNetV2) -> dict[str, Any]:
    """The model's weights as a torchvision state_dict of torch tensors (loadable with strict=True).

    `num_batches_tracked`, which has no counterpart here, is written as 0, the value of a fresh
    torchvision model; PyTorch only reads it when BatchNorm momentum is None.
    """
    import torch

    out: dict[str, Any] = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = path_to_torch_key(path)
        out[key] = torch.from_numpy(np.array(to_torch_layout(np.asarray(var[...])), order="C"))
        if key.endswith("running_var"):
            out[key.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0)
    return {key: out[key] for key in sorted(out, key=_torch_order)}


def grads_to_torch(model: ShuffleNetV2, grads: nnx.State) -> dict[str, np.ndarray]:
    """Gradients w.r.t. `model`'s parameters, named and laid out like PyTorch's `param.grad`."""
    grad_model = nnx.clone(model)
    nnx.update(grad_model, grads)
    params = {path_to_torch_key(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    return {k: v.numpy() for k, v in to_torch_state_dict(grad_model).items() if k in params}


_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _torch_order(key: str) -> tuple:
    """Sort key giving torchvision's state_dict order (module registration order, then leaves)."""
    top, *middle, leaf = key.split(".")
    return (
        (*STAGE_NAMES, "fc").index(top),
        *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in middle),
        _LEAF_ORDER.index(leaf),
    )


def main(argv: Sequence[str] | None = None) -> None:
    from shufflenet_jax.cli import add_torch_weights
    from shufflenet_jax.model.model_file import restore_model, save_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_torch_weights(parser, "--torch", help="torchvision weights (.pth) to convert")
    parser.add_argument(
        "--to-torch", action="store_true", help="convert --checkpoint DIR to a torchvision .pth"
    )
    parser.add_argument("--checkpoint", metavar="DIR", help="model checkpoint (with --to-torch)")
    parser.add_argument("--out", required=True, help="checkpoint DIR, or PATH.pth with --to-torch")
    parser.add_argument("--width", help="expected width (checked against the weights)")
    parser.add_argument("--num_classes", type=int, help="expected number of classes (checked)")
    args = parser.parse_args(argv)
    if args.to_torch == (args.torch_weights is not None):
        parser.error("give either --torch_weights PATH.pth, or --to-torch with --checkpoint DIR")
    if os.path.exists(args.out):
        parser.error(f"--out {args.out} exists; refusing to overwrite it")
    try:
        if args.to_torch:
            if args.checkpoint is None:
                parser.error("--to-torch needs --checkpoint DIR")
            import torch

            model = restore_model(args.checkpoint, args.width, args.num_classes)
            torch.save(to_torch_state_dict(model), args.out)
        else:
            model = load_torchvision(args.torch_weights, args.width, args.num_classes)
            source = os.path.abspath(args.torch_weights)
            save_model(args.out, model, source=source, image_size=224)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote ShuffleNet V2 {model.width}x ({model.num_classes} classes) to {args.out}")


if __name__ == "__main__":
    main()
