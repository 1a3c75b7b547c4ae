import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lab import variants
from shufflenet_jax import ShuffleNetV2, ShuffleUnit, shufflenet_v2_x0_5, shufflenet_v2_x2_0
from shufflenet_jax.model.network import abstract_model, with_values
from shufflenet_jax.model.summary import param_count
from tests.helpers import FLOAT64_STEP_REL, random_values

TORCHVISION_PARAMS = {0.5: 1_366_792, 1.0: 2_278_604, 1.5: 3_503_624, 2.0: 7_393_996}


def output_shape(model, shape):
    model = nnx.clone(model)
    model.eval()
    return nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct(shape, jnp.float32)).shape


@pytest.fixture(scope="module")
def model():
    return shufflenet_v2_x0_5(num_classes=10, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("width", sorted(TORCHVISION_PARAMS))
def test_parameter_count_equals_torchvision(width):
    assert param_count(abstract_model(width)) == TORCHVISION_PARAMS[width]


@pytest.mark.parametrize("width", ["0.5", "1.0x", 1.5, 2])
def test_width_accepts_names_and_numbers(width):
    assert abstract_model(width).width == float(str(width).removesuffix("x"))


def test_named_constructor_builds_the_named_width():
    m = nnx.eval_shape(lambda: shufflenet_v2_x2_0(num_classes=7, rngs=nnx.Rngs(0)))
    assert (m.width, m.num_classes, m.fc.kernel.shape) == (2.0, 7, (2048, 7))


@pytest.mark.parametrize("width", sorted(TORCHVISION_PARAMS))
@pytest.mark.parametrize("hw", [(224, 224), (32, 32), (1, 1), (193, 257)])
def test_output_shape_for_any_input_size(width, hw):
    assert output_shape(abstract_model(width, 17), (2, *hw, 3)) == (2, 17)


def test_stage_shapes_follow_the_paper_at_224():
    m = nnx.clone(abstract_model(1.0))
    m.eval()
    stages = nnx.eval_shape(
        lambda m, x: m.stages(x), m, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    )
    shapes = {k: v.shape for k, v in stages.items()}
    assert shapes == {
        "conv1": (1, 112, 112, 24),
        "maxpool": (1, 56, 56, 24),
        "stage2": (1, 28, 28, 116),
        "stage3": (1, 14, 14, 232),
        "stage4": (1, 7, 7, 464),
        "conv5": (1, 7, 7, 1024),
        "fc": (1, 1000),
    }


def test_module_paths_mirror_torchvision_names():
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract_model(1.0)))}
    for expected in [
        "conv1.layers.0.kernel",
        "conv1.layers.1.mean",
        "stage2.layers.0.branch1.layers.0.kernel",
        "stage2.layers.0.branch1.layers.3.var",
        "stage3.layers.7.branch2.layers.5.kernel",
        "stage4.layers.3.branch2.layers.6.scale",
        "conv5.layers.0.kernel",
        "conv5.layers.1.bias",
        "fc.kernel",
        "fc.bias",
    ]:
        assert expected in paths
    assert not any(p.startswith("stage2.layers.1.branch1") for p in paths)


def batch_stats(model):
    """A copy of the BatchNorm running statistics (nnx.state shares the live buffers)."""
    return jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))


def test_train_mode_updates_batchnorm_statistics_and_eval_mode_does_not(model):
    m = nnx.clone(model)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    before = batch_stats(m)
    m.eval()
    nnx.jit(lambda m, x: m(x))(m, x)
    after_eval = batch_stats(m)
    chex.assert_trees_all_equal(before, after_eval)
    m.train()
    nnx.jit(lambda m, x: m(x))(m, x)
    after_train = batch_stats(m)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before, after_train))
    n_batchnorms = 1 + 3 * 5 + 13 * 3 + 1  # conv1, first units, other units, conv5
    assert len(changed) == 2 * n_batchnorms and all(changed)


