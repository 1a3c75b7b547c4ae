import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from shufflenet_jax.folding import fold_batchnorm
from shufflenet_jax.layers import BatchNorm, Bias
from shufflenet_jax.models import abstract_model, shufflenet_v2_x0_5, with_values
from shufflenet_jax.steps import make_eval_step, make_train_step, split_model
from tests.helpers import random_values


@pytest.fixture(scope="module")
def model():
    return with_values(abstract_model(0.5, 10), random_values(abstract_model(0.5, 10), seed=5))


def test_eval_step_equals_the_model_in_eval_mode(model):
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    m = nnx.clone(model)
    m.eval()
    want = nnx.jit(lambda m, x: m(x))(m, x)
    np.testing.assert_allclose(
        make_eval_step(split_model(model)[0])(*split_model(model)[1:], x),
        want,
        rtol=1e-5,
        atol=1e-5,
    )


def test_train_step_lowers_the_loss_and_updates_batch_statistics():
    graphdef, params, stats = split_model(shufflenet_v2_x0_5(num_classes=10, rngs=nnx.Rngs(0)))
    tx = optax.sgd(0.1)
    step = make_train_step(graphdef, tx)
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    y = jnp.arange(8) % 10
    stats0 = jax.tree.map(np.array, stats)
    opt_state = tx.init(params)
    losses = []
    for _ in range(10):
        params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), stats0, stats))
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
