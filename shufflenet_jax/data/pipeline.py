"""Input pipeline: TFDS array_record splits read with grain, with ImageNet-standard transforms.

Records come from `tfds.data_source` (no TensorFlow needed); images are decoded with PIL so a
corrupt file can be named. Each process reads its own share of a split (`index % count`). The
train stream is an endless reshuffled repeat with seeded augmentation; its iterator state can be
checkpointed. The eval stream visits every example once across processes: the last batches are
padded with `mask == False` entries, never dropped or duplicated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import logging
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from shufflenet_jax.data import datasets as _registers_builders  # noqa: F401  (digits, image_folder)
from shufflenet_jax.data import jpeg, resample
from shufflenet_jax.data.normalization import standardize

log = logging.getLogger(__name__)


class CorruptImageError(ValueError):
    """An image record whose bytes cannot be decoded; the message names the record."""


@dataclasses.dataclass(frozen=True)
class Split:
    """A prepared split, readable by index: `source[i]` is {"image": bytes, "label": int, ...}."""

    dataset: str
    split: str
    source: Sequence[dict[str, Any]]
    num_classes: int
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.source)

    def record_name(self, index: int, record: dict[str, Any]) -> str:
        name = record.get("file_name")
        if isinstance(name, bytes):
            name = name.decode("utf-8", "replace")
        return f"{self.dataset}/{self.split} record {index}" + (f" ({name})" if name else "")


def load_split(dataset: str, split: str, data_dir: str | None = None) -> Split:
    """Open a split prepared by `python -m shufflenet_jax.data.prepare` (array_record files)."""
    try:
        builder = tfds.builder(dataset, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"unknown dataset {dataset!r}: not a TFDS or shufflenet_jax name"
        ) from None
    hint = f"python -m shufflenet_jax.data.prepare {dataset}" + (
        f" --data_dir {data_dir}" if data_dir else ""
    )
    if not builder.is_prepared():
        raise ValueError(f"dataset {dataset!r} is not prepared in {builder.data_dir}: run {hint}")
    splits = builder.info.splits
    if split.split("[")[0] not in splits:
        raise ValueError(f"dataset {dataset!r} has no split {split!r}; it has {sorted(splits)}")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise ValueError(f"{dataset!r} was prepared as {builder.info.file_format}; re-run {hint}")
    label = builder.info.features["label"]
    source = builder.as_data_source(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return Split(dataset, split, source, label.num_classes, tuple(label.names))


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@contextlib.contextmanager
def _decoding(data: bytes, name: str) -> Iterator[None]:
    """Turns a decoding failure in the block into a `CorruptImageError` naming `name`."""
    try:
        yield
    except _DECODE_ERRORS as e:
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", f"({len(data)} bytes)", str(e))
        raise CorruptImageError(f"cannot decode the image of {name}: {reason}") from e


def decode_image(data: bytes, name: str) -> Image.Image:
    """The image as RGB, fully decoded; `CorruptImageError` naming `name` if that fails."""
    with _decoding(data, name), Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision `Resize(size)` on a PIL image: the short side becomes `size`, antialiased."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision `CenterCrop(size)`: zero padding first where the image is smaller."""
    w, h = image.size

    def start(n: int) -> int:
        return -((size - n) // 2) if n < size else int(round((n - size) / 2.0))

    left, top = start(w), start(h)
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) by torchvision's RandomResizedCrop rule: 10 tries, then a center crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@dataclasses.dataclass(frozen=True)
class _Sample:
    """One training crop's random draws: the box (left, top, w, h) of a width x height image,
    the flip, and the size a JPEG can be drafted to for it (None: decode at full size)."""

    width: int
    height: int
    box: tuple[int, int, int, int]
    flip: bool
    draft: tuple[int, int] | None

    def scaled_box(self, shape: tuple[int, int]) -> tuple[float, float, float, float]:
        """The box on the image decoded at `shape` (height, width)."""
        sx, sy = shape[1] / self.width, shape[0] / self.height
        left, top, w, h = self.box
        return (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """The host's share of training augmentation: random-resized crop to `image_size` and
    horizontal flip, uint8 HWC out (colour jitter and normalization run on the device:
    `augment.make_augment`). A JPEG is decoded only at the size the crop needs (DCT scaling)
    and only where the crop reads (`jpeg.decode_region`, else Pillow's full decode: the same
    pixels); the crop is resized as Pillow's BILINEAR does it, by `resample.resized_crop`."""

    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
        """The crop of the encoded image `data`; a decoding error propagates (the caller
        names the record)."""
        size = jpeg.size(data)  # None: not a JPEG, or no C++ decoder here
        if size is None:
            with Image.open(io.BytesIO(data)) as image:
                return self._pillow_crop(image, self._sample(*image.size, rng))
        sample = self._sample(*size, rng)
        crop = self._jpeg_crop(data, sample)
        if crop is None:  # libjpeg failed or warned: Pillow decodes it or names the problem
            with Image.open(io.BytesIO(data)) as image:
                return self._pillow_crop(image, sample)
        return crop

    def _sample(self, width: int, height: int, rng: np.random.Generator) -> _Sample:
        box = random_resized_crop_box(width, height, self.scale, self.ratio, rng)
        k = self.image_size / min(box[2:])  # the scale at which the crop is still image_size
        draft = (math.ceil(width * k), math.ceil(height * k)) if k < 1 else None
        return _Sample(width, height, box, self.flip and rng.random() < 0.5, draft)

    def _jpeg_crop(self, data: bytes, sample: _Sample) -> np.ndarray | None:
        scale = jpeg.draft_scale(sample.width, sample.height, sample.draft) if sample.draft else 1
        shape = (-(-sample.height // scale), -(-sample.width // scale))
        box = sample.scaled_box(shape)
        rows, cols = resample.source_window(box, self.image_size, shape)
        region = jpeg.decode_region(data, scale, rows, cols)
        if region is None:
            return None
        pixels, first = region
        origin = (rows[0], first)
        return resample.resized_crop(pixels, box, self.image_size, sample.flip, origin, shape)

    def _pillow_crop(self, image: Image.Image, sample: _Sample) -> np.ndarray:
        if image.format == "JPEG" and sample.draft:
            image.draft("RGB", sample.draft)
        box = sample.scaled_box(image.size[::-1])
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return resample.resized_crop(np.asarray(rgb), box, self.image_size, sample.flip)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """torchvision's ImageNet evaluation: Resize(resize_size), CenterCrop(image_size), normalize
    (ImageNet's mean and std). The eval stream sends `crop`'s uint8 and the eval step
    normalizes on the device, with the same constants (`normalization.standardize`)."""

    image_size: int = 224
    resize_size: int = 256

    def crop(self, image: Image.Image) -> np.ndarray:
        """The resized, center-cropped image, uint8 HWC."""
        return np.asarray(center_crop(resize_short_side(image, self.resize_size), self.image_size))

    def __call__(self, image: Image.Image) -> np.ndarray:
        """The normalized float32 HWC image, as torchvision's transforms give it."""
        return standardize(self.crop(image))


@dataclasses.dataclass(frozen=True)
class _WithIndex:
    source: Sequence[dict[str, Any]]

    def __call__(self, index: int) -> tuple[int, dict[str, Any]]:
        return index, self.source[index]


def _skipped(name: str, error: Exception, counter: itertools.count) -> None:
    log.warning("skipping corrupt record (%d so far in this reader): %s", next(counter), error)


@dataclasses.dataclass
class _TrainElement:
    """(index, record), rng -> {"image", "label"}, or None for a skipped corrupt record."""

    split: Split
    transform: TrainTransform
    skip_corrupt: bool
    _count: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

    def __call__(self, item: tuple[int, dict[str, Any]], rng: np.random.Generator):
        index, record = item
        name, data = self.split.record_name(index, record), record["image"]
        try:
            with _decoding(data, name):
                crop = self.transform(data, rng)
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise
            _skipped(name, e, self._count)
            return None
        return {"image": crop, "label": np.int32(record["label"])}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_count"}

    def __setstate__(self, state):
        self.__dict__.update(state, _count=itertools.count(1))


@dataclasses.dataclass
class _EvalElement:
    """Slot i of a process's padded eval share -> {"image", "label", "mask", "index"}."""

    split: Split
    indices: range
    transform: EvalTransform
    skip_corrupt: bool
    _count: itertools.count = dataclasses.field(default_factory=lambda: itertools.count(1))

    def __call__(self, slot: int) -> dict[str, np.ndarray]:
        size = self.transform.image_size
        blank = {
            "image": np.zeros((size, size, 3), np.uint8),
            "label": np.int32(0),
            "mask": np.False_,
            "index": np.int64(-1),
        }
        if slot >= len(self.indices):
            return blank
        index = self.indices[slot]
        record = self.split.source[index]
        name = self.split.record_name(index, record)
        try:
            image = self.transform.crop(decode_image(record["image"], name))
        except CorruptImageError as e:
            if not self.skip_corrupt:
                raise
            _skipped(name, e, self._count)
            return blank | {"index": np.int64(index)}
        return {
            "image": image,
            "label": np.int32(record["label"]),
            "mask": np.True_,
            "index": np.int64(index),
        }

    __getstate__ = _TrainElement.__getstate__
    __setstate__ = _TrainElement.__setstate__


def process_indices(num_examples: int, process_index: int, process_count: int) -> range:
    """The record indices this process reads: every `process_count`-th from `process_index`."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return range(process_index, num_examples, process_count)


def eval_num_batches(num_examples: int, global_batch_size: int) -> int:
    """Batches every process runs so that all examples fit, the last ones padded."""
    return max(1, math.ceil(num_examples / global_batch_size))


def _finish(
    ds: grain.MapDataset,
    batch_size: int,
    drop_remainder: bool,
    worker_count: int,
    read_threads: int,
    read_buffer_batches: int,
) -> grain.IterDataset:
    if read_buffer_batches < 1:
        raise ValueError(f"read_buffer_batches must be at least 1, got {read_buffer_batches}")
    buffer = read_buffer_batches * batch_size  # elements each reader holds decoded ahead
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer)
    it = ds.to_iter_dataset(read).batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers
            raise RuntimeError(
                "worker_count > 0 starts grain worker processes, which read absl's flags: "
                "call shufflenet_jax.process.setup_process() first (train.py and eval.py do)"
            )
        jpeg.available(), resample.available()  # built here once, not by every worker
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def train_dataset(
    split: Split,
    *,
    batch_size: int,
    transform: TrainTransform,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    skip_corrupt: bool = False,
    worker_count: int = 0,
    read_threads: int = 16,
    read_buffer_batches: int = 4,
) -> grain.IterDataset:
    """Endless per-process batches {"image": (B, S, S, 3) uint8, "label": (B,) int32}: the
    crops before colour jitter and normalization, which the train step does on the device.

    `batch_size` is this process's share of the global batch. Records are read and transformed
    by `read_threads` threads (0: in the consuming thread) in each of `worker_count` processes
    (0: in this process), each holding up to `read_buffer_batches` batches of crops read
    ahead (host memory: that many times the batch's bytes per reader). The order (reshuffled
    every epoch) and the augmentations depend only on `seed`, the process, `worker_count`
    (grain interleaves the workers' slices) and the position in the stream, so `iter(ds)` with
    the same arguments, or an iterator restored with `set_state`, repeats them; read threads
    and the buffer do not change them.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    indices = process_indices(len(split), process_index, process_count)
    if len(indices) == 0:
        raise ValueError(f"{split.dataset}/{split.split} is empty for process {process_index}")
    process_seed = int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0])
    ds = grain.MapDataset.source(indices).map(_WithIndex(split.source))
    ds = ds.seed(process_seed).shuffle().repeat(None)
    ds = ds.random_map(_TrainElement(split, transform, skip_corrupt))
    return _finish(ds, batch_size, True, worker_count, read_threads, read_buffer_batches)


def eval_dataset(
    split: Split,
    *,
    batch_size: int,
    transform: EvalTransform,
    process_index: int = 0,
    process_count: int = 1,
    skip_corrupt: bool = False,
    worker_count: int = 0,
    read_threads: int = 16,
    read_buffer_batches: int = 4,
) -> grain.IterDataset:
    """Per-process batches {"image": (B, S, S, 3) uint8, "label", "mask", "index"}, every
    example exactly once; the eval step normalizes the images (`normalization.standardize`).

    Every process yields `eval_num_batches(len(split), batch_size * process_count)` batches of
    `batch_size`; slots past the process's share have `mask == False` and `index == -1`. A
    skipped corrupt record keeps its index with `mask == False`.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    indices = process_indices(len(split), process_index, process_count)
    slots = eval_num_batches(len(split), batch_size * process_count) * batch_size
    ds = grain.MapDataset.range(slots).map(_EvalElement(split, indices, transform, skip_corrupt))
    return _finish(ds, batch_size, False, worker_count, read_threads, read_buffer_batches)


def fake_batches(
    sharding: jax.sharding.Sharding,
    batch_size: int,
    image_size: int,
    num_classes: int,
    dtype: Any = jnp.float32,
    seed: int = 0,
) -> Iterator[dict[str, jax.Array]]:
    """Endless {"image", "label"} global batches made on the devices, for throughput runs."""

    def make(key):
        k1, k2 = jax.random.split(key)
        image = jax.random.normal(k1, (batch_size, image_size, image_size, 3), dtype)
        return {"image": image, "label": jax.random.randint(k2, (batch_size,), 0, num_classes)}

    batch = jax.jit(make, out_shardings=sharding)(jax.random.key(seed))
    while True:
        yield batch
