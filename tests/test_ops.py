import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import variants
from shufflenet_jax import ops
from shufflenet_jax.ops import channel_shuffle

SHAPES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 3))


@settings(max_examples=25, deadline=None)
@given(nhw=SHAPES, groups=st.integers(1, 5), per_group=st.integers(1, 6))
def test_channel_shuffle_matches_reference_permutation(nhw, groups, per_group):
    c = groups * per_group
    x = np.random.default_rng(0).standard_normal((*nhw, c)).astype(np.float32)
    y = np.asarray(channel_shuffle(jnp.asarray(x), groups))
    for g in range(groups):
        for k in range(per_group):
            np.testing.assert_array_equal(y[..., k * groups + g], x[..., g * per_group + k])


@settings(max_examples=25, deadline=None)
@given(nhw=SHAPES, groups=st.integers(1, 5), per_group=st.integers(1, 6))
def test_channel_shuffle_then_inverse_group_count_is_identity(nhw, groups, per_group):
    c = groups * per_group
    x = jnp.arange(np.prod(nhw) * c, dtype=jnp.float32).reshape(*nhw, c)
    np.testing.assert_array_equal(channel_shuffle(channel_shuffle(x, groups), per_group), x)


def test_channel_shuffle_rejects_channels_not_divisible_by_groups():
    with pytest.raises(ValueError, match="7 channels cannot be split into 2"):
        channel_shuffle(jnp.zeros((1, 2, 2, 7)), 2)


def test_channel_shuffle_rejects_non_nhwc_input():
    with pytest.raises(ValueError, match="rank 4"):
        channel_shuffle(jnp.zeros((2, 6)), 2)


def _values_and_grads(fn, x, kernel):
    """fn's output, and the gradients of a non-trivial scalar of it w.r.t. input and kernel."""
    weights = jax.random.normal(jax.random.key(9), jax.eval_shape(fn, x, kernel).shape)
    grads = jax.grad(lambda x, k: jnp.sum(fn(x, k) * weights), argnums=(0, 1))(x, kernel)
    return fn(x, kernel), *grads


def assert_same_values_and_grads(fn, ref, x, kernel):
    for got, want in zip(
        _values_and_grads(fn, x, kernel), _values_and_grads(ref, x, kernel), strict=True
    ):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def numpy_conv(x, kernel, stride, depthwise=False):
    """A k x k convolution (PyTorch's padding k // 2) written out in float64 NumPy: each output
    is the sum over the window's taps (and, unless depthwise, the input channels)."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    k = kernel.shape[0]
    n, h, w, c = x.shape
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    oh, ow = (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1
    out = 0.0
    for i in range(k):
        for j in range(k):
            window = padded[:, i : i + stride * oh : stride, j : j + stride * ow : stride]
            tap = kernel[i, j, 0] if depthwise else kernel[i, j]
            out = out + (window * tap if depthwise else window @ tap)
    return out


@pytest.mark.parametrize("stride", [1, 2])
def test_the_lax_references_compute_the_written_out_convolutions(stride):
    """`lax` is what the other formulations are compared with: it must itself be the
    convolution. Bound: float32 sums of at most 27 products of unit-scale values against
    float64 (about 1e-6)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 7, 6, 6)).astype(np.float32)
    depthwise = rng.standard_normal((3, 3, 1, 6)).astype(np.float32)
    dense = rng.standard_normal((3, 3, 6, 4)).astype(np.float32)
    pointwise = rng.standard_normal((1, 1, 6, 5)).astype(np.float32)
    for got, want in [
        (ops.depthwise_lax(x, depthwise, stride), numpy_conv(x, depthwise, stride, True)),
        (ops.conv_lax(x, dense, stride), numpy_conv(x, dense, stride)),
        (ops.pointwise_lax(x, pointwise), numpy_conv(x, pointwise, 1)),
    ]:
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", sorted(set(variants.DEPTHWISE) - {"lax"}))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (8, 8)])
def test_depthwise_implementations_match_lax_conv_and_its_gradients(impl, stride, hw):
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, *hw, 6))
    kernel = jax.random.normal(kk, (3, 3, 1, 6))
    assert_same_values_and_grads(
        lambda x, k: variants.DEPTHWISE[impl](x, k, stride),
        lambda x, k: ops.depthwise_lax(x, k, stride),
        x,
        kernel,
    )


@pytest.mark.parametrize("impl", sorted(set(variants.DENSE) - {"lax"}))
@pytest.mark.parametrize("hw", [(1, 1), (7, 6)])
def test_dense_implementations_match_lax_conv_and_its_gradients(impl, hw):
    kx, kk = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (2, *hw, 3))
    kernel = jax.random.normal(kk, (3, 3, 3, 8))
    assert_same_values_and_grads(
        lambda x, k: variants.DENSE[impl](x, k, 2), lambda x, k: ops.conv_lax(x, k, 2), x, kernel
    )


