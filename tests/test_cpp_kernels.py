import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab import variants
from shufflenet_jax import kernels, ops
from shufflenet_jax.kernels import build
from shufflenet_jax.kernels import calls as kernel_calls


def _kernel_grad_float64(x, g, stride):
    """dk[i, j, c] = sum over n, h, w of padded x at (s*h + i, s*w + j) times g, in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    g = np.asarray(g, np.float64)
    ho, wo = g.shape[1:3]
    taps = [
        np.einsum(
            "nhwc,nhwc->c",
            x[:, i : i + stride * (ho - 1) + 1 : stride, j : j + stride * (wo - 1) + 1 : stride],
            g,
        )
        for i in range(3)
        for j in range(3)
    ]
    return np.stack(taps).reshape(3, 3, 1, -1)


def _inputs(n, h, w, c, stride, seed=0):
    kx, kg = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, h, w, c))
    g = jax.random.normal(kg, (n, (h - 1) // stride + 1, (w - 1) // stride + 1, c))
    return x, g


def test_cpp_kernels_build_on_this_machine():
    # CI must run the C++ path: a missing compiler fails here rather than falling back.
    assert kernels.load() and kernels.loaded()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads x86-64 machine code")
def test_the_kernels_are_built_for_the_instruction_set_asked_for():
    """$SHUFFLENET_JAX_MARCH (CI's AVX2 leg sets x86-64-v3 on AVX-512 CPUs) reaches g++: the
    status names the march, and the loaded library's machine code uses 512-bit registers
    exactly where g++ says that march has AVX-512 (a build that ignored the variable would
    hold them on an AVX-512 CPU)."""
    assert kernels.load()
    status = kernels.status()
    assert status.endswith(f" (-march={build.march()})"), status
    library = status.removesuffix(f" (-march={build.march()})")
    disassembly = ["objdump", "-d", library]
    code = subprocess.run(disassembly, capture_output=True, text=True, check=True).stdout
    macros = subprocess.run(
        [os.environ.get("CXX", "g++"), f"-march={build.march()}", "-dM", "-E", "-x", "c++", "-"],
        input="", capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "__AVX2__" in macros and "%ymm" in code  # 8-float vectors on every supported kind
    assert ("%zmm" in code) == ("__AVX512F__" in macros)


@pytest.mark.deep_numerics
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "nhwc", [(1, 1, 1, 1), (3, 5, 8, 7), (2, 6, 9, 12), (2, 8, 7, 19), (9, 14, 14, 116)]
)
def test_cpp_depthwise_kernel_grad_matches_float64_sum(stride, nhwc):
    x, g = _inputs(*nhwc, stride)
    got = jax.jit(kernels.depthwise_weight_grad, static_argnums=2)(x, g, stride)
    want = _kernel_grad_float64(x, g, stride)
    assert got.shape == want.shape
    terms = nhwc[0] * g.shape[1] * g.shape[2]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.sqrt(terms))


def test_cpp_depthwise_kernel_grad_is_deterministic():
    x, g = _inputs(32, 28, 28, 58, 1)
    f = jax.jit(kernels.depthwise_weight_grad, static_argnums=2)
    np.testing.assert_array_equal(f(x, g, 1), f(x, g, 1))


def test_depthwise_cpp_gradient_uses_the_cpu_kernel():
    x, _ = _inputs(2, 8, 8, 6, 1)
    kernel = jnp.ones((3, 3, 1, 6))
    grad = jax.jit(jax.grad(lambda k: ops.depthwise_cpp(x, k, 1).sum()))
    assert "shufflenet_depthwise_kernel_grad" in grad.lower(kernel).as_text()


# 3x3 over 3 channels is the stem's own path (20 outputs padded, 8 and 40 ending in a half
# vector on AVX-512 builds); the others take the general one
@pytest.mark.deep_numerics
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize(
    "shape", [(3, 3, 3, 24), (3, 3, 3, 8), (3, 3, 3, 20), (3, 3, 3, 40), (5, 5, 2, 12)]
)
def test_cpp_dense_kernel_grad_matches_float64_gradient(stride, shape):
    kx, kg = jax.random.split(jax.random.key(6))
    x = jax.random.normal(kx, (5, 15, 14, shape[2]))
    g = jax.random.normal(kg, kernel_calls._conv_output_shape(x.shape, shape, stride))
    got = jax.jit(kernels.dense_weight_grad, static_argnums=(2, 3))(x, g, shape, stride)
    with jax.enable_x64(True):
        x64, g64 = (jnp.asarray(np.asarray(a, np.float64)) for a in (x, g))
        _, pullback = jax.vjp(lambda k: ops.conv_lax(x64, k, stride), jnp.zeros(shape))
        want = np.asarray(pullback(g64)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_conv_cpp_gradient_uses_the_cpu_kernel_instead_of_im2col():
    x = jnp.ones((2, 16, 16, 3))
    kernel = jnp.ones((3, 3, 3, 24))
    step = jax.jit(jax.value_and_grad(lambda k: jnp.sum(ops.conv_cpp(x, k, 2) ** 2)))
    hlo = step.lower(kernel).compile().as_text()
    assert "shufflenet_dense_kernel_grad" in hlo
    assert "concatenate" not in hlo  # im2col's stacked windows are gone


# 8, 24, 40 and 72 outputs end in a half vector on AVX-512 builds (after 0, 1, 2 and 4 whole
# ones), 64 does not
@pytest.mark.deep_numerics
@pytest.mark.parametrize("shape", [(4, 33, 36, 3), (1, 1, 1, 3), (2, 8, 9, 5)])
@pytest.mark.parametrize("outputs", [8, 24, 40, 64, 72])
def test_cpp_stem_conv_matches_lax_conv(shape, outputs):
    kx, kk = jax.random.split(jax.random.key(8))
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (3, 3, shape[-1], outputs))
    got = jax.jit(kernels.stem_conv)(x, kernel)
    want = jax.jit(lambda x, k: ops.conv_lax(x, k, 2))(x, kernel)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_conv_cpp_forward_uses_the_cpu_stem_conv_at_stride_two_only():
    x, kernel = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 24))
    for stride, calls in [(2, 1), (1, 0)]:
        conv = jax.jit(ops.conv_cpp, static_argnums=2)
        hlo = conv.lower(x, kernel, stride).as_text()
        assert hlo.count("shufflenet_stem_conv") == calls, stride


@pytest.mark.parametrize(
    "x_shape, kernel_shape",
    [((1, 8, 8, 3), (3, 3, 4, 24)), ((1, 8, 8, 3), (5, 5, 3, 24)), ((8, 8, 3), (3, 3, 3, 24))],
)
def test_cpp_stem_conv_rejects_mismatched_shapes(x_shape, kernel_shape):
    with pytest.raises(ValueError, match="stem_conv: .* do not match"):
        kernels.stem_conv(jnp.ones(x_shape), jnp.ones(kernel_shape))


@pytest.mark.parametrize(
    "kernel_shape, stride, message",
    [((3, 3, 4, 24), 2, "not NHWC with the weight's 4 channels"), ((3, 3, 3, 65), 2, "1 to 64")],
)
def test_cpp_dense_kernel_grad_rejects_unsupported_shapes(kernel_shape, stride, message):
    x = jnp.zeros((1, 8, 8, 3))
    g = jnp.zeros((1, 4, 4, kernel_shape[3]))
    with pytest.raises(ValueError, match=message):
        kernels.dense_weight_grad(x, g, kernel_shape, stride)


def test_depthwise_cpp_in_float64_falls_back_to_xla_gradient():
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(3), (2, 6, 5, 4), jnp.float64)
        kernel = jax.random.normal(jax.random.key(4), (3, 3, 1, 4), jnp.float64)
        for stride in (1, 2):
            got = jax.grad(lambda k, s=stride: ops.depthwise_cpp(x, k, s).sum())(kernel)
            want = jax.grad(lambda k, s=stride: ops.depthwise_lax(x, k, s).sum())(kernel)
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize(
    "x_shape, g_shape, stride, message",
    [
        ((2, 8, 8, 6), (2, 8, 8, 5), 1, "expected (2, 8, 8, 6)"),
        ((2, 8, 8, 6), (2, 8, 8, 6), 2, "expected (2, 4, 4, 6)"),
        ((2, 8, 8, 6), (2, 3, 3, 6), 3, "stride must be 1 or 2"),
    ],
)
def test_cpp_depthwise_kernel_grad_rejects_mismatched_inputs(x_shape, g_shape, stride, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        kernels.depthwise_weight_grad(jnp.zeros(x_shape), jnp.zeros(g_shape), stride)


def test_cpp_depthwise_kernel_grad_rejects_other_dtypes():
    x = jnp.zeros((1, 4, 4, 2), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs float32"):
        kernels.depthwise_weight_grad(x, x, 1)


def test_build_without_a_compiler_names_the_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setenv("SHUFFLENET_JAX_CACHE", str(tmp_path))
    with pytest.raises(kernels.CppBuildError, match="no-such-compiler"):
        build.build_library("kernels")


@pytest.mark.os_level
def test_build_reuses_the_cached_library(monkeypatch, tmp_path):
    monkeypatch.setenv("SHUFFLENET_JAX_CACHE", str(tmp_path))
    first = build.build_library("kernels")
    stamp = os.stat(first).st_mtime_ns
    assert build.build_library("kernels") == first
    assert os.stat(first).st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_a_changed_shared_header_is_a_new_build(monkeypatch, tmp_path):
    """vec.h is included by the kernels and resample.cc: editing it must not load a library
    built before."""
    monkeypatch.setenv("SHUFFLENET_JAX_CACHE", str(tmp_path / "cache"))
    csrc = build.CSRC
    copy = tmp_path / "csrc"
    copy.mkdir()
    for name in ("resample.cc", "vec.h"):
        (copy / name).write_bytes((csrc / name).read_bytes())
    first = build.build_library("resample", copy)
    with open(copy / "vec.h", "a") as f:
        f.write("// edited\n")
    second = build.build_library("resample", copy)
    assert second != first and first.exists() and second.exists()


def _stem_then_depthwise(kernel, dw_kernel, x):
    return ops.depthwise_cpp(ops.conv_cpp(x, kernel, 2)[..., :3], dw_kernel, 1)


def test_cpp_impls_lower_without_the_cpu_kernels_for_other_backends():
    from jax import export

    args = jnp.ones((3, 3, 3, 24)), jnp.ones((3, 3, 1, 3)), jnp.ones((2, 16, 16, 3))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(_stem_then_depthwise(*a) ** 2), argnums=(0, 1)))
    targets = ("depthwise_kernel_grad", "dense_kernel_grad", "stem_conv")  # FFI names
    checks = [export.DisabledSafetyCheck.custom_call(f"shufflenet_{t}") for t in targets]
    forward = jax.jit(_stem_then_depthwise)
    for platform, calls, forward_calls in [("cpu", 3, 1), ("cuda", 0, 0), ("tpu", 0, 0)]:
        module = export.export(grads, platforms=[platform], disabled_checks=checks)(*args)
        assert module.mlir_module().count("custom_call @shufflenet") == calls, platform
        module = export.export(forward, platforms=[platform], disabled_checks=checks)(*args)
        assert module.mlir_module().count("custom_call @shufflenet") == forward_calls, platform


# Small maps, and the stem's size (many float32 blocks of rows per chunk).
_SUM_SHAPES = [(3, 9, 7, 13), (16, 112, 112, 13)]


@pytest.mark.parametrize("shape", _SUM_SHAPES)
def test_cpp_channel_moments_match_float64_mean_and_variance(shape):
    x = jax.random.normal(jax.random.key(7), shape) * jnp.arange(1, 14)
    x = x + jnp.where(jnp.arange(13) == 5, 1e4, 0.0)  # a channel whose mean dwarfs its spread
    mean, var = jax.jit(kernels.channel_moments)(x)
    x64 = np.asarray(x, np.float64).reshape(-1, 13)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, x64.var(0), rtol=1e-5)


@pytest.mark.parametrize("shape", _SUM_SHAPES)
def test_cpp_batch_norm_grad_sums_match_float64_sums(shape):
    kg, kx = jax.random.split(jax.random.key(8))
    g = jax.random.normal(kg, shape)
    x = jax.random.normal(kx, shape) + 3.0
    mean = x.mean(axis=(0, 1, 2))
    sum_g, sum_gx = jax.jit(kernels.batch_norm_grad_sums)(g, x, mean)
    g64, x64 = (np.asarray(a, np.float64).reshape(-1, 13) for a in (g, x))
    np.testing.assert_allclose(sum_g, g64.sum(0), rtol=1e-5, atol=1e-5)
    want = (g64 * (x64 - np.asarray(mean))).sum(0)
    np.testing.assert_allclose(sum_gx, want, rtol=1e-5, atol=1e-5)


def test_batch_norm_train_uses_the_cpu_sums_forward_and_backward():
    x = jnp.ones((2, 4, 4, 6))
    scale, bias = jnp.ones(6), jnp.zeros(6)
    step = jax.jit(
        jax.grad(lambda x: jnp.sum(ops.batch_norm_train(x, scale, bias, 1e-5, "cpp")[0] ** 2))
    )
    hlo = step.lower(x).as_text()
    assert "shufflenet_channel_moments" in hlo and "shufflenet_batch_norm_grad_sums" in hlo


def test_cpp_batch_norm_grad_sums_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        kernels.batch_norm_grad_sums(jnp.zeros((2, 3, 3, 4)), jnp.zeros((2, 3, 3, 4)), jnp.zeros(5))


def _folded(width, folded_impl, seed=0):
    from shufflenet_jax.model.folded import fold_batchnorm
    from shufflenet_jax.model.network import abstract_model, with_values
    from tests.helpers import random_values

    values = random_values(abstract_model(width, 10), seed)
    model = with_values(
        abstract_model(width, 10, impl=variants.named_impl(fused=folded_impl)), values
    )
    model.eval()
    return fold_batchnorm(model)


# batch 1: each image's rows split into bands; batches 2, 3: every image through the whole stage
@pytest.mark.deep_numerics
@pytest.mark.parametrize(
    "width, shape",
    [(0.5, (1, 64, 48, 3)), (1.0, (3, 40, 40, 3)), (1.5, (2, 35, 33, 3)), (2.0, (1, 33, 35, 3))],
)
def test_folded_cpp_stem_and_stages_compute_the_layers_for_every_width(width, shape):
    from flax import nnx

    x = jax.random.normal(jax.random.key(7), shape)
    stages = jax.jit(
        lambda graphdef, state, x: nnx.merge(graphdef, state).stages(x), static_argnums=0
    )
    out = {}
    for impl in ("fused", "layers"):
        graphdef, state = nnx.split(_folded(width, impl))
        hlo = stages.lower(graphdef, state, x).as_text()
        assert hlo.count("shufflenet_stage") == (3 if impl == "fused" else 0), impl
        assert hlo.count("shufflenet_stem_pool") == (1 if impl == "fused" else 0), impl
        out[impl] = stages(graphdef, state, x)
    for name in ("maxpool", "stage2", "stage3", "stage4", "fc"):
        want, got = np.asarray(out["layers"][name]), np.asarray(out["fused"][name])
        err = np.max(np.abs(got - want))
        assert err <= 1e-5 * max(1.0, np.max(np.abs(want))), (name, err)


def test_eval_mode_models_use_the_stem_and_stage_kernels_and_training_does_not():
    """model.eval() alone takes the fast path (BatchNorm folded inside the step); it computes
    what XLA's layers compute, and training mode never uses the inference kernels."""
    from flax import nnx

    from shufflenet_jax.model.network import ShuffleNetV2, abstract_model, with_values
    from tests.helpers import random_values

    x = jax.random.normal(jax.random.key(3), (2, 40, 36, 3))
    out = {}
    for impl, calls in (("fused", (3, 1)), ("layers", (0, 0))):
        model = with_values(
            abstract_model(0.5, impl=variants.named_impl(fused=impl)),
            random_values(abstract_model(0.5), 4),
        )
        model.eval()
        stages = nnx.jit(lambda m, x: m.stages(x))
        hlo = stages.lower(model, x).as_text()
        assert (hlo.count("shufflenet_stage"), hlo.count("shufflenet_stem_pool")) == calls, impl
        out[impl] = stages(model, x)
    for name in ("maxpool", "stage2", "stage3", "stage4", "fc"):
        want, got = np.asarray(out["layers"][name]), np.asarray(out["fused"][name])
        err = np.max(np.abs(got - want))
        assert err <= 1e-5 * max(1.0, np.max(np.abs(want))), (name, err)
    model = ShuffleNetV2(0.5, rngs=nnx.Rngs(0))
    model.train()
    hlo = nnx.jit(lambda m, x: m(x)).lower(model, x).as_text()
    assert "shufflenet_stage" not in hlo and "shufflenet_stem_pool" not in hlo


def test_folded_stem_and_stages_lower_without_the_cpu_kernels_for_other_backends():
    from flax import nnx
    from jax import export

    graphdef, state = nnx.split(_folded(0.5, "fused"))
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    names = ("shufflenet_stage", "shufflenet_stem_pool", "shufflenet_stem_conv")
    check = [export.DisabledSafetyCheck.custom_call(name) for name in names]
    args = state, jnp.ones((2, 32, 32, 3))
    for platform, stages, stems in [("cpu", 3, 1), ("cuda", 0, 0), ("tpu", 0, 0)]:
        exported = export.export(forward, platforms=[platform], disabled_checks=check)(*args)
        text = exported.mlir_module()
        assert text.count("custom_call @shufflenet_stage") == stages, platform
        assert text.count("custom_call @shufflenet_stem_pool") == stems, platform
        if platform != "cpu":
            assert "custom_call @shufflenet" not in text, platform


def _unit_weights(c_in, half, stride):
    """A kernel and its BatchNorm's buffers per convolution, as `kernels.UnitWeights` and
    `DownUnitWeights` order them."""

    def conv(rows, cols):
        return [(rows, cols)] + [(cols,)] * 4  # kernel, BatchNorm gamma, beta, mean, var

    shapes = conv(c_in if stride == 2 else half, half) + conv(9, half) + conv(half, half)
    shapes += conv(9, c_in) + conv(c_in, half) if stride == 2 else []
    return tuple(jnp.ones(s) for s in shapes)


@pytest.mark.parametrize(
    "units, message",
    [
        ([], "at least one unit"),
        ([_unit_weights(24, 12, 1)], r"unit 0 on input channels 8: .* and 24 input channels"),
        ([_unit_weights(8, 12, 2)[:24]], "unit 0 has 24 weight arrays"),
        ([_unit_weights(8, 12, 2), _unit_weights(24, 12, 2)], "unit 1 has 25 weight arrays"),
        (
            [_unit_weights(8, 12, 2), (*_unit_weights(24, 12, 1)[:5], jnp.ones((3, 12)))],
            r"unit 1 has 6 weight arrays",
        ),
        (
            [_unit_weights(8, 12, 2), _unit_weights(24, 12, 1)[:5] + (jnp.ones((3, 12)),) * 10],
            r"unit 1 .*\(3, 12\).* expected .*\(9, 12\)",
        ),
    ],
)
def test_shuffle_stage_rejects_mismatched_weights(units, message):
    with pytest.raises(ValueError, match=message):
        kernels.shuffle_stage(jnp.ones((1, 6, 6, 8)), units, 1e-5)


def test_shuffle_stage_rejects_other_dtypes():
    units = [tuple(w.astype(jnp.bfloat16) for w in _unit_weights(8, 12, 2))]
    with pytest.raises(ValueError, match="needs float32"):
        kernels.shuffle_stage(jnp.ones((1, 6, 6, 8)), units, 1e-5)


@pytest.mark.parametrize(
    "x_shape, kernel_shape, norm_shapes",
    [
        ((1, 8, 8, 3), (3, 3, 4, 24), [(24,)] * 4),
        ((1, 8, 8, 3), (5, 5, 3, 24), [(24,)] * 4),
        ((1, 8, 8, 3), (3, 3, 3, 24), [(24,)] * 3 + [(16,)]),
        ((1, 8, 8, 3), (3, 3, 3, 24), [(24,)] * 3),
        ((8, 8, 3), (3, 3, 3, 24), [(24,)] * 4),
    ],
)
def test_stem_pool_rejects_mismatched_shapes(x_shape, kernel_shape, norm_shapes):
    norm = tuple(jnp.ones(shape) for shape in norm_shapes)
    with pytest.raises(ValueError, match="stem_pool: .* do not match"):
        kernels.stem_pool(jnp.ones(x_shape), jnp.ones(kernel_shape), norm, 1e-5)


def _traces(kernels_family: str) -> list[str]:
    """The jaxprs of a 0.5x model's train-mode gradient and of its folded inference."""
    from flax import nnx

    from shufflenet_jax.model.folded import fold_batchnorm
    from shufflenet_jax.model.layers import Impl
    from shufflenet_jax.model.network import ShuffleNetV2

    model = ShuffleNetV2(0.5, 10, impl=Impl(kernels=kernels_family), rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 32, 32, 3))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        net = nnx.merge(graphdef, params, rest, copy=True)
        net.train()
        return net(x).sum()

    folded = fold_batchnorm(model)
    return [str(jax.make_jaxpr(jax.grad(loss))(params)), str(jax.make_jaxpr(folded)(x))]


