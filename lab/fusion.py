"""XLA fusion lab: what XLA makes of ShuffleNet V2's element-wise work, from the optimized HLO,
for this machine's own device or, without the device, for a GPU or TPU target (`--target`,
an `aot.targets` name).

    python -m lab.fusion                      # unit variants side by side, forward, here
    python -m lab.fusion --subject net --mode train --compare shuffle
    python -m lab.fusion --subject pair --compare shuffle --save-hlo hlo/
    python -m lab.fusion --subject unit --mode train --target h100 --dtype bfloat16

Subjects: `unit` (one stride-1 ShuffleUnit), `pair` (two stride-1 units: concat + shuffle + the
next unit's split), `block` (1x1 conv + BatchNorm + ReLU), `net` (the whole ShuffleNetV2).
Modes: `forward` (eval mode) or `train` (train-mode loss and its gradient). For each variant the
report gives, from XLA's module objects (`shufflenet_jax.aot.hlo`): fusions by kind, library
calls (cuDNN, cuBLAS, Triton, XLA:CPU's), the kernels launched, operations left outside fusions
(transposes, copies, concatenates, ...), the bytes the kernels read and write, flops, XLA's own
bytes accessed where it gives them (CPU, TPU), its memory analysis, and for this machine's own
device the measured time (median of --repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lab import variants as impls
from shufflenet_jax import ops
from shufflenet_jax.aot import hlo, targets
from shufflenet_jax.model.inference import split_model
from shufflenet_jax.model.network import ShuffleUnit, abstract_model, with_values
from shufflenet_jax.train import parallel


@dataclasses.dataclass
class FusionReport:
    """What XLA compiled one function into, for one target."""

    name: str
    fusions: dict[str, int]  # fusion kind (kLoop, kInput, kOutput, kCustom) -> count
    unfused: dict[str, int]  # opcode -> count: kernels outside fusions and library calls
    library_calls: dict[str, int]  # custom-call target or kCustom fusion backend -> count
    data_movement_fusions: list[dict[str, int]]  # bodies holding a concat/transpose/gather
    library_fusions: list[dict[str, int]]  # bodies of kCustom fusions (a GEMM and its epilogue)
    launches: int  # kernels launched per call
    flops: float  # XLA's cost analysis of the unoptimized module (the same on every target)
    hbm_bytes: int  # sum over the kernels of their operands and results (aot.hlo.kernels)
    bytes_accessed: float | None  # XLA's own cost analysis (CPU, TPU); None on GPUs
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    seconds: float | None  # measured on this machine's device ("local") only
    spread: float | None  # the timed runs' interquartile range over their median

    def summary(self) -> dict[str, Any]:
        keep = ("transpose", "copy", "concatenate", "gather", "slice", "convolution", "dot")
        return {
            "fusions": sum(self.fusions.values()),
            **{f"unfused_{k}": self.unfused.get(k, 0) for k in keep},
            "library_calls": sum(self.library_calls.values()),
            "launches": self.launches,
            "gflops": self.flops / 1e9,
            "mb_moved": self.hbm_bytes / 2**20,
            "mb_accessed": None if self.bytes_accessed is None else self.bytes_accessed / 2**20,
            "temp_mb": self.temp_bytes / 2**20,
            "ms": None if self.seconds is None else 1e3 * self.seconds,
            "iqr_pct": None if self.spread is None else 100 * self.spread,
        }


def _median_seconds(run: Callable[[], Any], repeats: int) -> tuple[float | None, float | None]:
    """The median of `repeats` timed runs after a warm-up, and their interquartile range
    relative to it (how far apart two programs' times must be to tell them apart here)."""
    if not repeats:
        return None, None
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if repeats < 2:
        return median, None
    q1, _, q3 = statistics.quantiles(times, n=4)
    return median, (q3 - q1) / median


def _on_device(args: Sequence[Any], target: str) -> list[Any]:
    """`args` as shapes on one device of `target` (an `aot.targets` name; nothing is
    materialized there), or unchanged for this machine's own device ("local")."""
    if target == "local":
        return list(args)
    one = parallel.replicated(targets.make_mesh(targets.get(target), 1))
    return [
        jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), arg)
        for arg in args
    ]


