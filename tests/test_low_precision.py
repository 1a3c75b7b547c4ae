"""bfloat16 compute: every op's gradients against float64 gradients of the same rounded values.

Inputs, weights and output cotangents are rounded to bfloat16 once; the float64 reference then
sees exactly those values, so the only differences are the op's own bfloat16 arithmetic. An op
that rounds each output once to bfloat16 (8 significant bits, unit roundoff 2**-8 = 3.9e-3) has
a norm-wise relative error of at most about 3.9e-3, whatever the length of its sums, provided it
accumulates them in float32; accumulating a sum of n terms in bfloat16 instead gives errors that
grow with n (0.14-0.78 for the depthwise kernel gradient at the network's shapes). The bound
1e-2 allows 2.5 roundings (an output rounded, plus the rounding of an intermediate such as the
patches of im2col or BatchNorm's normalized input) and fails for any bfloat16 accumulation.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from shufflenet_jax import ops
from shufflenet_jax.layers import BatchNorm
from shufflenet_jax.models import ShuffleNetV2, with_values

BF16_BOUND = 1e-2


def _rounded(key, shape, scale=1.0):
    """A random float64 array whose values are exactly representable in bfloat16."""
    x = scale * jax.random.normal(key, shape, jnp.float32)
    return np.asarray(x.astype(jnp.bfloat16), np.float64)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _grads(fn, args, cotangent, dtype):
    """fn(*args) and its vector-Jacobian product with `cotangent`, everything cast to dtype."""
    cast = [jnp.asarray(a, dtype) for a in args]
    out, pullback = jax.vjp(fn, *cast)
    return out, *pullback(jnp.asarray(cotangent, out.dtype))


def assert_bf16_grads_close(fn, reference, args, seed=0):
    """fn in bfloat16 against reference in float64 on the same rounded args and cotangent:
    the output and every gradient within BF16_BOUND, norm-wise."""
    out_shape = jax.eval_shape(fn, *[jnp.asarray(a, jnp.float32) for a in args]).shape
    cotangent = _rounded(jax.random.key(seed + 100), out_shape)
    got = _grads(fn, args, cotangent, jnp.bfloat16)
    with jax.enable_x64(True):
        want = [np.asarray(a) for a in _grads(reference, args, cotangent, jnp.float64)]
    names = ["output"] + [f"gradient of argument {i}" for i in range(len(args))]
    errors = {n: relative_error(g, w) for n, g, w in zip(names, got, want, strict=True)}
    assert max(errors.values()) < BF16_BOUND, errors


# (N, H, W, C, stride) of the network's depthwise convolutions: stage 2's stride-1 units at
# 1.0x (28x28x58) and stage 2's first unit's branch 1 at 0.5x (56x56x24, stride 2).
DEPTHWISE_SHAPES = [(8, 28, 28, 58, 1), (8, 56, 56, 24, 2)]


@pytest.mark.parametrize("impl", sorted(ops.DEPTHWISE_IMPLS))
@pytest.mark.parametrize("shape", DEPTHWISE_SHAPES, ids=str)
def test_depthwise_bf16_gradients_match_float64(impl, shape):
    n, h, w, c, stride = shape
    kx, kk = jax.random.split(jax.random.key(1))
    args = _rounded(kx, (n, h, w, c)), _rounded(kk, (3, 3, 1, c), 1 / 3)
    assert_bf16_grads_close(
        lambda x, k: ops.DEPTHWISE_IMPLS[impl](x, k, stride),
        lambda x, k: ops.depthwise_lax(x, k, stride),
        args,
    )


@pytest.mark.parametrize("impl", sorted(ops.DENSE_IMPLS))
def test_stem_conv_bf16_gradients_match_float64(impl):
    kx, kk = jax.random.split(jax.random.key(2))
    args = _rounded(kx, (4, 224, 224, 3)), _rounded(kk, (3, 3, 3, 24), 1 / 5)
    assert_bf16_grads_close(
        lambda x, k: ops.DENSE_IMPLS[impl](x, k, 2), lambda x, k: ops.conv_lax(x, k, 2), args
    )


@pytest.mark.parametrize("impl", sorted(ops.POINTWISE_IMPLS))
@pytest.mark.parametrize("shape", [(8, 28, 28, 116, 58), (8, 7, 7, 464, 1024)], ids=str)
def test_pointwise_bf16_gradients_match_float64(impl, shape):
    n, h, w, cin, cout = shape
    kx, kk = jax.random.split(jax.random.key(3))
    args = _rounded(kx, (n, h, w, cin)), _rounded(kk, (1, 1, cin, cout), cin**-0.5)
    assert_bf16_grads_close(
        lambda x, k: ops.POINTWISE_IMPLS[impl](x, k), lambda x, k: ops.pointwise_lax(x, k), args
    )


@pytest.mark.parametrize("shape", [(8, 112, 112, 24), (8, 28, 28, 58)], ids=str)
def test_batch_norm_train_bf16_gradients_match_float64(shape):
    kx, ks, kb = jax.random.split(jax.random.key(4), 3)
    c = shape[-1]
    args = _rounded(kx, shape, 2.0) + 1.0, _rounded(ks, (c,)), _rounded(kb, (c,))

    def fn(x, scale, bias):
        return ops.batch_norm_train(x, scale, bias, 1e-5)[0]

    assert_bf16_grads_close(fn, fn, args)


def test_batch_norm_eval_bf16_gradients_match_float64():
    kx, ks, kb = jax.random.split(jax.random.key(5), 3)
    args = _rounded(kx, (8, 28, 28, 58)), _rounded(ks, (58,)), _rounded(kb, (58,))

    def fn(x, scale, bias):
        bn = BatchNorm(58, use_running_average=True)
        bn.mean, bn.var = nnx.BatchStat(jnp.full(58, 0.25)), nnx.BatchStat(jnp.full(58, 2.0))
        bn.scale, bn.bias = nnx.Param(scale), nnx.Param(bias)
        return bn(x)

    assert_bf16_grads_close(fn, fn, args)


def test_max_pool_bf16_gradients_match_float64():
    args = (_rounded(jax.random.key(6), (8, 112, 112, 24)),)
    assert_bf16_grads_close(ops.max_pool_3x3_s2, ops.max_pool_3x3_s2, args)


def test_global_average_pool_and_classifier_bf16_gradients_match_float64():
    """The network's head: mean over 7x7, then the fully connected layer."""
    kx, kw = jax.random.split(jax.random.key(7))
    args = _rounded(kx, (64, 7, 7, 1024)), _rounded(kw, (1024, 1000), 1 / 32)

    def head(x, kernel):
        fc = nnx.Linear(1024, 1000, rngs=nnx.Rngs(0))
        fc.kernel, fc.bias = nnx.Param(kernel), nnx.Param(jnp.zeros(1000, kernel.dtype))
        return fc(ops.global_average_pool(x))

    assert_bf16_grads_close(head, head, args)


