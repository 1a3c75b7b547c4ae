"""Readiness for accelerators this machine does not have: train.py's steps compiled ahead of
time for an H100 (one and eight) and a TPU v5e 2x2 by their own compilers, at width 0.5 on
32x32 digits-sized batches (whole-network compiles take minutes here: small is the point).

The compiling tests are marked `aot`: they need JAX's CUDA plugin and libtpu
(`pip install -e ".[aot]"`), which the leg that runs them installs; other legs deselect them.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import digits
from lab import fusion
from shufflenet_jax import kernels
from shufflenet_jax.aot import compile as aot
from shufflenet_jax.aot import hlo, targets
from shufflenet_jax.model.config import model_kwargs
from shufflenet_jax.model.network import abstract_model
from shufflenet_jax.train import parallel

from .helpers import count_independently, forward_products, set_fields

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(dtype="bfloat16", batch=16):
    c = digits.get_config()
    set_fields(c, image_size=32, batch_size=batch, eval_batch_size=batch, compute_dtype=dtype)
    return c


@pytest.fixture(autouse=True)
def no_compilation_cache():
    """Deviceless executables cannot be read back from JAX's persistent cache (it needs the
    device's client): do not write them there; other tests use it again afterwards."""
    before = jax.config.jax_enable_compilation_cache
    aot.without_persistent_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


def check_ready(name: str) -> tuple[dict, dict]:
    """Compiles the bf16 train and eval steps for the target and checks what holds on every
    target: no C++ kernel of this project, fits, fusions, an estimate; (report, executables)."""
    target = targets.get(name)
    report, executables = aot.compile_for(tiny_config(), target)
    assert report["target"] == name and report["devices"] == target.devices
    for step in ("train", "eval"):
        r = report[step]
        assert r["project_kernels"] == 0
        assert 'custom_call_target="shufflenet_' not in executables[step].as_text()
        assert r["memory"]["fits"] and 0 < r["memory"]["total_bytes"] < target.hbm_bytes
        assert sum(r["fusions"].values()) > 10
        check_estimate(r["estimate"], name, step, target.devices)
    return report, executables


# Published per-chip figures (NVIDIA's H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense
# bf16; Google's Cloud TPU v5e page: 819 GB/s, 197 TFLOP/s bf16), written here apart from the
# code's target table, which reads the GPUs' bandwidth from XLA's descriptions.
PUBLISHED = {"h100": (3.35e12, 989e12), "h100x8": (3.35e12, 989e12), "v5e:2x2": (819e9, 197e12)}


def check_estimate(e: dict, name: str, step: str, devices: int) -> None:
    """The step's flops per device against the closed form (tests/test_summary.py): 2 flops
    per multiply-add per image on the device, once forward for eval, three times for training
    (forward, input and weight gradients); XLA's count adds the element-wise work on top
    (measured 1.06x and 3.50x on h100, h100x8 and v5e:2x2). The time bound is the larger of
    bytes over the published bandwidth and flops over the published peak (their rounding:
    within 1%); the images/s bound is the global batch of 16 over it."""
    from .test_summary import closed_form_macs_at

    products = 2 * closed_form_macs_at(0.5, 32, num_classes=10) * 16 / devices
    low, high = (3.0, 4.0) if step == "train" else (1.0, 1.25)
    assert low * products <= e["flops"] <= high * products, (step, e["flops"] / products)
    bandwidth, peak = PUBLISHED[name]
    seconds = max(e["hbm_bytes"] / bandwidth, e["flops"] / peak)
    assert e["hbm_bytes"] > 0 and e["lower_bound_ms"] == pytest.approx(1e3 * seconds, rel=0.01)
    assert e["images_per_s_bound"] * e["lower_bound_ms"] / 1e3 == pytest.approx(16)


def check_bf16_products(executables: dict) -> None:
    """The forward pass's products take bfloat16 operands; every product and every sum
    (BatchNorm statistics, pools, the loss) accumulates in float32. (On a GPU the backward
    pass's products take the float32 cotangents: docs/accelerator.md.)"""
    types = hlo.precision(hlo.optimized(executables["train"]))
    products = types["dot"] + types["convolution"]
    assert products and all(k.endswith("->f32") for k in products), products
    assert products["bf16,bf16->f32"] >= forward_products(
        abstract_model(**model_kwargs(tiny_config()))
    ), products
    assert "bf16" not in types["sum"] and types["sum"]["f32"] > 0, types["sum"]


@pytest.mark.aot
def test_bf16_steps_compile_for_one_h100_with_xla_only_fit_and_multiply_in_bf16():
    _, executables = check_ready("h100")
    check_bf16_products(executables)