def test_the_models_kernel_family_alone_decides_whether_cpp_is_called(monkeypatch):
    """The family is the model's (`Impl.kernels`), not the process's: with the C++ kernels
    loaded, an "xla" model traces no C++ call, in training (weight gradients, BatchNorm sums)
    or folded inference (stem and stages), and a "cpp" model traces them; once loaded,
    tracing never compiles with g++."""
    kernels.load()

    def no_build(*args):
        raise AssertionError("g++ ran while tracing")

    monkeypatch.setattr(build, "build_library", no_build)
    assert all("shufflenet_" in text for text in _traces("cpp"))
    assert not any("shufflenet_" in text for text in _traces("xla"))


def test_a_cpp_model_that_cannot_build_its_kernels_warns_once_and_traces_xla(monkeypatch):
    """Where the C++ cannot be built (no compiler), the "cpp" family falls back to XLA's
    formulation with one warning naming the reason, rather than failing to trace."""

    def no_compiler(*args):
        raise build.CppBuildError("C++ compiler 'g++' not found (set CXX)")

    monkeypatch.setattr(kernel_calls, "_state", {})
    monkeypatch.setattr(build, "load_library", no_compiler)
    with pytest.warns(UserWarning, match="C[+][+] kernels unavailable.*not found") as warned:
        texts = _traces("cpp")
    assert len(warned) == 1
    assert not any("shufflenet_" in text for text in texts)


def test_a_cpp_model_on_an_accelerator_backend_builds_nothing_and_traces_xla(monkeypatch):
    """Where JAX's default backend is a GPU or TPU no program is lowered for the CPU: the
    "cpp" family builds nothing there (no g++ run, no warning) and traces XLA's formulation."""

    def no_build(*args):
        raise AssertionError("g++ ran on an accelerator backend")

    monkeypatch.setattr(kernel_calls, "_state", {})
    monkeypatch.setattr(build, "load_library", no_build)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not any("shufflenet_" in text for text in _traces("cpp"))
    assert not kernels.loaded()