def analyze(
    fn: Callable | Sequence[Callable],
    *args: Any,
    name: str = "",
    repeats: int = 5,
    save_hlo: str | Path | None = None,
    target: str = "local",
) -> FusionReport:
    """Compile `fn(*args)` for `target` ("local": this machine's default device, or an
    `aot.targets` name: one of its devices), count its optimized HLO, and where it runs here
    time it (median of `repeats`; 0: skip).

    `fn` may be a sequence of stage functions `stage(*args[:-1], x) -> x`, each compiled on its
    own and run one after the other (what an op-by-op framework does): the counts, flops and
    bytes are summed over the stages, the time is that of the whole chain."""
    stages = list(fn) if isinstance(fn, Sequence) else [fn]
    *fixed, x = _on_device(args, target)
    compiled, lowered = [], []
    for i, stage in enumerate(stages):
        lowered.append(jax.jit(stage).lower(*fixed, x))
        compiled.append(lowered[-1].compile())
        if i + 1 < len(stages):
            x = jax.eval_shape(stage, *fixed, x)
    if save_hlo is not None:
        Path(save_hlo).parent.mkdir(parents=True, exist_ok=True)
        Path(save_hlo).write_text("\n\n".join(c.as_text() for c in compiled))
    counts = _count(lowered, compiled)

    def run_chain():
        y = args[-1]
        for c in compiled:
            y = c(*args[:-1], y)
        return y

    seconds, spread = _median_seconds(run_chain, repeats if target == "local" else 0)
    return FusionReport(
        name=name,
        **counts,
        argument_bytes=int(compiled[0].memory_analysis().argument_size_in_bytes),
        output_bytes=int(compiled[-1].memory_analysis().output_size_in_bytes),
        seconds=seconds,
        spread=spread,
    )


def _count(lowered: list[Any], compiled: list[Any]) -> dict[str, Any]:
    """The `FusionReport` fields summed over compiled stages, from their optimized modules."""
    fusions, unfused, library, movement, library_bodies = Counter(), Counter(), Counter(), [], []
    launches = moved = temp = 0
    flops, costs = 0.0, []
    for lo, c in zip(lowered, compiled, strict=True):
        mod = hlo.optimized(c)
        k = hlo.kernels(mod)
        fusions, unfused = fusions + Counter(k.fusions), unfused + Counter(k.unfused)
        library += Counter(k.library_calls)
        launches, moved = launches + k.launches, moved + k.hbm_bytes
        for kind, body in hlo.fusion_bodies(mod):
            if body.keys() & {"concatenate", "transpose", "gather"}:
                movement.append(dict(body))
            if kind == "kCustom":
                library_bodies.append(dict(body))
        flops += hlo.flops(lo)
        costs.append(hlo.xla_cost_analysis(c).get("bytes accessed"))
        temp = max(temp, int(c.memory_analysis().temp_size_in_bytes))
    return dict(
        fusions=dict(fusions),
        unfused=dict(unfused),
        library_calls=dict(library),
        data_movement_fusions=movement,
        library_fusions=library_bodies,
        launches=launches,
        flops=flops,
        hbm_bytes=moved,
        bytes_accessed=None if None in costs else sum(map(float, costs)),
        temp_bytes=temp,
    )


# ---- the functions to compile -------------------------------------------------------------


def _random_model(model: Any, seed: int = 0) -> Any:
    """Fill an abstract module with random weights and positive BN variances (no compiling)."""
    rng = np.random.default_rng(seed)
    values = nnx.to_pure_dict(nnx.state(model))

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return x * np.float32(np.sqrt(2.0 / np.prod(leaf.shape[:-1])))
        return np.abs(x) + np.float32(0.5) if name in ("scale", "var") else np.float32(0.1) * x

    return with_values(model, jax.tree_util.tree_map_with_path(draw, values))


