"""Images/second of the input pipeline on ImageNet-sized JPEGs (docs/input_pipeline.md).

    python benchmarks/input_pipeline.py [--images 1024] [--batch 64] [--repeats 3] [--json OUT]
        [--feed 10000] [--short_side 320]
    python benchmarks/input_pipeline.py --copy-only [--batch 256]   (on an accelerator)

Writes `--images` photo-like JPEGs (500x375, quality 90, about ImageNet's median size and
compression) into a temporary image folder and prepares it twice with the `image_folder`
builder: as they are, and pre-resized (`--train_short_side`, shorter side `--short_side`).
For each, single-threaded and alternating: the host's train transform (decode at the size
the crop needs and only where it reads, random-resized crop 224, flip, uint8 out; colour
jitter and normalization run on the device), the same with Pillow's full decode, Pillow's
decode alone, and the crop's resize alone, C++ against Pillow's. Then the
train stream (grain) and the eval stream (resize 256, center crop 224, uint8) for reader
settings of worker processes x threads. Last, the host-to-device copy of one batch as uint8
and as float32, and the cores the train stream needs to feed `--feed` images/s at the
one-core rate. Each: a warm-up, then `--repeats` timed passes; the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np
from PIL import Image

from shufflenet_jax.data import jpeg, prepare, resample
from shufflenet_jax.data import pipeline as ip
from shufflenet_jax.process import setup_process

SETTINGS = [(0, 0), (0, 4), (1, 0), (2, 0), (2, 4)]  # (worker processes, read threads)


def write_jpegs(root: Path, count: int, seed: int = 0) -> float:
    """`count` 500x375 JPEGs in two classes under root/train; returns the mean file size (KB)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    sizes = []
    for i in range(count):
        cls = root / "train" / f"class{i % 2}"
        cls.mkdir(parents=True, exist_ok=True)
        f = rng.uniform(2, 12, 3)
        base = np.stack([np.sin(f[0] * xx), np.cos(f[1] * yy), np.sin(f[2] * (xx + yy))], -1)
        noise = rng.normal(0, 20, base.shape)
        pixels = np.clip(127 + 90 * base + noise, 0, 255).astype(np.uint8)
        path = cls / f"{i}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024


def images_per_second(make_iter, batch: int, batches: int, repeats: int) -> float:
    it = make_iter()
    next(it)  # warm-up: worker start, first reads
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        times.append(time.perf_counter() - start)
    return batch * batches / statistics.median(times)


def alternating(fns: dict, count: int, repeats: int) -> dict[str, float]:
    """Items/s of each of `fns` (each runs over `count` items), in alternating rounds: the
    median per function and the median ratio of the first to each other, round by round."""
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(repeats, 5)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            rounds[name].append(count / (time.perf_counter() - start))
    first, *others = rounds
    rates = {name: statistics.median(r) for name, r in rounds.items()}
    for name in others:
        ratios = [a / b for a, b in zip(rounds[first], rounds[name], strict=True)]
        rates[f"ratio_{name}"] = statistics.median(ratios)
    return rates


def single_thread_rates(split: ip.Split, count: int, repeats: int) -> dict[str, float]:
    """images/s, in this thread, of the host train transform (JPEGs read by the region
    decoder), of the same with Pillow's full decode, and of Pillow's full decode alone."""
    transform = ip.TrainTransform(image_size=224)
    records = [split.source[i]["image"] for i in range(min(count, len(split)))]
    rng = np.random.default_rng(0)

    def host_transform():
        for data in records:
            transform(data, rng)

    def pillow_decode_transform():
        with mock.patch.object(jpeg, "size", lambda data: None):  # as without the C++ decoder
            host_transform()

    def decode_only():
        for data in records:
            ip.decode_image(data, "x")

    fns = {
        "host_transform": host_transform,
        "host_transform_pillow_decode": pillow_decode_transform,
        "decode_only": decode_only,
    }
    return alternating(fns, len(records), repeats)