def test_eval_output_uses_running_statistics(model):
    """In eval mode the output does not depend on the other images in the batch."""
    m = nnx.clone(model)
    m.eval()
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    f = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(f(m, x)[:1], f(m, x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_jit_and_eager_agree(model, mode):
    m = nnx.clone(model)
    getattr(m, mode)()
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    eager_model, jit_model = nnx.clone(m), nnx.clone(m)
    eager = eager_model(x)
    jitted = nnx.jit(lambda m, x: m(x))(jit_model, x)
    np.testing.assert_allclose(jitted, eager, rtol=1e-4, atol=1e-5)

    # Fused and op-by-op float32 arithmetic round differently, and BatchNorm over a batch of two
    # 1x1 late-stage maps amplifies that: each statistic to 1e-4 of its tensor's scale (>= 1e-6).
    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-6, 1e-4 * np.abs(b).max()))

    jax.tree.map(
        close,
        batch_stats(eager_model),
        batch_stats(jit_model),
    )


REFERENCE_IMPLS = dict(impl=variants.named_impl(dense="lax", depthwise="lax", pointwise="lax"))


@pytest.mark.parametrize("width", sorted(TORCHVISION_PARAMS))
def test_default_implementations_compute_the_reference_network_in_eval_mode(width):
    values = random_values(abstract_model(width, 10), seed=0)
    fast = with_values(abstract_model(width, 10), values)
    ref = with_values(abstract_model(width, 10, **REFERENCE_IMPLS), values)
    x = jax.random.normal(jax.random.key(3), (2, 48, 40, 3))
    f = nnx.jit(lambda m, x: m.stages(x))
    fast.eval()
    ref.eval()
    got = f(fast, x)
    for name, want in f(ref, x).items():  # random statistics let activations grow: scale the bound
        err = float(jnp.max(jnp.abs(got[name] - want)))
        assert err <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(want)))), (name, err)


def test_a_stage_whose_batchnorms_differ_in_eps_runs_through_xla_with_each_eps():
    """The fused C++ call takes one eps per call: a stage mixing epsilons must still compute
    each BatchNorm with its own (through XLA's layers), not fail or use another's."""
    values = random_values(abstract_model(0.5, 10), seed=0)
    fast = with_values(abstract_model(0.5, 10), values)
    ref = with_values(abstract_model(0.5, 10, **REFERENCE_IMPLS), values)
    for m in (fast, ref):
        m.stage3.layers[1].branch2.layers[1].epsilon = 0.5  # large enough to matter
        m.eval()
    x = jax.random.normal(jax.random.key(4), (2, 48, 40, 3))
    f = nnx.jit(lambda m, x: m.stages(x))
    got, want = f(fast, x), f(ref, x)
    for name in ("stage3", "fc"):  # bound as in the eval-mode comparison above
        err = float(jnp.max(jnp.abs(got[name] - want[name])))
        assert err <= 1e-4 * max(1.0, float(jnp.max(jnp.abs(want[name])))), (name, err)
    hlo = jax.jit(lambda x: nnx.merge(*nnx.split(fast))(x)).lower(x).as_text()
    assert hlo.count("shufflenet_stage") == 2  # stages 2 and 4 still fused


