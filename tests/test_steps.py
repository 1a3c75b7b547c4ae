import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shufflenet_jax import ops
from shufflenet_jax.compiler_options import eval_compiler_options, train_compiler_options
from shufflenet_jax.model.folded import fold_batchnorm
from shufflenet_jax.model.inference import make_predict, predictor, split_model
from shufflenet_jax.model.layers import BatchNorm, Bias, Impl
from shufflenet_jax.model.network import (
    ShuffleUnit,
    abstract_model,
    shufflenet_v2_x0_5,
    with_values,
)
from shufflenet_jax.train.state import TrainState
from shufflenet_jax.train.step import make_train_step
from tests.helpers import random_values


@pytest.fixture(scope="module")
def model():
    return with_values(abstract_model(0.5, 10), random_values(abstract_model(0.5, 10), seed=5))


def test_predict_equals_the_model_in_eval_mode(model):
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    m = nnx.clone(model)
    m.eval()
    want = nnx.jit(lambda m, x: m(x))(m, x)
    np.testing.assert_allclose(
        make_predict(split_model(model)[0], {})(*split_model(model)[1:], x),  # as nnx.jit compiles
        want,
        rtol=1e-5,
        atol=1e-5,
    )


def test_readmes_predictor_is_make_predict_with_the_weights_of_its_making(model):
    """The same compiled function on the same weights (so the same numbers, exactly), whatever
    mode the model is in; later changes to the model do not reach it."""
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    m = nnx.clone(model)
    m.train()
    predict = predictor(m)
    want = make_predict(split_model(model)[0])(*split_model(model)[1:], x)
    np.testing.assert_array_equal(predict(x), want)
    m.fc.bias[...] += 1.0
    np.testing.assert_array_equal(predict(x), want)


def test_train_step_lowers_the_loss_and_updates_batch_statistics():
    """30 SGD steps memorise 8 random images. The path there is chaotic (train-mode BatchNorm
    on 8 images; after 10 steps at lr 0.1 one CPU ended at 0.08 and another at 0.64 of the
    first loss, and each implementation choice elsewhere), but where it ends is not: at lr 0.05
    every init seed 0-3 and both the default and the lax implementations ended near 0.006 from
    2.4, so a tenth of the first loss leaves a wide margin."""
    graphdef, params, stats = split_model(shufflenet_v2_x0_5(num_classes=10, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.05)
    step = make_train_step(graphdef, tx)
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 32, 32, 3)), "label": jnp.arange(8)}
    stats0 = jax.tree.map(np.array, stats)
    state = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), None)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses
    assert int(state.step) == 30
    moved = jax.tree.leaves(
        jax.tree.map(lambda a, b: bool(np.any(a != b)), stats0, state.batch_stats)
    )
    assert all(moved)


def test_folded_batchnorm_leaves_eval_outputs_unchanged(model):
    m = nnx.clone(model)
    m.eval()
    folded = fold_batchnorm(m)
    assert isinstance(folded.stage2.layers[0].branch2.layers[4], Bias)
    assert isinstance(m.stage2.layers[0].branch2.layers[4], BatchNorm)  # the original is intact
    assert not any(isinstance(x, BatchNorm) for _, x in nnx.iter_modules(folded))
    x = jax.random.normal(jax.random.key(2), (2, 40, 48, 3))
    f = nnx.jit(lambda m, x: m.stages(x))
    got, want = f(folded, x), f(m, x)
    for name in want:
        err = float(jnp.max(jnp.abs(got[name] - want[name])))
        assert err <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(want[name])))), (name, err)


def test_training_compiler_options_leave_gradients_unchanged():
    assert train_compiler_options("cpu") and train_compiler_options("gpu") == {}
    unit = ShuffleUnit(24, 58, 2, rngs=nnx.Rngs(0))
    unit.train()
    graphdef, params, rest = nnx.split(unit, nnx.Param, ...)
    x = jax.random.normal(jax.random.key(3), (4, 16, 16, 24))
    g = jax.random.normal(jax.random.key(4), (4, 4, 4, 58))

    def loss(params, x):  # max-pool, BatchNorm in train mode, stride-2 depthwise: their gradients
        model = nnx.merge(graphdef, params, rest, copy=True)
        return jnp.sum(model(ops.max_pool_3x3_s2(x)) * g)

    grad = jax.grad(loss, argnums=(0, 1))
    want = jax.jit(grad)(params, x)
    got = jax.jit(grad, compiler_options=train_compiler_options("cpu"))(params, x)
    # float32 rounding of sums reordered by another emitter, relative to the gradient's scale
    # (some parameters before a train-mode BatchNorm have a true gradient of exactly zero)
    for got_tree, want_tree in zip(got, want, strict=True):
        scale = max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(want_tree))
        for a, b in zip(jax.tree.leaves(got_tree), jax.tree.leaves(want_tree), strict=True):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale


def test_eval_compiler_options_leave_logits_unchanged(model):
    """On XLA's layers (the C++ stage kernels leave XLA almost no matmuls to place)."""
    assert eval_compiler_options("cpu") and eval_compiler_options("gpu") == {}
    layers = with_values(
        abstract_model(0.5, 10, impl=Impl(fused_inference=False)),
        nnx.to_pure_dict(nnx.state(model)),
    )
    graphdef, params, stats = split_model(layers)
    x = jax.random.normal(jax.random.key(5), (8, 64, 64, 3))
    default, tuned = (
        make_predict(graphdef, {}),
        make_predict(graphdef, eval_compiler_options("cpu")),
    )
    want, got = default(params, stats, x), tuned(params, stats, x)
    # the 1x1 convolutions' matmuls leave YNNPACK (the reductions stay)
    ynn_calls = [
        f.lower(params, stats, x).compile().as_text().count("__ynn_fusion")
        for f in (default, tuned)
    ]
    assert ynn_calls[1] < ynn_calls[0], ynn_calls
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: {"image": b["image"]}, r"the batch has no label \(it has image\)"),
        (lambda b: {**b, "label": b["label"][:3]}, r"batch\['label'\] must be one int .*\[3\]"),
        (lambda b: {**b, "label": b["label"] * 1.0}, r"batch\['label'\] .*float32\[4\]"),
        (lambda b: {**b, "image": b["image"][..., :1]}, r"NHWC RGB; got float32\[4, 8, 8, 1\]"),
    ],
    ids=["missing", "short", "float_labels", "gray"],
)
def test_a_train_step_names_what_is_wrong_with_a_batch_in_one_error(change, message):
    graphdef, params, stats = split_model(shufflenet_v2_x0_5(num_classes=10, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.05)
    state = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), None)
    batch = {"image": jnp.zeros((4, 8, 8, 3)), "label": jnp.arange(4)}
    with pytest.raises(ValueError, match=message):
        make_train_step(graphdef, tx)(state, change(batch))
