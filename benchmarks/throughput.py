"""Side-by-side throughput of ShuffleNet V2: JAX (this package) against torchvision, same process.

    python benchmarks/throughput.py [--widths 1.0] [--batches 1 32] [--repeats 5]
        [--torch-compile] [--no-fold-bn] [--impl fused:layers] [--json OUT]
    python benchmarks/throughput.py --fake-data [--fake-dtype bfloat16] --batches 256
    python benchmarks/throughput.py --deploy [--cases readme ort_torchvision ...] [--json OUT]

For each width and batch size it measures, alternating the frameworks round by round after a
warm-up: inference images/s (eval mode), training-step images/s (forward, backward, SGD with
momentum), the first call's compile/warm-up time, and JAX's memory (XLA's compiled argument,
output and temporary buffer sizes; PyTorch's CPU peak cannot be separated within one process,
so it is not reported). JAX inference uses the model
with BatchNorm folded into the convolutions unless --no-fold-bn. Medians over `--repeats`
rounds. The JAX train step's time outside compiled code is estimated by timing a jitted
identity over the same argument pytrees (flatten, dispatch, unflatten) against the real step.

On a GPU or TPU backend (or with --fake-data) it instead times train.py's own sharded training
step, in bfloat16 compute by default, on a random batch made on the devices, over all devices,
against torchvision's training step in AMP bfloat16 with channels_last on the same device kind
(eager; also torch.compile with --torch-compile): each round dispatches steps asynchronously
for about --round-seconds and blocks once; the rounds alternate between the frameworks; it
reports medians, their ratios, compile (first-step) time and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lab import variants
from shufflenet_jax.compiler_options import eval_compiler_options, train_compiler_options
from shufflenet_jax.model import Impl, ShuffleNetV2, fold_batchnorm
from shufflenet_jax.model.inference import make_predict, split_model
from shufflenet_jax.process import cpu_is_default_backend, setup_process
from shufflenet_jax.train.state import TrainState
from shufflenet_jax.train.step import make_train_step

LR, MOMENTUM = 0.1, 0.9


def seconds_per_call(fn: Callable[[], None], iters: int) -> float:
    """Mean seconds per call over `iters` calls (one round; callers take the median of rounds)."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _timed_first_call(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class JaxCase:
    """The library's jitted predict and train steps of one ShuffleNetV2 configuration on one
    batch (`impl`: the implementations, `lab.variants`)."""

    def __init__(
        self,
        width: float,
        batch: int,
        size: int,
        fold_bn: bool,
        train_options: dict | None = None,
        eval_options: dict | None = None,
        impl: Impl | None = None,
    ):
        model = ShuffleNetV2(width, rngs=nnx.Rngs(0), **({} if impl is None else {"impl": impl}))
        model.eval()
        infer_graphdef, *self.infer_state = split_model(fold_batchnorm(model) if fold_bn else model)
        self.predict = make_predict(infer_graphdef, eval_options)
        graphdef, params, stats = split_model(model)
        tx = optax.sgd(LR, momentum=MOMENTUM)
        self.state = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), None)
        self.train_step = make_train_step(graphdef, tx, compiler_options=train_options)
        rng = np.random.default_rng(0)
        self.x = jnp.asarray(rng.random((batch, size, size, 3), np.float32))
        self.batch = {
            "image": self.x,
            "label": jnp.asarray(rng.integers(0, 1000, batch), jnp.int32),
        }
        self.identity = jax.jit(lambda *a: a, donate_argnums=0)

    def infer(self) -> None:
        self.predict(*self.infer_state, self.x).block_until_ready()

    def train(self) -> None:
        self.state, metrics = self.train_step(self.state, self.batch)
        metrics["loss"].block_until_ready()

    def dispatch_only(self) -> None:
        """The train step's host work without its compute: same pytrees in and out."""
        self.state, _ = self.identity(self.state, self.batch)
        jax.block_until_ready(self.state)

    def memory_bytes(self) -> dict[str, int]:
        def total(jitted, *args):
            m = jitted.lower(*args).compile().memory_analysis()
            if m is None:
                return -1
            return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes

        return {
            "infer": total(self.predict, *self.infer_state, self.x),
            "train": total(self.train_step, self.state, self.batch),
        }


