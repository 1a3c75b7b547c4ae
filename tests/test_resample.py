"""The training crop's C++ resize against Pillow's BILINEAR resize with a box."""

import warnings

import numpy as np
import pytest
from PIL import Image

from shufflenet_jax.data import resample
from shufflenet_jax.kernels import build

BOXES = [
    (0.0, 0.0, 500.0, 375.0),  # the whole image, downscaled 2.2x / 1.7x
    (10.5, 3.2, 330.7, 300.1),  # a typical random-resized crop, fractional edges
    (0.0, 0.0, 112.0, 112.0),  # upscaled 2x
    (430.25, 300.5, 500.0, 375.0),  # at the far corner, upscaled
    (100.0, 50.0, 101.5, 51.5),  # a tiny box: every output reads the same few pixels
    (0.0, 0.0, 500.0, 20.0),  # very wide: different factors per axis
]


def photo(seed: int = 0) -> Image.Image:
    """500x375 RGB: smooth gradients with noise, edges included."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500] / 500.0
    base = np.stack([np.sin(9 * xx), np.cos(7 * yy), np.sin(5 * (xx + yy))], -1)
    pixels = np.clip(127 + 110 * base + rng.normal(0, 25, base.shape), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def pillow(image: Image.Image, box, size: int, flip: bool) -> np.ndarray:
    crop = image.resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop)


@pytest.mark.parametrize("box", BOXES)
@pytest.mark.parametrize("size,flip", [(224, False), (224, True), (17, False)])
def test_the_crop_resize_matches_pillows_bilinear_to_one_intensity_level(box, size, flip):
    """Bound: one 8-bit level, and a mean difference under half a level. Pillow rounds to 8
    bits after each of its two passes, the C++ passes round once, so a pixel whose exact value
    lies near a half level can land on either side; more than one level would be a wrong tap
    or weight (a one-pixel shift of these noisy images moves values by tens of levels)."""
    assert resample.available(), "the C++ resize must build on the test machines"
    image = photo()
    ours = resample.resized_crop(np.asarray(image), box, size, flip)
    theirs = pillow(image, box, size, flip)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert difference.max() <= 1
    assert difference.mean() < 0.5


def test_an_integer_box_at_the_output_size_is_an_exact_copy():
    image = np.asarray(photo(1))
    box = (37.0, 41.0, 261.0, 265.0)
    expected = image[41:265, 37:261]
    np.testing.assert_array_equal(resample.resized_crop(image, box, 224, False), expected)
    np.testing.assert_array_equal(resample.resized_crop(image, box, 224, True), expected[:, ::-1])


def test_a_box_outside_the_image_is_an_error_naming_it():
    with pytest.raises(ValueError, match=r"crop box .* is not inside the 500x375 image"):
        resample.resized_crop(np.asarray(photo()), (0.0, 0.0, 501.0, 375.0), 224, False)
    with pytest.raises(ValueError, match=r"needs RGB uint8 pixels, got uint8 \(375, 500\)"):
        resample.resized_crop(np.asarray(photo().convert("L")), (0.0, 0.0, 10.0, 10.0), 8, False)


@pytest.mark.parametrize("box", BOXES)
def test_a_window_holding_the_source_pixels_gives_the_whole_images_crop(box):
    """What the JPEG region decoder hands over: the same taps and weights, so the same bytes."""
    image = np.asarray(photo(2))
    (r0, r1), (c0, c1) = resample.source_window(box, 224, image.shape[:2])
    window = image[r0:r1, c0:c1]
    whole = resample.resized_crop(image, box, 224, True)
    part = resample.resized_crop(window, box, 224, True, origin=(r0, c0), shape=image.shape[:2])
    np.testing.assert_array_equal(part, whole)
    with pytest.raises(ValueError, match="lacks pixels that resizing box"):  # 2 rows: too few
        resample.resized_crop(window[:2], box, 224, True, origin=(r0, c0), shape=image.shape[:2])


def test_without_a_compiler_the_crop_is_pillows_with_a_warning(monkeypatch):
    def no_build(*args, **kwargs):
        raise build.CppBuildError("C++ compiler 'none' not found")

    monkeypatch.setattr(build, "build_library", no_build)
    resample._resize_rgb.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image, box = photo(), BOXES[1]
            got = resample.resized_crop(np.asarray(image), box, 224, True)
        np.testing.assert_array_equal(got, pillow(image, box, 224, True))
        assert any("C++ resize unavailable, using Pillow's" in str(w.message) for w in caught)
        # a window (the JPEG region decoder's) holds every tap: Pillow's taps are the same
        pixels = np.asarray(image)
        (r0, r1), (c0, c1) = resample.source_window(box, 224, pixels.shape[:2])
        window = pixels[r0:r1, c0:c1]
        part = resample.resized_crop(window, box, 224, True, (r0, c0), pixels.shape[:2])
        np.testing.assert_array_equal(part, got)
    finally:
        resample._resize_rgb.cache_clear()
