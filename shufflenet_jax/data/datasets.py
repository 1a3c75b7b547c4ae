"""TFDS builders of this package: scikit-learn's digits and a user's folder of images.

Importing this module registers them with TFDS as `digits` and `image_folder`. Both store
encoded image bytes (PNG for digits; the user's files, checked, optionally resized for the
train split) and need no TensorFlow to prepare or to read. Every record has `image`, `label`
and `file_name`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def _features(num_classes: int | None = None, names: list[str] | None = None, shape=None):
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=shape),
            "label": tfds.features.ClassLabel(num_classes=num_classes, names=names),
            "file_name": tfds.features.Text(),
        }
    )


def digits_split_indices() -> dict[str, np.ndarray]:
    """The fixed train/test partition of the 1,797 digits: a seeded 80/20 permutation."""
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(1797)
    n_test = round(1797 * DIGITS_TEST_FRACTION)
    return {"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])}


def digits_image(pixels: np.ndarray) -> np.ndarray:
    """scikit-learn's 0..16 intensities as an 8x8x1 uint8 image (0..255)."""
    return np.round(pixels.reshape(8, 8, 1) * (255.0 / 16.0)).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
    """A builder of local data: its start says so, instead of TFDS's "Downloading and
    preparing dataset Unknown size" (TFDS prints that from `_log_download_bytes`)."""

    def _log_download_bytes(self) -> None:
        print(f"Preparing {self.name} in {self.data_dir} from local files (no download)")


class Digits(_LocalBuilder):
    """scikit-learn's bundled UCI handwritten digits: 1,797 8x8 grayscale images, 10 classes.

    Real data that ships with a package, so training runs offline. Splits: `train` (1,438) and
    `test` (359), a fixed seeded partition. `file_name` is `digit_<index in load_digits()>`.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn load_digits(): UCI ML hand-written digits, 8x8, 0..255.",
            features=_features(num_classes=10, shape=(8, 8, 1)),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        return {name: self._generate_examples(idx) for name, idx in digits_split_indices().items()}

    def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple[str, dict]]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        for i in indices:
            name = f"digit_{i}"
            image = digits_image(digits.data[i])
            yield name, {"image": _png(image), "label": int(digits.target[i]), "file_name": name}


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


class ImageFolder(_LocalBuilder):
    """A user's images laid out as `root/<split>/<class>/<image>`; `manual_dir` is `root`.

    Every subdirectory of `root` is a split; the class names are the sorted subdirectories of
    `root/train` (or of the first split when there is no `train`), and every other split may only
    use those. `file_name` is `<class>/<file>`. Prepare one folder per `data_dir`.

    Every image is decoded once while packing: one that does not decode is an error naming its
    file, or with `skip_corrupt` is left out, and the names are logged with their count. Files
    are stored unchanged, except that with `train_short_side` N the train split's images whose
    shorter side exceeds N are stored resized to it (antialiased) as JPEG quality 90; other
    splits are never resized. (`check_images=False` packs files unchecked: the tests use it to
    make a split with a corrupt record, as data prepared elsewhere may have.)
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "manual_dir is the root holding <split>/<class>/<image files>."

    def __init__(
        self,
        *,
        root: str | os.PathLike | None = None,
        skip_corrupt: bool = False,
        train_short_side: int | None = None,
        check_images: bool = True,
        **kwargs: Any,
    ):
        self._image_root = Path(root) if root is not None else None
        self._skip_corrupt, self._train_short_side = skip_corrupt, train_short_side
        self._check_images = check_images
        super().__init__(**kwargs)

    def _root(self) -> Path:
        root = self._image_root
        if root is None:
            raise ValueError(
                "image_folder needs the image root (prepare it with --manual_dir ROOT)"
            )
        if not root.is_dir() or not any(p.is_dir() for p in root.iterdir()):
            raise ValueError(f"image folder {root}: expected subdirectories <split>/<class>/")
        return root

    def _class_names(self) -> list[str]:
        root = self._root()
        splits = sorted(p.name for p in root.iterdir() if p.is_dir())
        first = "train" if "train" in splits else splits[0]
        names = _class_dirs(root / first)
        if not names:
            raise ValueError(f"image folder {root / first}: no class subdirectories")
        for split in splits:
            extra = sorted(set(_class_dirs(root / split)) - set(names))
            if extra:
                raise ValueError(
                    f"image folder split {split!r} has classes not in {first!r}: {extra}"
                )
        return names

    def _info(self) -> tfds.core.DatasetInfo:
        names = self._class_names() if self._image_root is not None else None
        return tfds.core.DatasetInfo(
            builder=self,
            description="A user's folder of images, one subdirectory per split and class.",
            features=_features(names=names, shape=(None, None, 3)),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        root = self._root()
        names = self.info.features["label"].names
        return {
            p.name: self._generate_examples(p, names) for p in sorted(root.iterdir()) if p.is_dir()
        }

    def _generate_examples(self, split_dir: Path, names: list[str]) -> Iterator[tuple[str, dict]]:
        short_side = self._train_short_side if split_dir.name == "train" else None
        skipped = []
        for label, cls in enumerate(names):
            class_dir = split_dir / cls
            if not class_dir.is_dir():
                continue
            for f in sorted(class_dir.iterdir()):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    key = f"{cls}/{f.name}"
                    try:
                        data = f.read_bytes()
                        if self._check_images:
                            data = _checked(data, f, short_side)
                    except ValueError:
                        if not self._skip_corrupt:
                            raise
                        skipped.append(key)
                        continue
                    yield key, {"image": data, "label": label, "file_name": key}
        if skipped:
            log.warning(
                "image folder split %s: skipped %d images that do not decode: %s",
                split_dir.name,
                len(skipped),
                ", ".join(skipped),
            )


def _checked(data: bytes, path: Path, short_side: int | None) -> bytes:
    """`data` after decoding it fully (a ValueError naming `path` if it does not decode),
    re-encoded with its shorter side at `short_side` if it is longer."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path} is not a readable image ({e.__class__.__name__}: {e})") from e
    if short_side is None or min(rgb.size) <= short_side:
        return data
    w, h = rgb.size
    scale = short_side / min(w, h)
    resized = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    out = io.BytesIO()
    resized.save(out, "JPEG", quality=90)
    return out.getvalue()