class TorchCase:
    """torchvision's model in eager mode (NCHW or channels_last), optionally torch.compile'd."""

    def __init__(self, width: float, batch: int, size: int, channels_last: bool, compiled: bool):
        import torch
        import torchvision

        self.torch = torch
        name = {0.5: "x0_5", 1.0: "x1_0", 1.5: "x1_5", 2.0: "x2_0"}[width]
        model = getattr(torchvision.models, f"shufflenet_v2_{name}")()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(memory_format=fmt)
        self.forward = torch.compile(self.model) if compiled else self.model
        self.x = torch.rand(batch, 3, size, size).contiguous(memory_format=fmt)
        self.y = torch.randint(0, 1000, (batch,))
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def infer(self) -> None:
        self.model.eval()
        with self.torch.no_grad():
            self.forward(self.x)

    def train(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = self.torch.nn.functional.cross_entropy(self.forward(self.x), self.y)
        loss.backward()
        self.opt.step()


class ReadmeCase:
    """README's inference path, `shufflenet_jax.predictor(model)` (`how` "readme"), the
    library's `make_predict` on the split state ("make_predict"), or the plain `nnx.jit` over
    the module that walks its graph every call ("nnx_jit")."""

    def __init__(self, width: float, batch: int, size: int, how: str):
        from shufflenet_jax import predictor

        model = ShuffleNetV2(width, rngs=nnx.Rngs(0))
        model.eval()
        x = jnp.asarray(np.random.default_rng(0).random((batch, size, size, 3), np.float32))
        if how == "nnx_jit":
            jitted = nnx.jit(lambda m, x: m(x))
            self.call = lambda: jitted(model, x)
        elif how == "make_predict":
            graphdef, params, stats = split_model(model)
            predict = make_predict(graphdef)
            self.call = lambda: predict(params, stats, x)
        else:
            predict = predictor(model)
            self.call = lambda: predict(x)

    def infer(self) -> None:
        self.call().block_until_ready()


class ExportedCase:
    """An exported file run by ONNX Runtime or LiteRT: this package's export (`fmt` onnx or
    tflite, float32 or int8) or torchvision's own `torch.onnx.export` (`fmt` torchvision)."""

    def __init__(self, width: float, batch: int, size: int, fmt: str, int8: bool, tmp: str):
        from shufflenet_jax.interop import export

        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
        if fmt == "torchvision":
            self.run = _torchvision_onnx(width, batch, size, tmp)
            self.x = np.ascontiguousarray(self.x.transpose(0, 3, 1, 2))
            return
        model = ShuffleNetV2(width, rngs=nnx.Rngs(0))
        calibration = [rng.standard_normal((8, size, size, 3)).astype(np.float32)]
        path = f"{tmp}/{fmt}_{width}_{batch}_{int8}{export.SUFFIXES[fmt]}"
        export.export(
            model,
            fmt,
            path,
            image_size=size,
            batch=None if fmt == "onnx" else batch,
            calibration=calibration if int8 else None,
        )
        self.run = export.load(path)

    def infer(self) -> None:
        self.run(self.x)


def _torchvision_onnx(width: float, batch: int, size: int, tmp: str) -> Callable:
    """torchvision's model exported by torch.onnx.export (opset 17, dynamic batch), run by
    ONNX Runtime with all graph optimizations: what a PyTorch user deploys on a CPU."""
    import onnxruntime as ort
    import torch
    import torchvision

    name = {0.5: "x0_5", 1.0: "x1_0", 1.5: "x1_5", 2.0: "x2_0"}[width]
    model = getattr(torchvision.models, f"shufflenet_v2_{name}")().eval()
    path = f"{tmp}/torchvision_{width}.onnx"
    torch.onnx.export(
        model,
        (torch.zeros(batch, 3, size, size),),
        path,
        input_names=["images"],
        opset_version=17,
        dynamic_axes={"images": {0: "batch"}},
        dynamo=False,
    )
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


DEPLOY_CASES = (
    "readme",
    "make_predict",
    "nnx_jit",
    "torch_eager",
    "torch_channels_last",
    "ort_torchvision",
    "ort_ours",
    "ort_ours_int8",
    "litert_ours",
    "litert_ours_int8",
)


def _deploy_case(name: str, width: float, batch: int, size: int, tmp: str) -> object:
    if name in ("readme", "make_predict", "nnx_jit"):
        return ReadmeCase(width, batch, size, name)
    if name.startswith("torch_"):
        return TorchCase(width, batch, size, name == "torch_channels_last", False)
    fmt = {"ort_torchvision": "torchvision", "ort": "onnx", "litert": "tflite"}
    key = name if name == "ort_torchvision" else name.split("_")[0]
    return ExportedCase(width, batch, size, fmt[key], name.endswith("int8"), tmp)


def deployment(args: argparse.Namespace) -> list[dict]:
    """Inference images/s of README's path against PyTorch eager, ONNX Runtime (torchvision's
    export and this package's) and LiteRT (this package's), float32 and int8, alternating
    rounds in one process; `--cases` runs a subset (one alone: the shared-process check)."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            for batch in args.batches:
                cases = {n: _deploy_case(n, width, batch, args.size, tmp) for n in args.cases}
                row = {"width": width, "batch": batch, "size": args.size}
                for case in cases.values():
                    case.infer()
                iters = max(1, args.images // batch)
                times: dict[str, list[float]] = {name: [] for name in cases}
                for _ in range(args.repeats):
                    for name, case in cases.items():
                        times[name].append(seconds_per_call(case.infer, iters))
                for name in cases:
                    row[f"{name}_img_s"] = batch / statistics.median(times[name])
                for name in cases:
                    if name != "readme" and "readme" in cases:
                        row[f"ratio_readme_vs_{name}"] = row["readme_img_s"] / row[f"{name}_img_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def run(args: argparse.Namespace) -> dict:

    results = []
    for width in args.widths:
        for batch in args.batches:
            cases: dict[str, object] = {
                "jax": JaxCase(
                    width,
                    batch,
                    args.size,
                    args.fold_bn,
                    args.train_options,
                    args.eval_options,
                    variants.parse(args.impl),
                ),
                "torch_eager": TorchCase(width, batch, args.size, False, False),
                "torch_channels_last": TorchCase(width, batch, args.size, True, False),
            }
            if args.torch_compile:
                cases["torch_compile"] = TorchCase(width, batch, args.size, True, True)
            iters = max(1, args.images // batch)
            row: dict = {"width": width, "batch": batch, "size": args.size}
            for mode in args.modes:
                warm = {}
                for name, case in cases.items():
                    warm[name] = _timed_first_call(getattr(case, mode))
                    getattr(case, mode)()
                times: dict[str, list[float]] = {name: [] for name in cases}
                for _ in range(args.repeats):
                    for name, case in cases.items():
                        times[name].append(seconds_per_call(getattr(case, mode), iters))
                for name in cases:
                    row[f"{name}_{mode}_img_s"] = batch / statistics.median(times[name])
                    row[f"{name}_{mode}_warmup_s"] = warm[name]
                torch_best = max(
                    row[f"torch_eager_{mode}_img_s"], row[f"torch_channels_last_{mode}_img_s"]
                )
                row[f"ratio_{mode}_vs_torch_eager"] = row[f"jax_{mode}_img_s"] / torch_best
                if args.torch_compile:
                    row[f"ratio_{mode}_vs_torch_compile"] = (
                        row[f"jax_{mode}_img_s"] / row[f"torch_compile_{mode}_img_s"]
                    )
                if mode == "train":
                    jc = cases["jax"]
                    jc.dispatch_only()
                    host = statistics.median(
                        seconds_per_call(jc.dispatch_only, iters) for _ in range(args.repeats)
                    )
                    row["jax_train_host_overhead_fraction"] = host / (
                        batch / row["jax_train_img_s"]
                    )
            row["jax_compiled_bytes"] = cases["jax"].memory_bytes()
            results.append(row)
            print(format_row(row, args), flush=True)
    return {
        **_versions(),
        "isa": args.isa,
        "dtype": "float32",
        "jax_impl": args.impl or "defaults",
        "jax_infer_fold_bn": args.fold_bn,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "host_malloc_reuse": args.host_malloc_applied,
        "jax_eval_compiler_options": (
            eval_compiler_options() if args.eval_options is None else args.eval_options
        ),
        "jax_train_compiler_options": (
            train_compiler_options() if args.train_options is None else args.train_options
        ),
        "repeats": args.repeats,
        "results": results,
    }


def _round_rates(cases: dict, batch: int, round_s: float, repeats: int) -> dict[str, list]:
    """Images/s of each case's `step` over `repeats` rounds, alternating the cases round by
    round. A round dispatches as many steps as fill about `round_s` seconds (calibrated per
    case) and blocks once at its end, so asynchronous dispatch overlaps the host's work."""
    counts = {}
    for name, case in cases.items():
        n, elapsed = 1, 0.0
        while elapsed < round_s / 4:
            n *= 2
            start = time.perf_counter()
            for _ in range(n):
                case.step()
            case.sync()
            elapsed = time.perf_counter() - start
        counts[name] = max(1, round(n * round_s / elapsed))
    rates: dict[str, list] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            for _ in range(counts[name]):
                case.step()
            case.sync()
            rates[name].append(counts[name] * batch / (time.perf_counter() - start))
    return {"steps_per_round": counts, "rates": rates}


class JaxTrainCase:
    """train.py's own sharded training step (its config's recipe, `compute_dtype`) on one
    batch made on the devices; compiled ahead of time, so compile time is measured alone."""

    def __init__(self, width: float, batch: int, size: int, dtype: str):
        from shufflenet_jax.data import pipeline as input_pipeline
        from shufflenet_jax.train import parallel
        from shufflenet_jax.train.state import create_model, create_train_state
        from shufflenet_jax.train.step import train_step_for

        config = _imagenet_config(width)
        config.train.batch_size, config.train.compute_dtype = batch, dtype
        mesh = parallel.make_mesh()
        parallel.check_batch(batch, mesh)
        data = parallel.data_sharding(mesh)
        graphdef, tx, state = create_train_state(config, create_model(config))
        self.state = jax.device_put(state, parallel.replicated(mesh))
        self.batch = next(input_pipeline.fake_batches(data, batch, size, config.model.num_classes))
        lowered = train_step_for(config, graphdef, tx, mesh).lower(self.state, self.batch)
        start = time.perf_counter()
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        self.devices = mesh.devices.size

    def step(self) -> None:
        self.state, self.metrics = self.compiled(self.state, self.batch)

    def sync(self) -> None:
        jax.block_until_ready(self.metrics)

    def peak_bytes(self) -> int | None:
        stats = jax.local_devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")


class TorchAmpTrainCase:
    """torchvision's model training on the same device kind in automatic mixed precision
    (bfloat16 autocast, float32 weights), channels_last, SGD with momentum, eager or compiled."""

    def __init__(self, width: float, batch: int, size: int, compiled: bool):
        import torch
        import torchvision

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        name = {0.5: "x0_5", 1.0: "x1_0", 1.5: "x1_5", 2.0: "x2_0"}[width]
        model = getattr(torchvision.models, f"shufflenet_v2_{name}")().to(self.device)
        self.model = model.to(memory_format=torch.channels_last).train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.x = torch.rand(batch, 3, size, size, device=self.device).contiguous(
            memory_format=torch.channels_last
        )
        self.y = torch.randint(0, 1000, (batch,), device=self.device)
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.compile_s = _timed_first_call(lambda: (self.step(), self.sync()))

    def step(self) -> None:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device, dtype=torch.bfloat16):
            logits = self.forward(self.x)
        loss = torch.nn.functional.cross_entropy(logits.float(), self.y, label_smoothing=0.1)
        loss.backward()
        self.opt.step()

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def peak_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        return self.torch.cuda.max_memory_allocated()


