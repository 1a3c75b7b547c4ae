"""The device-side augmentation: torchvision's ColorJitter distribution and blends, the
normalization the host used to do, and keys that depend only on (seed, step, index)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shufflenet_jax import ShuffleNetV2
from shufflenet_jax.data import augment
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.train.state import TrainState
from shufflenet_jax.train.step import make_train_step

GRAY = np.array(augment.GRAY_WEIGHTS, np.float32)


def reference_jitter(x, order, factors):
    """torchvision's blends (adjust_brightness/contrast/saturation on float images), numpy."""
    for op in order:
        f = np.float32(factors[op])
        if op == 0:
            x = x * f
        elif op == 1:
            m = np.float32((x @ GRAY).mean())
            x = f * x + (1 - f) * m
        else:
            g = (x @ GRAY)[..., None]
            x = f * x + (1 - f) * g
        x = np.clip(x, 0, 1)
    return x


def test_device_jitter_matches_the_per_image_reference_on_the_same_factors():
    rng = np.random.default_rng(0)
    images = rng.random((6, 12, 10, 3), np.float32)
    keys = jax.random.split(jax.random.key(1), len(images))
    jitter = jax.jit(jax.vmap(lambda k, x: augment.color_jitter(x, *augment.jitter_params(k, 0.4))))
    got = np.asarray(jitter(keys, images))
    for k, x, y in zip(keys, images, got, strict=True):
        order, factors = (np.asarray(a) for a in augment.jitter_params(k, 0.4))
        # float32 rounding of two differently ordered blends, far below one 8-bit step
        np.testing.assert_allclose(y, reference_jitter(x, order, factors), atol=2e-6)


def test_jitter_factors_and_orders_have_torchvisions_distribution():
    """ColorJitter(0.4, 0.4, 0.4): each factor uniform in [0.6, 1.4], the order a uniform
    permutation. 6,000 fixed keys; each bound is five standard errors wide."""
    keys = jax.random.split(jax.random.key(0), 6000)
    orders, factors = jax.vmap(lambda k: augment.jitter_params(k, 0.4))(keys)
    factors, orders = np.asarray(factors), np.asarray(orders)
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert np.all(np.abs(factors.mean(0) - 1.0) < 5 * 0.8 / np.sqrt(12 * 6000))
    assert np.all(np.abs(factors.var(0) - 0.8**2 / 12) < 0.004)
    counts = {p: 0 for p in itertools.permutations(range(3))}
    for o in map(tuple, orders):
        counts[o] += 1
    share = np.array(list(counts.values())) / 6000
    assert np.all(np.abs(share - 1 / 6) < 5 * np.sqrt(1 / 6 * 5 / 6 / 6000)), share


def test_without_jitter_the_device_computes_torchvisions_normalization():
    from shufflenet_jax.data import normalization as n

    images = np.random.default_rng(2).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    got = np.asarray(jax.jit(augment.make_augment(0))(5, images))
    mean, std = np.float32(n.IMAGENET_MEAN), np.float32(n.IMAGENET_STD)
    want = (images / np.float32(255) - mean) / std  # ToTensor, then Normalize
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_each_image_draws_from_its_seed_step_and_position_only():
    images = np.random.default_rng(3).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    f = jax.jit(augment.make_augment(7, 0.4))
    a, again, later = f(10, images), f(10, images), f(11, images)
    np.testing.assert_array_equal(a, again)
    assert not np.allclose(a, later)
    other = images.copy()
    other[1:] = 0  # other images elsewhere in the batch do not change image 0's factors
    b = f(10, other)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.allclose(f(10, images), jax.jit(augment.make_augment(8, 0.4))(10, images))


def test_the_train_step_augments_uint8_batches_at_its_step_and_passes_float_ones_through():
    graphdef, params, stats = split_model(ShuffleNetV2(0.5, 10, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.0)
    images = np.random.default_rng(4).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    labels = jnp.arange(4)

    def loss(step, batch):
        state = TrainState(jnp.full((), 3, jnp.int32), params, stats, tx.init(params), None)
        return float(step(jax.tree.map(jnp.copy, state), batch)[1]["loss"])

    # an augmentation that shows what it was given: the state's step, for every pixel
    with_augment = make_train_step(graphdef, tx, augment=lambda n, x: jnp.full(x.shape, n / 8.0))
    plain = make_train_step(graphdef, tx)
    by_step = loss(with_augment, {"image": images, "label": labels})
    assert by_step == loss(
        plain, {"image": np.full(images.shape, 3 / 8.0, np.float32), "label": labels}
    )
    float_batch = {"image": augment.make_augment(0)(0, images), "label": labels}
    assert loss(with_augment, float_batch) == loss(plain, float_batch)
    # without an augmentation, uint8 images are normalized as the eval step does, not fed raw.
    # Not bit-equal: the normalization compiles into the step, rounding the inputs differently
    # by an ulp, which a random net in training mode moves by 1e-4 (measured); raw 0-255
    # pixels give a loss that differs in the first digits.
    normalized = loss(plain, {"image": images, "label": labels})
    assert normalized == pytest.approx(loss(plain, float_batch), rel=1e-3)
    raw = loss(plain, {"image": images.astype(np.float32), "label": labels})
    assert abs(raw - normalized) > 0.1 * normalized, (raw, normalized)


def test_one_normalization_gives_the_host_numpy_and_the_device_jax_the_same_values():
    """The host's eval transform and the steps share `data.normalization`: uint8 in, float32
    (x / 255 - mean) / std out, of the array kind that came in. Bound: float32 rounding of
    the same three operations, which XLA may fuse into different instructions (1e-6)."""
    from shufflenet_jax.data import normalization as n

    images = np.random.default_rng(4).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    host = n.standardize(images)
    device = jax.jit(n.standardize)(jnp.asarray(images))
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    assert isinstance(device, jax.Array) and device.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(device), host, rtol=0, atol=1e-6)
    # torchvision's ToTensor + Normalize with ImageNet's statistics, in float64
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(host, (images / 255.0 - mean) / std, rtol=0, atol=1e-6)