def _network_grads(model, images, cotangent, dtype):
    """Logits and parameter gradients of sum(logits * cotangent) for the eval-mode network
    with parameters and images cast to dtype, as training casts them (BatchNorm statistics in
    float32, or float64 for float64)."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    stats = jax.tree.map(lambda s: s.astype(ops.accumulation_dtype(dtype)), stats)

    def loss(params):
        compute = jax.tree.map(lambda p: p.astype(dtype), params)
        net = nnx.merge(graphdef, compute, stats)
        net.eval()
        logits = net(jnp.asarray(images, dtype))
        return jnp.sum(logits * jnp.asarray(cotangent, logits.dtype))

    return nnx.to_pure_dict(jax.grad(loss)(params))


def _perturbed(values, scale, seed):
    """values times (1 + scale * standard normal noise), elementwise, in float64."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda v: np.asarray(v, np.float64) * (1 + scale * rng.standard_normal(np.shape(v))), values
    )


def test_eval_mode_network_bf16_gradients_match_float64():
    """Frozen BatchNorm (fine-tuning): bfloat16 compute moves each parameter gradient of the
    initialised 0.5x network no further from float64 than rounding its inputs would.

    Per tensor, the gradients are not well conditioned even in float64: perturbing the weights
    and images by half a bfloat16 spacing (relative 2**-9) moves some tensors' gradients by 30%
    (ReLU kinks, cancelling sums over the batch). So each tensor's bfloat16 error is bounded by
    4x that float64 sensitivity plus BF16_BOUND: every layer rounds its output once, which
    perturbs like the inputs' rounding at each of the ~25 layers in sequence, measured at most
    2.1x the sensitivity; the whole gradient vector's error by 2x its sensitivity (measured
    0.65x). A bfloat16 accumulation over the batch and the image shows in the operator tests
    above, where the conditioning is known."""
    abstract = nnx.eval_shape(lambda: ShuffleNetV2(0.5, 10, rngs=nnx.Rngs(0)))
    init = nnx.to_pure_dict(nnx.state(ShuffleNetV2(0.5, 10, rngs=nnx.Rngs(0))))
    values = jax.tree.map(lambda v: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32), init)
    images = _rounded(jax.random.key(8), (8, 64, 64, 3))
    cotangent = _rounded(jax.random.key(9), (8, 10))
    got = _network_grads(with_values(abstract, values), images, cotangent, jnp.bfloat16)
    with jax.enable_x64(True):
        want = _network_grads(with_values(abstract, values), images, cotangent, jnp.float64)
        noisy = with_values(abstract, _perturbed(values, 2**-9, 1))
        moved = _network_grads(noisy, _perturbed(images, 2**-9, 2), cotangent, jnp.float64)

    def leaves(tree):
        return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}

    got, want, moved = leaves(got), leaves(want), leaves(moved)
    for name in want:
        error, sensitivity = (
            relative_error(got[name], want[name]),
            relative_error(moved[name], want[name]),
        )
        assert error < 4 * sensitivity + BF16_BOUND, (name, error, sensitivity)
    flat = [np.concatenate([np.ravel(t[k]) for k in want]) for t in (got, want, moved)]
    assert relative_error(flat[0], flat[1]) < 2 * relative_error(flat[2], flat[1])