def accelerator_training(args: argparse.Namespace) -> list[dict]:
    """Training images/s of train.py's sharded step in `--fake-dtype` against torchvision in
    AMP bfloat16 (eager, and torch.compile with --torch-compile) on the same device kind:
    alternating time-based rounds, medians; compile time and peak device memory."""
    rows = []
    for width in args.widths:
        for batch in args.batches:
            cases: dict[str, object] = {
                "jax": JaxTrainCase(width, batch, args.size, args.fake_dtype)
            }
            if not args.no_torch:
                cases["torch_amp_eager"] = TorchAmpTrainCase(width, batch, args.size, False)
                if args.torch_compile:
                    cases["torch_amp_compile"] = TorchAmpTrainCase(width, batch, args.size, True)
            timed = _round_rates(cases, batch, args.round_seconds, args.repeats)
            row = {
                "width": width,
                "batch": batch,
                "size": args.size,
                "devices": cases["jax"].devices,
                "jax_compute_dtype": args.fake_dtype,
                "steps_per_round": timed["steps_per_round"],
            }
            for name, case in cases.items():
                row[f"{name}_train_img_s"] = statistics.median(timed["rates"][name])
                row[f"{name}_train_img_s_rounds"] = timed["rates"][name]
                row[f"{name}_compile_s"] = case.compile_s
                row[f"{name}_peak_device_bytes"] = case.peak_bytes()
            for name in cases:
                if name != "jax":
                    row[f"ratio_jax_vs_{name}"] = (
                        row["jax_train_img_s"] / row[f"{name}_train_img_s"]
                    )
            rows.append(row)
            print(format_accelerator_row(row, list(cases)), flush=True)
    return rows


