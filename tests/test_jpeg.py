"""The JPEG region decoder against Pillow's full decode, and the train crop through it."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from shufflenet_jax.data import jpeg
from shufflenet_jax.data import pipeline as ip
from shufflenet_jax.kernels import build

KINDS = [  # (subsampling, progressive, mode): 4:4:4, 4:2:2, 4:2:0 chroma, both scan orders
    (0, False, "RGB"),
    (1, False, "RGB"),
    (2, False, "RGB"),
    (2, True, "RGB"),
    (1, True, "RGB"),
    (2, False, "L"),
    (2, False, "CMYK"),  # libjpeg gives no RGB: Pillow's path
]


def photo_jpeg(width: int, height: int, kind, seed: int = 0) -> bytes:
    """Gradients with noise: every block has detail, so an offset block shows."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / 300.0
    f = rng.uniform(2, 12, 3)
    base = np.stack([np.sin(f[0] * xx), np.cos(f[1] * yy), np.sin(f[2] * (xx + yy))], -1)
    pixels = np.clip(127 + 90 * base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    subsampling, progressive, mode = kind
    buffer = io.BytesIO()
    image = Image.fromarray(pixels).convert(mode)
    image.save(buffer, "JPEG", quality=90, subsampling=subsampling, progressive=progressive)
    return buffer.getvalue()


def pillow_decode(data: bytes, request: tuple[int, int]) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", request)
        return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("kind", KINDS[:-1])
@pytest.mark.parametrize("reduce", [1, 2, 4, 8])
def test_a_decoded_region_has_the_pixels_of_pillows_full_decode(kind, reduce):
    """Exactly: libjpeg-turbo's integer DCT and upsampling give the same bytes on every SIMD
    path (its own tests check decoded checksums), and Pillow decodes with libjpeg-turbo too.
    Different bytes would mean a region's edge decoded without its neighbours."""
    assert jpeg.available(), "the C++ JPEG decoder must build on the test machines"
    rng = np.random.default_rng(reduce)
    for trial in range(6):
        width, height = (int(v) for v in rng.integers(40, 520, 2))
        data = photo_jpeg(width, height, kind, seed=trial)
        request = (width // reduce, height // reduce)
        full = pillow_decode(data, request)
        assert jpeg.size(data) == (width, height)
        h, w = full.shape[:2]
        r0, c0 = int(rng.integers(0, h)), int(rng.integers(0, w))
        r1, c1 = int(rng.integers(r0 + 1, h + 1)), int(rng.integers(c0 + 1, w + 1))
        scale = jpeg.draft_scale(width, height, request)
        pixels, first = jpeg.decode_region(data, scale, (r0, r1), (c0, c1))
        assert first <= c0 and first + pixels.shape[1] >= c1
        np.testing.assert_array_equal(pixels[:, c0 - first : c1 - first], full[r0:r1, c0:c1])


@pytest.mark.parametrize("kind", KINDS)
def test_train_crops_are_the_same_with_and_without_the_region_decoder(kind, monkeypatch):
    """Region decode + the windowed resize against Pillow's full (drafted) decode + the resize,
    on the same draws: the same bytes, so the C++ decoder never changes a training stream."""
    transform = ip.TrainTransform(image_size=64)
    sizes = [(500, 375), (333, 517), (900, 260), (70, 64)]  # drafted by 2 and 4, and not
    images = [photo_jpeg(w, h, kind, i) for i, (w, h) in enumerate(sizes)]
    seeds = range(6)
    ours = [transform(data, np.random.default_rng(s)) for data in images for s in seeds]
    monkeypatch.setattr(jpeg, "size", lambda data: None)  # as where the decoder is unavailable
    theirs = [transform(data, np.random.default_rng(s)) for data in images for s in seeds]
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_tiny_and_restart_marker_jpegs_give_the_same_crops(monkeypatch):
    """Images narrower than the margin or a block, and restart intervals in the scan."""
    rng = np.random.default_rng(5)
    images = []
    for width, height in [(1, 1), (17, 1), (1, 40), (400, 300)]:
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90, restart_marker_rows=1)
        images.append(buffer.getvalue())
    transform = ip.TrainTransform(image_size=32)
    ours = [transform(data, np.random.default_rng(0)) for data in images]
    monkeypatch.setattr(jpeg, "size", lambda data: None)
    for data, crop in zip(images, ours, strict=True):
        np.testing.assert_array_equal(crop, transform(data, np.random.default_rng(0)))


def test_draft_scale_is_the_one_pillow_picks():
    data = photo_jpeg(517, 389, KINDS[2])
    for request in [(517, 389), (300, 100), (129, 97), (130, 98), (65, 40), (60, 60), (10, 10)]:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", request)
            expected = next(s for s in (8, 4, 2, 1) if image.size == (-(-517 // s), -(-389 // s)))
        assert jpeg.draft_scale(517, 389, request) == expected, request


def test_a_truncated_jpeg_is_left_to_pillow_which_names_it():
    data = photo_jpeg(200, 150, KINDS[2])
    broken = data[: len(data) // 2]
    assert jpeg.size(broken) == (200, 150)  # the header is intact
    assert jpeg.decode_region(broken, 1, (0, 150), (0, 200)) is None
    transform = ip.TrainTransform(image_size=32)
    with pytest.raises(OSError, match="truncated"):
        transform(broken, np.random.default_rng(0))
    assert jpeg.size(b"\xff\xd8 not a jpeg") is None and jpeg.size(b"\x89PNG") is None


def test_a_region_outside_the_image_is_an_error_naming_it():
    data = photo_jpeg(200, 150, KINDS[2])
    with pytest.raises(ValueError, match=r"rows \(0, 76\) x columns \(0, 10\) are not inside"):
        jpeg.decode_region(data, 2, (0, 76), (0, 10))  # 75 rows at half size


def test_without_the_library_crops_are_pillows_with_a_warning(monkeypatch):
    def no_build(*args, **kwargs):
        raise build.CppBuildError("compiling jpeg.cc failed: jpeglib.h: No such file")

    data = photo_jpeg(300, 200, KINDS[2])
    expected = ip.TrainTransform(image_size=32)(data, np.random.default_rng(1))
    monkeypatch.setattr(build, "build_library", no_build)
    jpeg._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert jpeg.size(data) is None
            got = ip.TrainTransform(image_size=32)(data, np.random.default_rng(1))
        np.testing.assert_array_equal(got, expected)
        assert any("C++ JPEG decoder unavailable" in str(w.message) for w in caught)
    finally:
        jpeg._library.cache_clear()
