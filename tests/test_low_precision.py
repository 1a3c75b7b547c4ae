"""bfloat16 compute: every op's gradients against float64 gradients of the same rounded values.

Inputs, weights and output cotangents are rounded to bfloat16 once; the float64 reference then
sees exactly those values (lab.precision), so the only differences are the op's own
bfloat16 arithmetic. An op
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

from lab import variants
from lab.precision import OP_CASES, op_errors, relative_error, rounded_normal
from shufflenet_jax import ops
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.network import ShuffleNetV2, with_values

BF16_BOUND = 1e-2


@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_op_bf16_output_and_gradients_match_float64(name):
    """Every implementation of every op: convolutions (depthwise, stem, 1x1), BatchNorm in
    training and eval mode, max-pool, global average pool with the classifier."""
    errors = op_errors(name, jnp.bfloat16)
    assert max(errors.values()) < BF16_BOUND, errors


def test_op_cases_cover_every_implementation():
    for kind, impls in (
        ("depthwise", variants.DEPTHWISE),
        ("stem", variants.DENSE),
        ("pointwise", variants.POINTWISE),
    ):
        for impl in impls:
            assert any(name.startswith(f"{kind}_{impl}_") for name in OP_CASES), (kind, impl)


def _network_grads(model, images, cotangent, dtype):
    """Logits and parameter gradients of sum(logits * cotangent) for the eval-mode network
    with parameters and images cast to dtype, as training casts them (BatchNorm statistics in
    float32, or float64 for float64)."""
    graphdef, params, stats = split_model(model)
    stats = jax.tree.map(lambda s: s.astype(ops.accumulation_dtype(dtype)), stats)

    def loss(params, stats, images, cotangent):
        compute = jax.tree.map(lambda p: p.astype(dtype), params)
        net = nnx.merge(graphdef, compute, stats)
        net.eval()
        logits = net(images.astype(dtype))
        return jnp.sum(logits * cotangent.astype(logits.dtype))

    grads = jax.jit(jax.grad(loss))(params, stats, jnp.asarray(images), jnp.asarray(cotangent))
    return nnx.to_pure_dict(grads)


def _perturbed(values, scale, seed):
    """values times (1 + scale * standard normal noise), elementwise, in float64."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda v: np.asarray(v, np.float64) * (1 + scale * rng.standard_normal(np.shape(v))), values
    )


@pytest.mark.deep_numerics
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
    images = rounded_normal(8, (8, 64, 64, 3))
    cotangent = rounded_normal(9, (8, 10))
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