def format_accelerator_row(row: dict, names: list[str]) -> str:
    head = (
        f"ShuffleNet V2 {row['width']}x train, global batch {row['batch']}, "
        f"{row['size']}x{row['size']}, {row['devices']} {jax.default_backend()} device(s)"
    )
    lines = [head]
    for name in names:
        peak = row[f"{name}_peak_device_bytes"]
        lines.append(
            f"  {name:<18} {row[f'{name}_train_img_s']:9.1f} img/s  compile/first step "
            f"{row[f'{name}_compile_s']:.1f} s  peak memory "
            + (f"{peak / 2**30:.2f} GiB" if peak else "n/a")
            + (f"  (JAX/this {row[f'ratio_jax_vs_{name}']:.2f}x)" if name != "jax" else "")
        )
    return "\n".join(lines)


def _imagenet_config(width: float):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "imagenet.py"
    spec = importlib.util.spec_from_file_location("imagenet_config", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe.get_config(str(width))


def add_isa_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--isa",
        choices=["native", "avx2"],
        default="native",
        help="avx2: build the C++ kernels for x86-64-v3 (AVX2+FMA, 16 vector registers) and "
        "cap XLA at AVX2, so an AVX-512 machine runs what an AVX2-only one would",
    )


def apply_isa(isa: str) -> None:
    """Set the build and XLA flags for `isa`; call before the first JAX computation."""
    if isa == "avx2":
        os.environ["SHUFFLENET_JAX_MARCH"] = "x86-64-v3"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa=AVX2"