@pytest.mark.aot
def test_bf16_steps_compile_for_eight_h100s_and_mean_the_gradients_over_them():
    report, _ = check_ready("h100x8")
    assert report["train"]["collectives"]["all-reduce"]["count"] >= 1
    assert report["per_device_batch"] == 2


@pytest.mark.aot
def test_bf16_steps_compile_for_a_tpu_v5e_slice_with_xlas_cost_analysis():
    report, executables = check_ready("v5e:2x2")
    assert report["train"]["xla_cost_analysis"]["flops"] > 0
    assert report["train"]["collectives"]["all-reduce"]["count"] >= 1
    check_bf16_products(executables)


@pytest.mark.aot
def test_float32_training_on_a_gpu_uses_no_bf16():
    steps = aot.steps_for(tiny_config("float32"), targets.get("h100"))
    _, compiled, _ = aot.compile_step(steps.train, steps.train_args(16))
    used = hlo.result_dtypes(hlo.optimized(compiled))
    assert used["f32"] > 0 and "bf16" not in used, used


@pytest.mark.aot
def test_the_eval_steps_fused_path_lowers_to_xla_off_the_cpu_and_to_the_kernels_on_it():
    """The same eval step lowered twice: for the GPU with XLA's layers only, for the CPU with
    the C++ stage kernels (so that the first check can fail)."""
    config = tiny_config()
    gpu = aot.steps_for(config, targets.get("h100"))
    assert "custom_call @shufflenet_" not in gpu.eval.lower(*gpu.eval_args(16)).as_text()
    if not kernels.load():
        pytest.fail(f"the C++ kernels do not build here: {kernels.status()}")
    cpu = aot.steps_on(config, parallel.make_mesh(1), "cpu")
    assert "custom_call @shufflenet_stage" in cpu.eval.lower(*cpu.eval_args(16)).as_text()


@pytest.mark.aot
@pytest.mark.parametrize("target", ["h100", "v5e:2x2"])
def test_fusion_lab_reads_a_units_bf16_training_kernels_from_the_targets_compiler(target, tmp_path):
    """One stride-1 unit's bf16 gradient, with the depthwise convolution as shifted
    multiply-adds and as `lax.conv`: counts agree with the HLO text; on the GPU only the
    latter is a cuDNN call; no timing and no C++ kernel off the CPU."""
    reports = {}
    for depthwise in ("shifted", "lax"):
        f, params, stats = fusion.unit_case(58, "transpose", depthwise, "train", jnp.bfloat16)
        x = jnp.ones((2, 8, 8, 58))
        hlo_file = tmp_path / f"{depthwise}.txt"
        r = fusion.analyze(f, params, stats, x, save_hlo=hlo_file, target=target)
        text = hlo_file.read_text()
        assert (sum(r.fusions.values()), sum(r.library_calls.values())) == count_independently(text)
        assert r.seconds is None and r.flops > 0 and r.hbm_bytes > 0
        assert 'custom_call_target="shufflenet_' not in text
        reports[depthwise] = r
    cudnn = {
        d: sum(n for k, n in r.library_calls.items() if "cudnn" in k) for d, r in reports.items()
    }
    if target == "h100":
        assert cudnn["shifted"] == 0 and cudnn["lax"] >= 2, cudnn  # forward, kernel gradient
        assert reports["shifted"].bytes_accessed is None  # XLA:GPU gives no cost analysis
    else:
        assert cudnn == {"shifted": 0, "lax": 0}
        assert reports["shifted"].bytes_accessed > 0


