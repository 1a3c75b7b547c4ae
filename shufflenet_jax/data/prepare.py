"""Prepare a TFDS dataset as array_record files for `tfds.data_source` and grain.

    python -m shufflenet_jax.data.prepare digits
    python -m shufflenet_jax.data.prepare image_folder --manual_dir ~/images --data_dir ~/tfds_mine
    python -m shufflenet_jax.data.prepare imagenet2012 --manual_dir ~/ILSVRC2012

This is the only step that may need TensorFlow: `imagenet2012` and most catalog builders use it
while generating; `digits` and `image_folder` do not. Training and evaluation never import it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from shufflenet_jax.data import datasets

TF_HINT = (
    "preparing {name!r} needs TensorFlow, which is not installed. Install the CPU build in the "
    "environment that prepares data: pip install tensorflow-cpu (training does not need it)"
)


def make_builder(
    name: str, data_dir: str | None = None, manual_dir: str | None = None, **folder: Any
) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `name`, writing array_record files into `data_dir`; `folder`
    options (`skip_corrupt`, `train_short_side`) go to the image_folder builder."""
    kwargs: dict[str, Any] = {"data_dir": data_dir, "file_format": "array_record"}
    if name == "image_folder":
        if manual_dir is None:
            raise ValueError("image_folder needs --manual_dir ROOT (ROOT/<split>/<class>/<image>)")
        return datasets.ImageFolder(root=manual_dir, **folder, **kwargs)
    if any(folder.values()):
        raise ValueError(f"--skip_corrupt and --train_short_side apply to image_folder, not {name}")
    try:
        return tfds.builder(name, **kwargs)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"unknown dataset {name!r}: not a TFDS dataset name ({e})") from None


def prepare(
    name: str, data_dir: str | None = None, manual_dir: str | None = None, **folder: Any
) -> tfds.core.DatasetBuilder:
    """Generate `name` with a progress display unless already prepared; returns the builder."""
    builder = make_builder(name, data_dir, manual_dir, **folder)
    config = tfds.download.DownloadConfig(
        manual_dir=os.path.expanduser(manual_dir) if manual_dir else None
    )
    try:
        builder.download_and_prepare(download_config=config)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "tensorflow":
            raise RuntimeError(TF_HINT.format(name=name)) from e
        raise
    return builder


def describe(builder: tfds.core.DatasetBuilder) -> str:
    """One line per split with its example count, and the classes."""
    info = builder.info
    lines = [f"{info.full_name} in {builder.data_dir}"]
    lines += [f"  {split}: {s.num_examples} examples" for split, s in sorted(info.splits.items())]
    label = info.features["label"] if "label" in info.features else None
    if label is not None:
        lines.append(f"  classes: {label.num_classes} ({', '.join(label.names[:5])}, ...)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dataset", help="digits, image_folder, imagenet2012, or any TFDS name")
    p.add_argument("--manual_dir", help="downloaded archives (imagenet2012) or the image root")
    p.add_argument("--data_dir", help="where prepared datasets live (TFDS default if omitted)")
    p.add_argument(
        "--skip_corrupt",
        action="store_true",
        help="image_folder: leave out images that do not decode (named in the log) instead of "
        "stopping at the first",
    )
    p.add_argument(
        "--train_short_side",
        type=int,
        help="image_folder: store train images whose shorter side is longer resized to this "
        "(JPEG q90); the other splits are never resized (default: stored as they are)",
    )
    args = p.parse_args(argv)
    folder = {"skip_corrupt": args.skip_corrupt, "train_short_side": args.train_short_side}
    try:
        builder = prepare(args.dataset, args.data_dir, args.manual_dir, **folder)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(describe(builder))


if __name__ == "__main__":
    main()