def resize_rates(split: ip.Split, count: int, repeats: int) -> dict[str, float]:
    """Crops/s of the train crop's resize alone, C++ against Pillow's, on the same decoded
    images and boxes, alternating round by round; and their median ratio."""
    images = [ip.decode_image(split.source[i]["image"], "x") for i in range(min(count, len(split)))]
    rng = np.random.default_rng(0)
    boxes = []
    for image in images:
        left, top, w, h = ip.random_resized_crop_box(*image.size, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        boxes.append((left, top, left + w, top + h))
    arrays = [np.asarray(image) for image in images]

    def cpp():
        for pixels, box in zip(arrays, boxes, strict=True):
            resample.resized_crop(pixels, box, 224, True)

    def pillow():
        for image, box in zip(images, boxes, strict=True):
            resample.pillow_resized_crop(image, box, 224, True)

    return alternating({"cpp": cpp, "pillow": pillow}, len(images), repeats)


def copy_ms(batch: int, repeats: int) -> dict:
    """Milliseconds to put one (batch, 224, 224, 3) batch on the default device, by dtype.
    A fresh host array each time: XLA:CPU may alias an aligned float32 array, not copy it."""
    import jax

    device = jax.devices()[0]
    out: dict = {"device": device.device_kind}
    for dtype in (np.uint8, np.float32):
        arrays = [np.full((batch, 224, 224, 3), i, dtype) for i in range(repeats + 1)]
        jax.device_put(arrays[0], device).block_until_ready()
        times = []
        for x in arrays[1:]:
            start = time.perf_counter()
            jax.device_put(x, device).block_until_ready()
            times.append(time.perf_counter() - start)
        out[np.dtype(dtype).name] = 1e3 * statistics.median(times)
    return out


def stream_rates(split: ip.Split, batch: int, batches: int, repeats: int) -> list[dict]:
    """Train and eval stream images/s of `split` for each (worker processes, read threads)."""
    train_tf = ip.TrainTransform(image_size=224)
    eval_tf = ip.EvalTransform(image_size=224, resize_size=256)
    rows = []
    for workers, threads in SETTINGS:
        common = {"batch_size": batch, "worker_count": workers, "read_threads": threads}
        train = images_per_second(
            lambda c=common: iter(ip.train_dataset(split, transform=train_tf, seed=0, **c)),
            batch,
            batches,
            repeats,
        )

        def endless_eval(c=common):
            while True:
                yield from ip.eval_dataset(split, transform=eval_tf, **c)

        evaluation = images_per_second(endless_eval, batch, batches, repeats)
        rows.append(
            {"workers": workers, "threads": threads, "train_img_s": train, "eval_img_s": evaluation}
        )
        print(
            f"  workers {workers} threads {threads:2d}: train {train:7.1f} img/s, "
            f"eval {evaluation:7.1f} img/s",
            flush=True,
        )
    return rows


def measure(root: Path, data_dir: Path, args, **folder) -> dict:
    """Prepares `root` into `data_dir` (image_folder options `folder`) and measures it."""
    builder = prepare.prepare("image_folder", str(data_dir), str(root), **folder)
    split = ip.load_split("image_folder", "train", str(data_dir))
    files = list(Path(builder.data_dir).glob("*.array_record*"))
    kb = sum(f.stat().st_size for f in files) / len(split) / 1024
    single = single_thread_rates(split, 256, args.repeats)
    print(
        f"{folder or 'as written'} ({kb:.1f} KB per record): one thread: host train "
        f"transform {single['host_transform']:7.1f} img/s, with Pillow's full decode "
        f"{single['host_transform_pillow_decode']:7.1f} "
        f"({single['ratio_host_transform_pillow_decode']:.2f}x, alternating rounds); "
        f"Pillow's decode alone {single['decode_only']:7.1f} img/s",
        flush=True,
    )
    resize = resize_rates(split, 256, args.repeats)
    print(
        f"  crop resize alone: C++ {resize['cpp']:7.1f} crops/s, Pillow {resize['pillow']:7.1f} "
        f"({resize['ratio_pillow']:.2f}x, alternating rounds)",
        flush=True,
    )
    rows = stream_rates(split, args.batch, args.batches, args.repeats)
    one_core = next(r["train_img_s"] for r in rows if (r["workers"], r["threads"]) == (0, 0))
    return {
        "record_kb": kb,
        "single_thread": single,
        "crop_resize": resize,
        "rows": rows,
        "one_core_train": one_core,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--feed", type=float, default=10000.0, help="images/s to feed (estimate)")
    p.add_argument("--short_side", type=int, default=320, help="of the pre-resized copy")
    p.add_argument("--copy-only", action="store_true", help="only the host-to-device copies")
    p.add_argument("--json")
    args = p.parse_args()
    for line in setup_process():
        print(line)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    if not args.copy_only:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / "images"
            result["mean_jpeg_kb"] = write_jpegs(root, args.images)
            result["original"] = measure(root, Path(tmp) / "tfds", args)
            result["pre_resized"] = measure(
                root, Path(tmp) / "tfds_small", args, train_short_side=args.short_side
            )
            result["pre_resized"]["short_side"] = args.short_side
        one_core = result["original"]["one_core_train"]
        small = result["pre_resized"]["one_core_train"]
        cores = args.feed / one_core
        print(
            f"train stream on one core: {one_core:.1f} img/s ({small:.1f} pre-resized); "
            f"{args.feed:.0f} img/s needs about {cores:.0f} cores",
            flush=True,
        )
        result["cores_for_feed"] = {"feed_img_s": args.feed, "cores": cores}
    result["batch"] = args.batch
    result["copy_ms"] = copy_ms(args.batch, args.repeats)
    print(
        f"host-to-device copy of one batch of {args.batch} on {result['copy_ms']['device']}: uint8 "
        f"{result['copy_ms']['uint8']:.2f} ms, float32 {result['copy_ms']['float32']:.2f} ms",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
