"""The TFDS builders (digits, image_folder, imagenet2012) and the prepare command."""

import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from shufflenet_jax.data import datasets, prepare
from shufflenet_jax.data.pipeline import decode_image, load_split

# TFDS preparation and its command: files, PIL and tfds (the same in both CI legs), no JAX
pytestmark = pytest.mark.os_level


def jpeg_bytes(seed: int, size=(12, 10)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def records(split) -> dict[str, dict]:
    return {r["file_name"].decode(): r for r in (split.source[i] for i in range(len(split)))}


def test_digits_builder_holds_all_sklearn_digits_with_their_labels(digits_data_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = records(load_split("digits", "train", digits_data_dir))
    test = records(load_split("digits", "test", digits_data_dir))
    assert (len(train), len(test)) == (1438, 359)
    assert not set(train) & set(test)
    for name, r in (train | test).items():
        i = int(name.removeprefix("digit_"))
        assert r["label"] == digits.target[i]
        pixels = np.asarray(Image.open(io.BytesIO(r["image"])))
        np.testing.assert_array_equal(pixels, datasets.digits_image(digits.data[i])[..., 0])
    assert len(set(train) | set(test)) == 1797


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    files = {}
    for split, per_class in [("train", 3), ("validation", 2)]:
        for c, cls in enumerate(["bird", "cat", "dog"]):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class - (split == "validation" and cls == "dog")):
                data = jpeg_bytes(100 * c + 10 * i + len(split))
                (root / split / cls / f"{i}.jpg").write_bytes(data)
                files[(split, f"{cls}/{i}.jpg")] = (data, c)
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    return root, files


def test_image_folder_builder_reads_every_file_with_its_class(folder, tmp_path):
    root, files = folder
    builder = prepare.prepare("image_folder", data_dir=str(tmp_path), manual_dir=str(root))
    assert builder.info.features["label"].names == ["bird", "cat", "dog"]
    for split, count in [("train", 9), ("validation", 5)]:
        got = records(load_split("image_folder", split, str(tmp_path)))
        assert len(got) == count
        for name, r in got.items():
            data, label = files[(split, name)]
            assert r["image"] == data and r["label"] == label


def test_image_folder_refuses_a_class_missing_from_train(folder, tmp_path):
    root, _ = folder
    (root / "validation" / "horse").mkdir()
    try:
        with pytest.raises(ValueError, match=r"split 'validation' has classes not in 'train'"):
            prepare.prepare("image_folder", data_dir=str(tmp_path), manual_dir=str(root))
    finally:
        (root / "validation" / "horse").rmdir()


@pytest.mark.tensorflow
def test_imagenet2012_builder_prepares_the_ilsvrc2012_tar_layout(tmp_path):
    """The real TFDS builder on tars laid out as ILSVRC2012 (needs TensorFlow to prepare)."""
    manual = tmp_path / "manual"
    manual.mkdir()
    synsets = ["n01440764", "n01443537", "n02105855"]
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for s, synset in enumerate(synsets):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(2):
                    add_to_tar(class_tar, f"{synset}_{i}.JPEG", jpeg_bytes(10 * s + i))
            add_to_tar(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for i in range(1, 5):
            add_to_tar(val_tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg_bytes(100 + i, (9, 7)))

    data_dir = str(tmp_path / "tfds")
    prepare.prepare("imagenet2012", data_dir=data_dir, manual_dir=str(manual))

    names = open(tfds.core.tfds_path("datasets/imagenet2012/labels.txt")).read().split()
    val_synsets = open(tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")).read()
    train = records(load_split("imagenet2012", "train", data_dir))
    assert sorted(train) == sorted(f"{s}_{i}.JPEG" for s in synsets for i in range(2))
    for name, r in train.items():
        assert r["label"] == names.index(name.split("_")[0])
        assert decode_image(r["image"], name).size == (12, 10)
    val = records(load_split("imagenet2012", "validation", data_dir))
    assert len(val) == 4
    for i, synset in enumerate(val_synsets.split()[:4], start=1):
        assert val[f"ILSVRC2012_val_{i:08d}.JPEG"]["label"] == names.index(synset)


def test_prepare_cli_prints_splits_and_counts(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shufflenet_jax.data.prepare",
            "digits",
            "--data_dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "test: 359 examples" in out and "train: 1438 examples" in out
    # a local dataset: no "Downloading and preparing dataset Unknown size" from TFDS
    assert "from local files (no download)" in out and "Downloading" not in out


def test_prepare_without_tensorflow_says_it_is_needed_for_imagenet(tmp_path):
    (tmp_path / "ILSVRC2012_img_val.tar").write_bytes(b"")
    code = (
        "import tests.hide_tensorflow\n"
        "from shufflenet_jax.data.prepare import main\n"
        f"main(['imagenet2012', '--data_dir', r'{tmp_path}', '--manual_dir', r'{tmp_path}'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "preparing 'imagenet2012' needs TensorFlow" in r.stderr
    assert "pip install tensorflow-cpu" in r.stderr


def test_prepare_refuses_unknown_dataset_and_image_folder_without_root(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'imagenet2013'"):
        prepare.prepare("imagenet2013", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="image_folder needs --manual_dir ROOT"):
        prepare.prepare("image_folder", data_dir=str(tmp_path))


def test_image_folder_names_a_corrupt_file_at_preparation_or_skips_it(folder, tmp_path):
    """Before: a corrupt file was packed and failed training hours later."""
    root, _ = folder
    broken = root / "train" / "dog" / "broken.jpg"
    broken.write_bytes(jpeg_bytes(1)[:40])
    try:
        with pytest.raises(ValueError, match=r"train/dog/broken\.jpg is not a readable image"):
            prepare.prepare("image_folder", data_dir=str(tmp_path / "a"), manual_dir=str(root))
        prepare.prepare("image_folder", str(tmp_path / "b"), str(root), skip_corrupt=True)
        train = records(load_split("image_folder", "train", str(tmp_path / "b")))
        assert len(train) == 9 and "dog/broken.jpg" not in train
    finally:
        broken.unlink()


def test_image_folder_can_store_train_images_smaller_and_never_resizes_validation(tmp_path):
    root = tmp_path / "images"
    for split in ("train", "validation"):
        (root / split / "a").mkdir(parents=True)
        pixels = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / split / "a" / "big.jpg", quality=90)
    prepare.prepare("image_folder", str(tmp_path / "tfds"), str(root), train_short_side=120)
    sizes = {
        split: Image.open(
            io.BytesIO(
                records(load_split("image_folder", split, str(tmp_path / "tfds")))["a/big.jpg"][
                    "image"
                ]
            )
        ).size
        for split in ("train", "validation")
    }
    assert sizes == {"train": (160, 120), "validation": (400, 300)}


def test_readmes_image_folder_command_resizes_train_images_and_skips_corrupt_ones(tmp_path):
    """README's `prepare image_folder --manual_dir ROOT --data_dir DIR --train_short_side 320
    --skip_corrupt` from the command line: the training image with a shorter side over 320 is
    stored at 320, the validation image as it was, the corrupt file left out and named."""
    root = tmp_path / "images"
    pixels = np.random.default_rng(1).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    for split in ("train", "validation"):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            Image.fromarray(pixels).save(root / split / cls / "1.jpg", quality=90)
    (root / "train" / "dog" / "2.jpg").write_bytes(jpeg_bytes(1)[:40])  # truncated
    done = subprocess.run(
        [sys.executable, "-m", "shufflenet_jax.data.prepare", "image_folder", "--manual_dir",
         str(root), "--data_dir", str(tmp_path / "tfds"), "--train_short_side", "320",
         "--skip_corrupt"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dog/2.jpg" in done.stdout + done.stderr
    train = records(load_split("image_folder", "train", str(tmp_path / "tfds")))
    validation = records(load_split("image_folder", "validation", str(tmp_path / "tfds")))
    assert sorted(train) == ["cat/1.jpg", "dog/1.jpg"] and sorted(validation) == sorted(train)
    size = lambda r: Image.open(io.BytesIO(r["image"])).size  # noqa: E731
    assert {size(r) for r in train.values()} == {(480, 320)}
    assert {size(r) for r in validation.values()} == {(600, 400)}