def _merged(graphdef: Any, params: Any, stats: Any, dtype: Any, train: bool) -> Any:
    """The module with its parameters cast to the compute `dtype` (BatchNorm statistics stay
    float32), in training or eval mode: what the train and eval steps do."""
    m = nnx.merge(graphdef, jax.tree.map(lambda a: a.astype(dtype), params), stats, copy=True)
    m.train() if train else m.eval()
    return m


def _mean_square(m: Any, x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(m(x).astype(jnp.float32)))


def _as_pure(
    model: Any, mode: str, loss: Callable[[Any, jax.Array], jax.Array], dtype: Any = jnp.float32
):
    """(f, params, stats): `f(params, stats, x)` is the eval forward or the train-mode gradient,
    computed in `dtype` (float32 parameters and statistics, as in training)."""
    graphdef, params, stats = split_model(model)

    if mode == "forward":

        def f(params, stats, x):
            return _merged(graphdef, params, stats, dtype, False)(x.astype(dtype))

    elif mode == "train":

        def f(params, stats, x):
            def objective(p):
                return loss(_merged(graphdef, p, stats, dtype, True), x.astype(dtype))

            return jax.grad(objective)(params)

    else:
        raise ValueError(f"mode must be forward or train, got {mode!r}")
    return f, params, stats


def unit_case(channels: int, shuffle: str, depthwise: str, mode: str, dtype: Any = jnp.float32):
    """One stride-1 ShuffleUnit."""
    unit = nnx.eval_shape(
        lambda: ShuffleUnit(
            channels,
            channels,
            1,
            impl=impls.named_impl(shuffle=shuffle, depthwise=depthwise),
            rngs=nnx.Rngs(0),
        )
    )
    return _as_pure(_random_model(unit), mode, _mean_square, dtype)


class UnitPair(nnx.Module):
    """Two stride-1 units. `shuffle="folded"`: no shuffle op between them; the second unit reads
    its split from the unshuffled concatenation, with the branch's 1x1 conv weights permuted
    (the part of the shuffle a weight permutation can absorb) and the pass-through half
    interleaved from two quarter slices (the part it cannot: no weights touch it)."""

    def __init__(self, channels: int, shuffle: str, depthwise: str, rngs: nnx.Rngs):
        impl = "transpose" if shuffle == "folded" else shuffle
        kw = dict(impl=impls.named_impl(shuffle=impl, depthwise=depthwise), rngs=rngs)
        self.first = ShuffleUnit(channels, channels, 1, **kw)
        self.second = ShuffleUnit(channels, channels, 1, **kw)
        self.folded = shuffle == "folded"

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.folded:
            return self.second(self.first(x))
        x1, x2 = jnp.split(x, 2, axis=-1)
        a, b = x1, self.first.branch2(x2)  # the first unit's concat is [a, b], unshuffled
        q = a.shape[-1] // 2
        # shuffle(a, b) interleaves them: its halves interleave a[:q], b[:q] and a[q:], b[q:]
        passthrough = impls.channel_shuffle_stack(jnp.concatenate([a[..., :q], b[..., :q]], -1), 2)
        first_conv, *rest = self.second.branch2.layers
        w = first_conv.kernel[...]  # (1, 1, C/2 in, C/2 out); input k of the branch is shuffled k
        y = ops.pointwise_dot(a[..., q:], w[:, :, 0::2]) + ops.pointwise_dot(
            b[..., q:], w[:, :, 1::2]
        )
        for layer in rest:
            y = layer(y)
        return ops.channel_shuffle(jnp.concatenate([passthrough, y], -1), 2)


def pair_case(channels: int, shuffle: str, depthwise: str, mode: str, dtype: Any = jnp.float32):
    pair = nnx.eval_shape(lambda: UnitPair(channels, shuffle, depthwise, nnx.Rngs(0)))
    return _as_pure(_random_model(pair), mode, _mean_square, dtype)