def test_default_implementations_give_the_reference_outputs_and_gradients_in_train_mode():
    """Compared in float64: float32 train-mode gradients of a random ShuffleNet are too
    ill-conditioned to tell implementations apart (benchmarks/float32_conditioning.py)."""
    values = jax.tree.map(lambda a: a.astype(np.float64), random_values(abstract_model(0.5), 1))
    x = np.random.default_rng(3).standard_normal((4, 64, 64, 3))

    @nnx.jit
    def loss_and_grads(model, x):
        model.train()
        return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)

    with jax.enable_x64(True):
        fast = with_values(abstract_model(0.5), values)
        ref = with_values(abstract_model(0.5, **REFERENCE_IMPLS), values)
        (loss, grads), (ref_loss, ref_grads) = loss_and_grads(fast, x), loss_and_grads(ref, x)
    assert loss.dtype == np.float64
    np.testing.assert_allclose(loss, ref_loss, rtol=FLOAT64_STEP_REL, atol=0)
    ref_flat = dict(nnx.to_flat_state(ref_grads))
    for path, g in nnx.to_flat_state(grads):
        want = np.asarray(ref_flat[path][...])
        err = np.max(np.abs(np.asarray(g[...]) - want))
        # + 1e-12: the biases whose gradient is zero in exact arithmetic (a BatchNorm's bias
        # before a 1x1 conv and a train-mode BatchNorm) hold float64 noise on both sides
        assert err <= FLOAT64_STEP_REL * np.max(np.abs(want)) + 1e-12, (path, err)


def test_unknown_width_is_rejected():
    with pytest.raises(
        ValueError, match=r"unknown ShuffleNet V2 width 0.75; valid widths are 0.5, 1.0"
    ):
        ShuffleNetV2(0.75, rngs=nnx.Rngs(0))


def test_stride_other_than_one_or_two_is_rejected():
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        ShuffleUnit(24, 48, 3, rngs=nnx.Rngs(0))


def test_odd_output_channels_are_rejected():
    with pytest.raises(ValueError, match="output channels must be even.*got 25"):
        ShuffleUnit(24, 25, 2, rngs=nnx.Rngs(0))


def test_stride_one_unit_must_keep_channel_count():
    with pytest.raises(ValueError, match="in_channels=24 != out_channels=48"):
        ShuffleUnit(24, 48, 1, rngs=nnx.Rngs(0))


def test_unknown_implementation_names_are_rejected():
    with pytest.raises(ValueError, match="unknown depthwise implementation 'fast'"):
        variants.named_impl(depthwise="fast")
    with pytest.raises(ValueError, match="unknown fused implementation 'fusedd'"):
        variants.parse("fused:fusedd")
    with pytest.raises(ValueError, match="unknown op 'stem'"):
        variants.named_impl(stem="lax")


@pytest.mark.parametrize("shape", [(32, 32, 3), (1, 32, 32, 1), (1, 3, 32, 32), (1, 1, 32, 32, 3)])
def test_input_must_be_rank4_nhwc_rgb(model, shape):
    with pytest.raises(
        ValueError, match=r"expects NHWC RGB input of shape \(batch, height, width, 3\)"
    ):
        model(jnp.zeros(shape))


def test_input_must_be_floating_point_and_the_error_names_what_it_got(model):
    with pytest.raises(ValueError, match=r"floating; got int32\[1, 32, 32, 3\]$"):
        model(jnp.zeros((1, 32, 32, 3), jnp.int32))


def test_the_configs_kernel_family_reaches_every_layer_and_a_bad_one_is_an_error():
    """`config.model.kernels` is the program's one choice: `model_kwargs` gives the model an
    `Impl` of that family, which every layer keeps (an "xla" model traces no C++ call in
    training or inference, whatever the process loaded); an unknown family names the known."""
    from configs import digits
    from shufflenet_jax import kernels
    from shufflenet_jax.model.config import model_kwargs

    kernels.load()
    config = digits.get_config()
    config.model.kernels = "xla"
    model = ShuffleNetV2(**model_kwargs(config), rngs=nnx.Rngs(0))
    families = {m.kernels for _, m in nnx.iter_graph(model) if hasattr(m, "kernels")}
    assert families == {"xla"}
    x = jnp.zeros((2, 32, 32, 3))
    train = str(jax.make_jaxpr(nnx.grad(lambda m: m(x).sum()))(model))
    model.eval()
    assert "shufflenet_" not in train + str(jax.make_jaxpr(model)(x))
    config.model.kernels = "cuda"
    with pytest.raises(ValueError, match="unknown kernel family 'cuda'; choose one of xla, cpp"):
        model_kwargs(config)