@pytest.mark.aot
def test_a_bad_target_a_batch_that_does_not_split_and_a_missing_plugin_are_one_line(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown target 'h300'; known: h100, h100x8"):
        targets.get("h300")
    with pytest.raises(ValueError, match="batch_size=12 is not divisible by the 8 devices"):
        aot.steps_for(tiny_config(batch=12), targets.get("h100x8")).train_args(12)
    real = importlib.util.find_spec
    hidden = lambda n, *a: None if "plugin" in n else real(n, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(ValueError, match=r'needs JAX\'s CUDA plugin: pip install -e "\.\[aot\]"'):
        targets.topology(targets.get("h200"))


def test_train_py_names_a_bad_target_in_one_line():
    out = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/digits.py", "--compile_for", "a100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown target 'a100'")


# train.py run as from the command line, with the largest-batch search's probes (only they)
# answered by a memory model of 1 GB + 1 MB per image instead of compiles at huge batches
COMPILE_FOR_WITH_A_MEMORY_MODEL = """
import runpy, sys
from shufflenet_jax.aot import compile as aot
aot.total_bytes = lambda jitted, args_at, per_device, target: 1e9 + 1e6 * per_device
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.aot
def test_train_py_compile_for_writes_its_report_the_largest_batches_and_the_executables(
    tmp_path,
):
    """README's `train.py --compile_for h100 --json OUT --max_batch --save FILE` (the digits
    config at batch 16): exit 0, the printed report, the JSON with both steps compiled for
    one H100, each step's largest per-device batch where the memory model crosses the usable
    bytes (within the search's 1/32), and the saved executables of both steps."""
    import pickle

    out, saved = tmp_path / "report.json", tmp_path / "steps.pkl"
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_WITH_A_MEMORY_MODEL, "--config", "configs/digits.py",
         "--config.train.batch_size=16", "--config.train.eval_batch_size=16",
         "--compile_for", "h100", "--json", str(out), "--max_batch", "--save", str(saved)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "h100: 1 gpu device(s)" in done.stdout.splitlines(), done.stdout[-2000:]
    report = json.loads(out.read_text())
    limit = (targets.usable_bytes(targets.get("h100")) - 1e9) / 1e6  # the model's crossing
    for name in ("train", "eval"):
        r = report[name]
        assert r["global_batch"] == 16 and r["memory"]["fits"] and r["project_kernels"] == 0
        assert r["max_per_device_batch"] <= limit < r["first_per_device_batch_over"]
        assert r["first_per_device_batch_over"] <= r["max_per_device_batch"] * (1 + 1 / 32) + 1
    steps = pickle.loads(saved.read_bytes())
    assert steps["devices"] == 1 and set(steps["steps"]) == {"train", "eval"}


def _search_with(monkeypatch, bytes_at, start, start_bytes=None):
    """aot.max_batch with a step whose memory per device is `bytes_at(batch)`."""
    tried = []

    def total_bytes(jitted, args_at, per_device, target):
        tried.append(per_device)
        return bytes_at(per_device)

    monkeypatch.setattr(aot, "total_bytes", total_bytes)
    return aot.max_batch(None, None, start, targets.get("h100"), start_bytes), tried


@pytest.mark.parametrize(
    "case",
    [
        "linear",
        "flattening (rematerialized)",
        "refused where it would not fit",
        "refused far below the line",
        "start too big",
    ],
)
def test_max_batch_brackets_the_limit_within_a_32nd_in_few_compiles(monkeypatch, case):
    """Whole-network compiles take a minute or more each; the search must close in on the
    limit from how memory grows, whatever the compiler does near it."""
    usable = targets.usable_bytes(targets.get("h100"))
    linear = lambda b: 2**30 + b * 3 * 2**20  # noqa: E731
    inf_over = lambda m: m if m <= usable else math.inf  # noqa: E731
    bytes_at, start = {
        "linear": (linear, 256),
        "flattening (rematerialized)": (lambda b: min(linear(b), 0.9 * usable + b * 2**18), 256),
        "refused where it would not fit": (lambda b: inf_over(linear(b)), 256),
        "refused far below the line": (lambda b: linear(b) if b < 9000 else math.inf, 256),
        "start too big": (linear, 40000),
    }[case]
    found, tried = _search_with(monkeypatch, bytes_at, start)
    assert bytes_at(found.largest) <= usable < bytes_at(found.first_over)
    assert found.first_over - found.largest <= max(1, found.largest // 32)
    assert found.compiles == len(tried) == len(set(tried)) <= 10, tried


def _timed_search(monkeypatch, bytes_at, start, fit_s, refused_s):
    """aot.max_batch on a fake clock: a compile that fits (or not) takes `fit_s`, one the
    compiler refuses for memory `refused_s`. Returns the result and the clock's total."""
    clock = [0.0]

    def total_bytes(jitted, args_at, per_device, target):
        clock[0] += refused_s if math.isinf(bytes_at(per_device)) else fit_s
        return bytes_at(per_device)

    monkeypatch.setattr(aot, "total_bytes", total_bytes)
    monkeypatch.setattr(aot.time, "perf_counter", lambda: clock[0])
    v5e = targets.get("v5e:2x2")
    found = aot.max_batch(None, None, start, v5e, bytes_at(start), start_seconds=fit_s)
    return found, clock[0]


def test_max_batch_closes_in_from_above_when_the_compiler_refuses_quickly(monkeypatch):
    """The TPU compiler refuses an oversized step in seconds but takes ten minutes or more on
    one that fits (rematerializing to fit, so memory flattens below the limit): the search
    spends refusals, not fits, and still brackets the limit within a 32nd."""
    usable = targets.usable_bytes(targets.get("v5e:2x2"))
    per_image = 0.15 * usable / 256
    remat = lambda b: math.inf if b >= 1290 else min(b * per_image, 0.94 * usable)  # noqa: E731
    slow, slow_s = _timed_search(monkeypatch, remat, 256, fit_s=600, refused_s=600)
    quick, quick_s = _timed_search(monkeypatch, remat, 256, fit_s=600, refused_s=30)
    for found in (slow, quick):
        assert remat(found.largest) <= usable < remat(found.first_over)
        assert found.first_over - found.largest <= found.largest // 32
    assert quick.compiles - quick.refused < slow.compiles - slow.refused
    assert quick_s < slow_s


def test_max_batch_does_not_compile_the_configs_own_batch_again(monkeypatch):
    linear = lambda b: 2**30 + b * 3 * 2**20  # noqa: E731
    found, tried = _search_with(monkeypatch, linear, 256, start_bytes=linear(256))
    assert 256 not in tried and found.compiles == len(tried)
    assert found.largest > 256


def test_max_batch_tells_of_each_compile_as_it_ends(monkeypatch):
    """A TPU search is hours of compiles: each one is reported when it ends, with its batch,
    its memory and whether it fits."""
    lines = []
    monkeypatch.setattr(aot, "total_bytes", lambda j, a, b, t: 2**30 + b * 3 * 2**20)
    found = aot.max_batch(None, None, 256, targets.get("h100"), progress=lines.append)
    assert len(lines) == found.compiles
    assert f"{found.largest} per device" in "".join(lines)
    assert sum("does not fit" in line for line in lines) >= 1


def test_a_gpu_step_fits_in_what_jax_preallocates_not_the_whole_device(monkeypatch):
    """A real H100 run gets 75% of the memory (JAX's allocator); a step between that and the
    device's size compiles deviceless but would not run there. TPUs get all of it."""
    h100, v5e = targets.get("h100"), targets.get("v5e:2x2")

    class Compiled:  # what XLA's memory analysis of a step reports
        def __init__(self, total):
            sizes = dict(argument_size_in_bytes=total, output_size_in_bytes=0)
            sizes |= dict(alias_size_in_bytes=0, temp_size_in_bytes=0)
            self.analysis = type("Analysis", (), sizes)

        def memory_analysis(self):
            return self.analysis

    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert aot.memory(Compiled(int(0.7 * h100.hbm_bytes)), h100)["fits"]
    assert not aot.memory(Compiled(int(0.8 * h100.hbm_bytes)), h100)["fits"]
    assert aot.memory(Compiled(int(0.8 * v5e.hbm_bytes)), v5e)["fits"]
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert aot.memory(Compiled(int(0.8 * h100.hbm_bytes)), h100)["fits"]


DEVICELESS_COMPILE = """
import sys, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from shufflenet_jax.aot import compile as aot, targets
jax.jit(jnp.cos)(jnp.ones(256))  # the CPU's, cached: JAX has decided to use the cache
if sys.argv[1] == "off":
    aot.without_persistent_cache()
mesh = targets.make_mesh(targets.get("h100"))
x = jax.ShapeDtypeStruct((256,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
def deviceless(x):
    return jnp.sin(x) * 2
jax.jit(deviceless).lower(x).compile()
"""


@pytest.mark.aot
@pytest.mark.parametrize("cache", ["on", "off"])
def test_deviceless_compiles_stay_out_of_the_persistent_cache(tmp_path, cache):
    """An executable for a device this machine lacks cannot be read back from JAX's persistent
    cache: train.py --compile_for and the device check's deviceless stage must not write one,
    even where the process has already compiled for its CPU with the cache ("on", JAX's
    default, shows that the write would happen)."""
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    run = [sys.executable, "-c", DEVICELESS_COMPILE, cache]
    out = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert list((tmp_path / "cache").glob("jit_cos-*"))  # the CPU's
    assert bool(list((tmp_path / "cache").glob("jit_deviceless-*"))) == (cache == "on")


def test_saved_steps_load_and_compute_what_the_compiled_ones_do(tmp_path):
    """The CPU's executables, since loading needs the device they were compiled for."""
    x = jax.numpy.arange(6.0)
    compiled = jax.jit(lambda x: 2 * x + 1).lower(x).compile()
    aot.write_executables(tmp_path / "steps.pkl", {"train": compiled}, devices=1)
    loaded = aot.load_executables(tmp_path / "steps.pkl")
    np.testing.assert_array_equal(loaded["train"](x), compiled(x))