class ConvBnRelu(nnx.Module):
    """1x1 conv, BatchNorm, ReLU: the element-wise tail every ShuffleNet conv has."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        from shufflenet_jax.model.layers import BatchNorm, Conv2d

        self.conv = Conv2d(channels, channels, 1, rngs=rngs)
        self.bn = BatchNorm(channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


def block_case(channels: int, bn_relu: str, mode: str, dtype: Any = jnp.float32):
    """`bn_relu="fused"`: one compiled function; `"separate"`: conv, BN and ReLU compiled as
    three programs run in turn, each writing its result to memory (forward only). An
    optimization barrier cannot stand in for the latter: XLA's CPU pipeline removes barriers
    before fusing."""
    block = _random_model(nnx.eval_shape(lambda: ConvBnRelu(channels, nnx.Rngs(0))))
    f, params, stats = _as_pure(block, mode, _mean_square, dtype)
    if bn_relu == "fused":
        return f, params, stats
    if bn_relu != "separate" or mode != "forward":
        raise ValueError("bn_relu is 'fused', or 'separate' in forward mode")
    graphdef = nnx.graphdef(block)

    def stage(pick):
        def run(params, stats, x):
            return pick(_merged(graphdef, params, stats, dtype, False), x.astype(dtype))

        return run

    stages = [
        stage(lambda m, x: m.conv(x)),
        stage(lambda m, x: m.bn(x)),
        stage(lambda m, x: nnx.relu(x)),
    ]
    return stages, params, stats


def net_case(width: float, shuffle: str, depthwise: str, mode: str, dtype: Any = jnp.float32):
    model = abstract_model(width, 1000, impl=impls.named_impl(shuffle=shuffle, depthwise=depthwise))

    def loss(m, x):
        logits = m(x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.zeros(x.shape[0], jnp.int32)
        ).mean()

    return _as_pure(_random_model(model), mode, loss, dtype)


SHUFFLES = ("transpose", "stack", "gather")
DEPTHWISE = tuple(sorted(impls.DEPTHWISE))


def variants(target: str, compare: str) -> list[dict[str, str]]:
    """The variant settings to compare for `target` ("shuffle", "depthwise", "bn_relu", "all")."""
    if target == "block":
        return [{"bn_relu": "fused"}, {"bn_relu": "separate"}]
    shuffles = SHUFFLES + (("folded",) if target == "pair" else ())
    out = []
    if compare in ("shuffle", "all"):
        out += [{"shuffle": s, "depthwise": "shifted"} for s in shuffles]
    if compare in ("depthwise", "all"):
        out += [{"shuffle": "transpose", "depthwise": d} for d in DEPTHWISE if d != "shifted"]
    if not out:
        raise ValueError(f"--compare {compare!r} does not apply to --target {target}")
    return out


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SUBJECTS = ["unit", "pair", "block", "net"]


def build(target: str, variant: dict[str, str], args: argparse.Namespace):
    """(f, params, stats, x) for one variant."""
    dtype = DTYPES[args.dtype]
    if target == "net":
        f, p, s = net_case(args.width, variant["shuffle"], variant["depthwise"], args.mode, dtype)
        channels = 3
    elif target == "block":
        f, p, s = block_case(args.channels, variant["bn_relu"], args.mode, dtype)
        channels = args.channels
    else:
        case = unit_case if target == "unit" else pair_case
        f, p, s = case(args.channels, variant["shuffle"], variant["depthwise"], args.mode, dtype)
        channels = args.channels
    x = jax.random.normal(jax.random.key(0), (args.batch, args.size, args.size, channels))
    return f, p, s, x


COLUMNS = {  # summary key -> table heading
    "fusions": "fusions",
    "library_calls": "library",
    "launches": "kernels",
    "unfused_transpose": "transp",
    "unfused_copy": "copy",
    "unfused_concatenate": "concat",
    "unfused_gather": "gather",
    "gflops": "gflops",
    "mb_moved": "MB moved",
    "mb_accessed": "MB acc",
    "temp_mb": "temp MB",
    "ms": "ms",
    "iqr_pct": "IQR %",
}


def format_table(rows: list[dict[str, Any]]) -> str:
    """A header line and a line per row: the variant, then `COLUMNS`."""

    def cell(v: Any) -> str:
        return f"{v:9.3f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>9s}"

    lines = [f"{'variant':36s} " + " ".join(f"{h:>9s}" for h in COLUMNS.values())]
    for r in rows:
        lines.append(f"{r['variant']:36s} " + " ".join(cell(r[c]) for c in COLUMNS))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in variants(args.subject, args.compare):
        label = ",".join(f"{k}={v}" for k, v in variant.items())
        f, p, s, x = build(args.subject, variant, args)
        hlo_file = None
        if args.save_hlo:
            stem = f"{args.target}_{args.dtype}_{args.subject}_{args.mode}_{label}"
            hlo_file = Path(args.save_hlo) / (stem.replace(",", "_").replace(":", "") + ".txt")
        report = analyze(
            f, p, s, x, name=label, repeats=args.repeats, save_hlo=hlo_file, target=args.target
        )
        row = {
            "variant": label,
            **report.summary(),
            "fusion_kinds": report.fusions,
            "unfused_ops": report.unfused,
            "library_call_targets": report.library_calls,
            "flops": report.flops,
            "hbm_bytes": report.hbm_bytes,
            "bytes_accessed": report.bytes_accessed,
            "data_movement_fusions": report.data_movement_fusions,
            "library_fusions": report.library_fusions,
        }
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        if args.evidence:
            for body in report.data_movement_fusions:
                print(f"    a fusion holding {dict(sorted(body.items()))}")
            for body in report.library_fusions:
                print(f"    a library fusion holding {dict(sorted(body.items()))}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--subject", choices=SUBJECTS, default="unit", help="what is compiled")
    p.add_argument("--mode", choices=["forward", "train"], default="forward")
    p.add_argument(
        "--target",
        choices=["local", *targets.TARGETS, *SUBJECTS],
        default="local",
        help="compile for this machine's default device (and time it) or, without the device, "
        "for one device of an accelerator target (needs the [aot] extra)",
    )
    p.add_argument("--platform", choices=["local", *targets.TARGETS], help="old name of --target")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="compute dtype")
    p.add_argument(
        "--compare",
        choices=["shuffle", "depthwise", "all"],
        default="all",
        help="which variants to compile side by side (block: BN+ReLU fused/separate)",
    )
    p.add_argument("--channels", type=int, default=116, help="unit/pair/block channels")
    p.add_argument("--width", type=float, default=1.0, help="net width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="spatial size (default: 28 for unit/pair/block, 224 for net)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed runs (median); 0: no timing")
    p.add_argument("--save-hlo", help="directory for the optimized HLO text of each variant")
    p.add_argument("--json", help="write the rows as JSON")
    p.add_argument(
        "--evidence",
        action="store_true",
        help="print the ops of each fusion holding a concatenate/transpose/gather, and of each "
        "library (kCustom) fusion",
    )
    args = p.parse_args(argv)
    if args.target in SUBJECTS:  # --target was the subject's option before it named a machine
        print(f"warning: --target {args.target} is deprecated; use --subject {args.target}")
        args.subject, args.target = args.target, "local"
    if args.platform is not None:
        print(
            "warning: --platform is deprecated and will be removed; use --target", file=sys.stderr
        )
        args.target = args.platform
    if args.size is None:
        args.size = 224 if args.subject == "net" else 28
    if args.target != "local":
        targets.check_plugin(targets.get(args.target))
        jax.config.update("jax_platforms", "cpu")  # the plugins' own devices are not needed
    print(
        f"{args.subject} {args.mode} {args.dtype} for {args.target}: batch {args.batch}, "
        f"{args.size}x{args.size}" + ("" if args.subject == "net" else f", {args.channels} ch")
    )
    print(format_table([]))
    rows = run(args)
    if args.target == "local" and args.repeats:
        print(
            f"ms: the median of {args.repeats} runs; IQR %: their interquartile range over it. "
            "Times closer than the larger IQR are the same within this machine's noise."
        )
    if args.json:
        keys = ("target", "dtype", "subject", "mode", "batch", "size")
        summary = {k: getattr(args, k) for k in keys} | {"jax": jax.__version__, "rows": rows}
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
