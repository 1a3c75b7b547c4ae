"""The grain input pipeline: transforms, sharding, determinism, iterator state, padding, errors."""

import io
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from shufflenet_jax.data import jpeg, normalization, prepare
from shufflenet_jax.data import pipeline as ip

TRAIN = ip.TrainTransform(image_size=16, scale=(0.35, 1.0), flip=True)
EVAL = ip.EvalTransform(image_size=16, resize_size=16)
LOW = (0.0 - np.array(normalization.IMAGENET_MEAN)) / np.array(normalization.IMAGENET_STD)
HIGH = (1.0 - np.array(normalization.IMAGENET_MEAN)) / np.array(normalization.IMAGENET_STD)


@pytest.fixture(scope="module")
def train_split(digits_data_dir):
    return ip.load_split("digits", "train", digits_data_dir)


@pytest.fixture(scope="module")
def test_split(digits_data_dir):
    return ip.load_split("digits", "test", digits_data_dir)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def smooth_jpeg(path, width, height, seed=0):
    """A photo-like JPEG: smooth colour gradients plus mild noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(7 * xx + 1), np.cos(5 * yy), np.sin(3 * (xx + yy))], -1)
    pixels = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)


@pytest.mark.torch
@pytest.mark.parametrize(
    "size,resize,crop", [((500, 375), 256, 224), ((333, 517), 232, 224), ((180, 150), 200, 224)]
)
def test_eval_transform_matches_torchvision_on_a_jpeg(tmp_path, size, resize, crop):
    """Same decoder (PIL), same resize rule and arithmetic as torchvision.

    Bound: 1e-6 in normalized units, i.e. under 1e-4 of one 8-bit intensity step (1/255/0.229 =
    0.017); a model's logits move by far less than that between two inputs that close, so top-1
    cannot change. The third case is smaller than the crop (torchvision pads with zeros).
    """
    from torchvision import transforms

    path = tmp_path / "photo.jpg"
    smooth_jpeg(path, *size)
    ours = ip.EvalTransform(image_size=crop, resize_size=resize)(
        ip.decode_image(path.read_bytes(), "photo")
    )
    reference = transforms.Compose(
        [
            transforms.Resize(resize),
            transforms.CenterCrop(crop),
            transforms.ToTensor(),
            transforms.Normalize(normalization.IMAGENET_MEAN, normalization.IMAGENET_STD),
        ]
    )(Image.open(path).convert("RGB"))
    theirs = reference.permute(1, 2, 0).numpy()
    assert ours.shape == theirs.shape == (crop, crop, 3) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-6


@pytest.mark.parametrize("n", [1, 7, 359, 1000])
@pytest.mark.parametrize("processes", [1, 2, 3, 8])
def test_process_shares_are_disjoint_and_cover_the_split(n, processes):
    shares = [set(ip.process_indices(n, p, processes)) for p in range(processes)]
    assert sum(len(s) for s in shares) == n
    assert set().union(*shares) == set(range(n))


@pytest.mark.parametrize(
    "global_batch,processes", [(64, 1), (100, 2), (24, 3), (8, 8), (359, 1), (1000, 2)]
)
def test_eval_visits_every_example_exactly_once(test_split, global_batch, processes):
    """359 examples, batch sizes that do and do not divide it, 1-8 processes."""
    per_process = global_batch // processes
    seen, lengths = [], set()
    for p in range(processes):
        batches = list(
            ip.eval_dataset(
                test_split,
                batch_size=per_process,
                transform=EVAL,
                process_index=p,
                process_count=processes,
            )
        )
        lengths.add(len(batches))
        for b in batches:
            assert b["image"].shape == (per_process, 16, 16, 3)
            assert np.all(b["index"][~b["mask"]] == -1)
            seen.extend(b["index"][b["mask"]].tolist())
    assert lengths == {ip.eval_num_batches(359, global_batch)}
    assert sorted(seen) == list(range(359))


def test_eval_labels_belong_to_their_records(test_split):
    (batch,) = list(ip.eval_dataset(test_split, batch_size=400, transform=EVAL))
    mask = batch["mask"]
    for index, label in zip(batch["index"][mask], batch["label"][mask], strict=True):
        assert label == test_split.source[int(index)]["label"]


def test_same_seed_gives_the_same_batches_and_another_seed_differs(train_split):
    def stream(seed, threads=16, buffer=4):
        ds = ip.train_dataset(
            train_split,
            batch_size=32,
            transform=TRAIN,
            seed=seed,
            read_threads=threads,
            read_buffer_batches=buffer,
        )
        return take(iter(ds), 3)

    a, b, c = stream(0), stream(0, threads=0), stream(1)
    assert_same_batches(a, b)
    assert_same_batches(a, stream(0, threads=2, buffer=1))  # the read buffer changes no batch
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_a_read_buffer_below_one_batch_is_an_error_naming_it(train_split, test_split):
    with pytest.raises(ValueError, match="read_buffer_batches must be at least 1, got 0"):
        ip.train_dataset(train_split, batch_size=8, transform=TRAIN, seed=0, read_buffer_batches=0)
    with pytest.raises(ValueError, match="read_buffer_batches"):
        ip.eval_dataset(test_split, batch_size=8, transform=EVAL, read_buffer_batches=-1)


def test_restored_iterator_continues_with_the_next_batch(train_split):
    ds = ip.train_dataset(train_split, batch_size=50, transform=TRAIN, seed=3)
    it = iter(ds)
    take(it, 30)  # past the first epoch (1438 examples): the reshuffled second one
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 2)
    restored = iter(ds)
    restored.set_state(state)
    assert_same_batches(take(restored, 2), expected)


def test_epochs_are_reshuffled_permutations_of_the_share(train_split):
    ds = ip.train_dataset(train_split, batch_size=1, transform=TRAIN, seed=0, read_threads=0)
    labels = np.concatenate([b["label"] for b in take(iter(ds), 2 * len(train_split))])
    first, second = labels[: len(train_split)], labels[len(train_split) :]
    expected = np.sort([train_split.source[i]["label"] for i in range(len(train_split))])
    np.testing.assert_array_equal(np.sort(first), expected)
    np.testing.assert_array_equal(np.sort(second), expected)
    assert not np.array_equal(first, second)


@pytest.mark.os_level
def test_worker_processes_give_a_reproducible_restorable_stream(train_split):
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags: what setup_process does
    ds = ip.train_dataset(train_split, batch_size=16, transform=TRAIN, seed=0, worker_count=2)
    it = iter(ds)
    first = take(it, 3)
    state = it.get_state()
    after = take(it, 2)
    again = iter(ds)
    assert_same_batches(take(again, 3), first)
    restored = iter(ds)
    restored.set_state(state)
    assert_same_batches(take(restored, 2), after)


def test_worker_processes_without_the_process_setup_are_a_clear_error(digits_data_dir):
    code = (
        "from shufflenet_jax.data import pipeline as ip\n"
        f"s = ip.load_split('digits', 'train', r'{digits_data_dir}')\n"
        "ip.train_dataset(s, batch_size=4, transform=ip.TrainTransform(16), seed=0, worker_count=1)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "call shufflenet_jax.process.setup_process() first" in r.stderr, r.stderr[-2000:]


@pytest.mark.os_level
def test_worker_processes_find_the_host_libraries_built(digits_data_dir, tmp_path):
    """Built once by the process that starts the workers, not compiled again by each of them
    on a cold cache (a second or more each)."""
    code = (
        "import os\n"
        "from shufflenet_jax.process import setup_process\n"
        "from shufflenet_jax.data import pipeline as ip\n"
        "setup_process()\n"
        f"s = ip.load_split('digits', 'train', r'{digits_data_dir}')\n"
        "ip.train_dataset(s, batch_size=4, transform=ip.TrainTransform(16), seed=0, "
        "worker_count=1)\n"
        "print(*sorted(n.split('-')[0] for n in os.listdir(os.environ['SHUFFLENET_JAX_CACHE'])))\n"
    )
    env = {**os.environ, "SHUFFLENET_JAX_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"jpeg", "resample"} <= set(r.stdout.strip().splitlines()[-1].split())


def test_train_and_eval_batches_have_documented_shapes_dtypes_and_ranges(train_split, test_split):
    (train,) = take(iter(ip.train_dataset(train_split, batch_size=8, transform=TRAIN, seed=0)), 1)
    assert train["image"].shape == (8, 16, 16, 3) and train["image"].dtype == np.uint8
    assert train["label"].shape == (8,) and train["label"].dtype == np.int32
    assert np.all((train["label"] >= 0) & (train["label"] < 10))
    evaluation = next(iter(ip.eval_dataset(test_split, batch_size=8, transform=EVAL)))
    assert evaluation["image"].shape == (8, 16, 16, 3) and evaluation["image"].dtype == np.uint8
    assert evaluation["mask"].dtype == np.bool_ and evaluation["index"].dtype == np.int64
    assert evaluation["label"].dtype == np.int32


def test_the_eval_step_normalizes_uint8_crops_as_the_host_eval_transform_does(test_split):
    """The eval stream sends uint8 crops and the eval step normalizes them: the step on those
    crops must compute what it computes on `EvalTransform`'s (torchvision's, tested above)
    float images. Bounds: the inputs within 1e-6 (as above); the summed loss of 8 images within
    1e-4 relative (a random 0.5x network in eval mode moves float32 rounding of its input by a
    few 1e-6; skipping the normalization changes the loss by orders of magnitude)."""
    from shufflenet_jax.model.inference import split_model
    from shufflenet_jax.model.network import abstract_model
    from shufflenet_jax.train import step

    from .helpers import random_values

    batch = next(iter(ip.eval_dataset(test_split, batch_size=8, transform=EVAL)))
    host = np.stack(
        [EVAL(ip.decode_image(test_split.source[int(i)]["image"], "x")) for i in batch["index"]]
    )
    device = np.asarray(jax.jit(normalization.standardize)(batch["image"]))
    np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)
    assert np.all(device >= LOW - 1e-6) and np.all(device <= HIGH + 1e-6)

    model = abstract_model(0.5, 10)
    nnx.update(model, random_values(model, seed=0))
    graphdef, params, stats = split_model(model)
    eval_step = step.make_eval_step(graphdef)
    on_uint8, _ = eval_step(params, stats, batch)
    on_host, _ = eval_step(params, stats, {**batch, "image": host})
    assert on_uint8["count"] == on_host["count"] == 8
    np.testing.assert_allclose(on_uint8["loss_sum"], on_host["loss_sum"], rtol=1e-4)


def test_random_resized_crop_box_respects_bounds_scale_and_ratio():
    rng = np.random.default_rng(0)
    for width, height in [(500, 375), (64, 64), (30, 300), (8, 8)]:
        for _ in range(200):
            left, top, w, h = ip.random_resized_crop_box(
                width, height, (0.08, 1.0), (0.75, 4 / 3), rng
            )
            assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
            assert w > 0 and h > 0
    # a 30x300 strip is outside the ratio range: the fallback is the largest allowed center crop
    box = ip.random_resized_crop_box(30, 300, (0.99, 1.0), (0.75, 4 / 3), rng)
    assert box == (0, 130, 30, 40)


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, quality=90)
    return buffer.getvalue()


def test_train_transform_flips_half_the_time_and_gives_uint8_crops():
    image = Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3))
    flat = ip.TrainTransform(image_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=True)
    plain, data = np.asarray(image), encoded(image)
    flips = 0
    for seed in range(40):
        out = flat(data, np.random.default_rng(seed))
        assert out.dtype == np.uint8
        if np.array_equal(out, plain[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, plain)
    assert 10 <= flips <= 30


def test_a_jpeg_is_decoded_at_the_size_its_crop_needs(tmp_path, monkeypatch):
    """A small crop of a large JPEG is read through DCT scaling (draft): the result is the same
    crop as from the full decode, to what a different resampling path allows."""
    path = tmp_path / "big.jpg"
    smooth_jpeg(path, 800, 600)
    transform = ip.TrainTransform(image_size=64, scale=(0.5, 0.5), ratio=(1.0, 1.0), flip=False)
    scales = []
    decode_region = jpeg.decode_region
    monkeypatch.setattr(
        jpeg, "decode_region", lambda d, s, *a: scales.append(s) or decode_region(d, s, *a)
    )
    drafted = transform(path.read_bytes(), np.random.default_rng(3))
    assert scales == [4]  # a 490-pixel crop needs only 64: decoded at a quarter, 122 pixels
    full = encoded(ip.decode_image(path.read_bytes(), "big"))  # a PNG: no draft applies
    reference = transform(full, np.random.default_rng(3))
    assert drafted.shape == reference.shape == (64, 64, 3)
    assert np.abs(drafted.astype(int) - reference.astype(int)).mean() < 2.0


@pytest.fixture(scope="module")
def corrupt_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    for cls in ["a", "b"]:
        (root / "train" / cls).mkdir(parents=True)
        for i in range(3):
            smooth_jpeg(root / "train" / cls / f"{i}.jpg", 20, 20, seed=i)
    good = (root / "train" / "b" / "0.jpg").read_bytes()
    (root / "train" / "b" / "broken.jpg").write_bytes(good[: len(good) // 2])
    data_dir = tmp_path_factory.mktemp("corrupt_tfds")
    prepare.prepare("image_folder", str(data_dir), str(root), check_images=False)  # as if elsewhere
    return ip.load_split("image_folder", "train", str(data_dir))


def test_corrupt_image_is_an_error_naming_the_record(corrupt_split):
    with pytest.raises(
        ip.CorruptImageError, match=r"image_folder/train record \d \(b/broken.jpg\)"
    ):
        take(
            iter(ip.train_dataset(corrupt_split, batch_size=7, transform=EVAL_AS_TRAIN, seed=0)), 1
        )
    with pytest.raises(ip.CorruptImageError, match=r"b/broken.jpg"):
        list(ip.eval_dataset(corrupt_split, batch_size=7, transform=EVAL))


EVAL_AS_TRAIN = ip.TrainTransform(image_size=16, flip=False)


def test_corrupt_image_can_be_skipped_and_is_logged(corrupt_split, caplog):
    caplog.set_level(logging.WARNING, logger="shufflenet_jax.data.pipeline")
    train = ip.train_dataset(
        corrupt_split, batch_size=6, transform=EVAL_AS_TRAIN, seed=0, skip_corrupt=True
    )
    batches = take(iter(train), 2)  # 7 records, one broken: each epoch has 6 good ones
    for b in batches:
        assert sorted(b["label"].tolist()) == [0, 0, 0, 1, 1, 1]
    (batch,) = list(ip.eval_dataset(corrupt_split, batch_size=8, transform=EVAL, skip_corrupt=True))
    assert batch["mask"].sum() == 6
    broken = [i for i in range(7) if corrupt_split.source[i]["file_name"] == b"b/broken.jpg"]
    assert batch["index"][~batch["mask"]].tolist() == broken + [-1]
    assert any(
        "b/broken.jpg" in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records
    )


def test_load_split_names_the_problem(digits_data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'digitz'"):
        ip.load_split("digitz", "train", digits_data_dir)
    with pytest.raises(ValueError, match="no split 'validation'; it has \\['test', 'train'\\]"):
        ip.load_split("digits", "validation", digits_data_dir)
    with pytest.raises(
        ValueError, match="not prepared .* python -m shufflenet_jax.data.prepare digits"
    ):
        ip.load_split("digits", "train", str(tmp_path))


def test_reading_needs_no_tensorflow(digits_data_dir):
    code = (
        "import tests.hide_tensorflow, sys\n"
        "from shufflenet_jax.data import pipeline as ip\n"
        f"s = ip.load_split('digits', 'train', r'{digits_data_dir}')\n"
        "t = ip.TrainTransform(image_size=16)\n"
        "b = next(iter(ip.train_dataset(s, batch_size=4, transform=t, seed=0)))\n"
        "assert b['image'].shape == (4, 16, 16, 3)\n"
        "assert not any(m.split('.')[0] == 'tensorflow' for m in sys.modules), 'imported TF'\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("ok")


def test_fake_batches_are_made_on_the_devices_with_the_requested_sharding():
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    batch = next(ip.fake_batches(sharding, 16, 32, 10))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["label"].shape == (16,)
    assert batch["image"].sharding == sharding and len(batch["image"].addressable_shards) == 8
    assert int(batch["label"].min()) >= 0 and int(batch["label"].max()) < 10


def test_an_undecodable_image_names_its_reason_not_a_buffer_object():
    with pytest.raises(ip.CorruptImageError) as e:
        ip.decode_image(b"not an image", "cats/1.jpg")
    message = str(e.value)
    assert "cats/1.jpg" in message and "(12 bytes)" in message and "BytesIO" not in message