@pytest.mark.parametrize("impl", sorted(set(variants.POINTWISE) - {"lax"}))
def test_pointwise_implementations_match_lax_conv_and_its_gradients(impl):
    kx, kk = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (2, 5, 3, 12))
    kernel = jax.random.normal(kk, (1, 1, 12, 10))
    assert_same_values_and_grads(variants.POINTWISE[impl], ops.pointwise_lax, x, kernel)


@pytest.mark.torch
def test_max_pool_gradient_goes_to_the_first_maximum_like_torch():
    import torch

    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, (2, 9, 8, 3)).astype(np.float32)  # small integers: many ties
    g = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    _, vjp = jax.vjp(ops.max_pool_3x3_s2, jnp.asarray(x))
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    torch.nn.functional.max_pool2d(xt, 3, 2, 1).backward(
        torch.from_numpy(g.transpose(0, 3, 1, 2).copy())
    )
    np.testing.assert_array_equal(vjp(jnp.asarray(g))[0], xt.grad.numpy().transpose(0, 2, 3, 1))


@pytest.mark.torch
def test_max_pool_matches_torch():
    import torch

    x = np.random.default_rng(0).standard_normal((2, 7, 6, 3)).astype(np.float32) - 3.0
    ref = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 3, 2, 1)
    np.testing.assert_array_equal(
        ops.max_pool_3x3_s2(jnp.asarray(x)), ref.permute(0, 2, 3, 1).numpy()
    )


def _batch_norm_formula(x, scale, bias, eps):
    """Training-mode BatchNorm written out, differentiated by autodiff: the reference."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(axis=(0, 1, 2))
    var = jnp.square(xf - mean).mean(axis=(0, 1, 2))
    y = (xf - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    return y.astype(x.dtype), mean, var


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 2e-5), (jnp.float64, 1e-12)])
def test_batch_norm_train_gradients_match_autodiff_of_the_formula(dtype, rtol):
    with jax.enable_x64(dtype == jnp.float64):
        keys = jax.random.split(jax.random.key(4), 6)
        x = (jax.random.normal(keys[0], (3, 5, 4, 7)) * 3 + 2).astype(dtype)
        scale = jax.random.normal(keys[1], (7,), dtype)
        bias = jax.random.normal(keys[2], (7,), dtype)
        # cotangents on all three outputs: y, and the mean and variance
        shapes = [x.shape, (7,), (7,)]
        weights = [jax.random.normal(k, s, dtype) for k, s in zip(keys[3:], shapes, strict=True)]

        def loss(fn, *args):
            return sum(jnp.sum(o * w) for o, w in zip(fn(*args, 1e-5), weights, strict=True))

        cpp = functools.partial(ops.batch_norm_train, kernels="cpp")
        got = jax.grad(lambda *a: loss(cpp, *a), argnums=(0, 1, 2))(x, scale, bias)
        want = jax.grad(lambda *a: loss(_batch_norm_formula, *a), argnums=(0, 1, 2))(x, scale, bias)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype == dtype
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())
        outputs = ops.batch_norm_train(x, scale, bias, 1e-5, "cpp")
        for o, r in zip(outputs, _batch_norm_formula(x, scale, bias, 1e-5), strict=True):
            np.testing.assert_allclose(o, r, rtol=rtol, atol=rtol)


class TestEveryFormulationComputesTheConvolutionJittedOrRunOpByOp(chex.TestCase):
    """chex's variants run each formulation of the dense, depthwise and 1x1 convolution jitted
    and op by op (where `lax.platform_dependent` picks C++ or XLA per call) against the
    float64 convolution written out. Bound as for the lax references: float32 sums of at most
    27 products of unit-scale values (about 1e-6 of 1e-5)."""

    def _check(self, fn, x, weight, want):
        got = self.variant(fn)(x, weight)
        assert got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(
        op=[("depthwise", name) for name in sorted(variants.DEPTHWISE)]
        + [("dense", name) for name in sorted(variants.DENSE)],
        stride=[1, 2],
    )
    def test_depthwise_and_dense(self, op, stride):
        kind, name = op
        rng = np.random.default_rng(6)
        x = rng.standard_normal((2, 7, 6, 6 if kind == "depthwise" else 3)).astype(np.float32)
        shape = (3, 3, 1, 6) if kind == "depthwise" else (3, 3, 3, 8)
        w = rng.standard_normal(shape).astype(np.float32)
        fn = functools.partial(variants.CATALOGS[kind][name], stride=stride)
        self._check(fn, x, w, numpy_conv(x, w, stride, kind == "depthwise"))

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*sorted(variants.POINTWISE))
    def test_pointwise(self, name):
        rng = np.random.default_rng(8)
        x = rng.standard_normal((2, 5, 4, 6)).astype(np.float32)
        w = rng.standard_normal((1, 1, 6, 5)).astype(np.float32)
        self._check(variants.POINTWISE[name], x, w, numpy_conv(x, w, 1))