def _cpu_name() -> str:
    """lscpu's model name and the vector extensions that matter here, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line and "\t" in line)
    model = fields.get("model name\t", platform.machine()).strip()
    flags = set(fields.get("flags\t\t", "").split())
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({' '.join(vector) or 'no AVX2'}), {_cpu_count()} cores"


def _versions() -> dict:
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "machine": _cpu_name(),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "python": platform.python_version(),
        **{
            name: version(name)
            for name in ("jax", "jaxlib", "flax", "torch", "torchvision", "onnxruntime")
        },
        "ai_edge_litert": version("ai-edge-litert"),
        "tensorflow": version("tensorflow-cpu"),
    }


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


def format_row(row: dict, args: argparse.Namespace) -> str:
    lines = [f"ShuffleNet V2 {row['width']}x, batch {row['batch']}, {row['size']}x{row['size']}"]
    for mode in args.modes:
        parts = [
            f"{k.removesuffix(f'_{mode}_img_s')} {v:.1f}"
            for k, v in row.items()
            if k.endswith(f"_{mode}_img_s")
        ]
        ratio = f"JAX/PyTorch-eager-best {row[f'ratio_{mode}_vs_torch_eager']:.2f}x"
        if f"ratio_{mode}_vs_torch_compile" in row:
            ratio += f", JAX/torch.compile {row[f'ratio_{mode}_vs_torch_compile']:.2f}x"
        lines.append(f"  {mode:<5} img/s: " + ", ".join(parts) + f"  ({ratio})")
    if "jax_train_host_overhead_fraction" in row:
        lines.append(
            f"  JAX train step host overhead: {row['jax_train_host_overhead_fraction']:.1%}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--widths", type=float, nargs="+", default=[1.0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=64, help="images per timing round")
    p.add_argument(
        "--impl", default="", help="implementations, e.g. dense:lax,fused:layers (lab.variants)"
    )
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile")
    p.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        help="JAX inference without folding BatchNorm into the convolutions",
    )
    p.add_argument(
        "--xla-default-train-options",
        dest="train_options",
        action="store_const",
        const={},
        default=None,
        help="compile the JAX train step with XLA's default options instead of "
        "compiler_options.train_compiler_options() (on the CPU: the older loop emitters)",
    )
    p.add_argument(
        "--xla-default-eval-options",
        dest="eval_options",
        action="store_const",
        const={},
        default=None,
        help="compile the JAX inference step with XLA's default options instead of "
        "compiler_options.eval_compiler_options() (on the CPU: YNNPACK matmuls)",
    )
    p.add_argument(
        "--fake-data",
        action="store_true",
        help="the accelerator mode (the default when the backend is not the CPU): train.py's "
        "sharded step on device-made batches against torchvision in AMP bfloat16 on the same "
        "device kind",
    )
    p.add_argument("--fake-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--round-seconds",
        type=float,
        default=2.0,
        help="accelerator mode: each timing round runs steps for about this long",
    )
    p.add_argument("--no-torch", action="store_true", help="accelerator mode: JAX only")
    p.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE", "unset"],
        help="OMP_WAIT_POLICY for PyTorch's threads. PASSIVE (default): they sleep after each "
        "parallel region instead of spinning on the cores while the XLA step runs (batch-32 "
        "JAX train 14.7 -> 26.3 img/s, PyTorch unchanged); it slows PyTorch at batch 1, where "
        "`unset` is the fair setting (docs/performance.md)",
    )
    p.add_argument(
        "--host-malloc",
        default="reuse",
        choices=["reuse", "glibc-default"],
        help="reuse (default, as train.py and eval.py): process.setup_process() for "
        "the whole process, both frameworks; glibc-default: every step's large buffers are "
        "fresh mmaps that page-fault (docs/performance.md)",
    )
    p.add_argument(
        "--deploy",
        action="store_true",
        help="inference only: README's path against PyTorch, ONNX Runtime and LiteRT",
    )
    p.add_argument("--cases", nargs="+", default=list(DEPLOY_CASES), choices=DEPLOY_CASES)
    p.add_argument("--json", metavar="OUT")
    add_isa_option(p)
    args = p.parse_args()
    apply_isa(args.isa)
    if args.host_malloc == "reuse":
        print(*setup_process(), sep="\n")  # as train.py and eval.py do
    args.host_malloc_applied = args.host_malloc == "reuse" and cpu_is_default_backend()
    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch is imported
    if args.fake_data or jax.default_backend() != "cpu":
        rows = accelerator_training(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    _versions() | {"round_seconds": args.round_seconds, "results": rows},
                    f,
                    indent=1,
                )
        return
    if args.deploy:
        rows = deployment(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(_versions() | {"repeats": args.repeats, "results": rows}, f, indent=1)
        return
    report = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
