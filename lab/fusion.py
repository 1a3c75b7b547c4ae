"""XLA fusion lab: what XLA makes of ShuffleNet V2's element-wise work, from the optimized HLO.

    python -m lab.fusion                      # unit variants side by side, forward
    python -m lab.fusion --target net --mode train --compare shuffle
    python -m lab.fusion --target pair --compare shuffle --save-hlo hlo/

Targets: `unit` (one stride-1 ShuffleUnit), `pair` (two stride-1 units: concat + shuffle + the
next unit's split), `block` (1x1 conv + BatchNorm + ReLU), `net` (the whole ShuffleNetV2).
Modes: `forward` (eval mode) or `train` (train-mode loss and its gradient). For each variant the
report gives fusions by kind, the operations left outside fusions (transposes, copies,
concatenates, ...), custom calls (library kernels), XLA's cost analysis (flops, bytes accessed),
its memory analysis, and the measured time (median of --repeats).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import statistics
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
from shufflenet_jax.model.network import ShuffleUnit, abstract_model, with_values

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class FusionReport:
    """What XLA compiled one function into."""

    name: str
    fusions: dict[str, int]  # fusion kind (kLoop, kInput, kOutput, ...) -> count
    standalone: dict[str, int]  # opcode -> count, outside fused computations
    custom_calls: dict[str, int]  # custom_call_target -> count
    data_movement_fusions: list[
        dict[str, int]
    ]  # opcodes of each fusion holding a concat/transpose/gather
    flops: float
    bytes_accessed: float
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    seconds: float | None

    def summary(self) -> dict[str, Any]:
        keep = ("transpose", "copy", "concatenate", "gather", "slice", "convolution", "dot")
        return {
            "fusions": sum(self.fusions.values()),
            **{f"standalone_{k}": self.standalone.get(k, 0) for k in keep},
            "custom_calls": sum(self.custom_calls.values()),
            "gflops": self.flops / 1e9,
            "mb_accessed": self.bytes_accessed / 2**20,
            "temp_mb": self.temp_bytes / 2**20,
            "ms": None if self.seconds is None else 1e3 * self.seconds,
        }


def _split_type_and_rest(text: str) -> tuple[str, str]:
    """`f32[2]{0} add(a, b), ...` or `(f32[2], s32[]) tuple(...)` -> (type, rest)."""
    if text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return text[: i + 1], text[i + 1 :].lstrip()
    head, _, rest = text.partition(" ")
    return head, rest


def parse_hlo(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """Computations of an HLO module: name -> [(instruction name, opcode, the rest)]."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = "ENTRY" if m.group(1) else m.group(2)
            computations[current] = []
            continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(line)
        if m:
            _, rest = _split_type_and_rest(m.group(2))
            opcode = rest.split("(", 1)[0].strip()
            computations[current].append((m.group(1), opcode, rest))
    return computations


def data_movement_fusions(text: str) -> list[dict[str, int]]:
    """The opcode counts of every fusion body that contains a concatenate, transpose or gather:
    where the channel concat / shuffle / split went, and what it was fused with."""
    computations = parse_hlo(text)
    fused = set()
    for instructions in computations.values():
        for _, opcode, rest in instructions:
            if opcode == "fusion":
                fused.update(re.findall(r"calls=%?([\w.\-]+)", rest))
    out = []
    for name in sorted(fused):
        ops_in = Counter(op for _, op, _ in computations.get(name, []) if op != "parameter")
        if ops_in.keys() & {"concatenate", "transpose", "gather"}:
            out.append(dict(ops_in))
    return out


def count_hlo(text: str) -> tuple[Counter, Counter, Counter]:
    """(fusions by kind, standalone opcodes, custom-call targets) of an optimized HLO module.

    Standalone means in a computation that is neither a fusion body (`calls=` of a fusion) nor a
    reducer/comparator (`to_apply=`): what runs as its own kernel or copy."""
    computations = parse_hlo(text)
    fused, applied = set(), set()
    for instructions in computations.values():
        for _, opcode, rest in instructions:
            for callee in re.findall(r"calls=%?([\w.\-]+)", rest):
                if opcode == "fusion":
                    fused.add(callee)
            applied.update(re.findall(r"to_apply=%?([\w.\-]+)", rest))
    fusions, standalone, custom = Counter(), Counter(), Counter()
    for name, instructions in computations.items():
        if name in fused or name in applied:
            continue
        for _, opcode, rest in instructions:
            if opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
                continue
            standalone[opcode] += 1
            if opcode == "fusion":
                kind = re.search(r"kind=(\w+)", rest)
                fusions[kind.group(1) if kind else "?"] += 1
            if opcode == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', rest)
                custom[target.group(1) if target else "?"] += 1
    return fusions, standalone, custom


def _median_seconds(run: Callable[[], Any], repeats: int) -> float | None:
    if not repeats:
        return None
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def analyze(
    fn: Callable | Sequence[Callable],
    *args: Any,
    name: str = "",
    repeats: int = 5,
    save_hlo: str | Path | None = None,
) -> FusionReport:
    """Compile `fn(*args)`, count its optimized HLO, and time it (median of `repeats`; 0: skip).

    `fn` may be a sequence of stage functions `stage(*args[:-1], x) -> x`, each compiled on its
    own and run one after the other (what an op-by-op framework does): the counts, flops and
    bytes are summed over the stages, the time is that of the whole chain."""
    stages = list(fn) if isinstance(fn, Sequence) else [fn]
    *fixed, x = args
    compiled, texts = [], []
    for i, stage in enumerate(stages):
        c = jax.jit(stage).lower(*fixed, x).compile()
        compiled.append(c)
        texts.append(c.as_text())
        if i + 1 < len(stages):
            x = jax.eval_shape(stage, *fixed, x)
    if save_hlo is not None:
        Path(save_hlo).parent.mkdir(parents=True, exist_ok=True)
        Path(save_hlo).write_text("\n\n".join(texts))
    fusions, standalone, custom, movement = Counter(), Counter(), Counter(), []
    flops = bytes_accessed = 0.0
    temp = 0
    for c, text in zip(compiled, texts, strict=True):
        f, s, k = count_hlo(text)
        fusions, standalone, custom = fusions + f, standalone + s, custom + k
        movement += data_movement_fusions(text)
        cost = c.cost_analysis() or {}
        flops += float(cost.get("flops", 0.0))
        bytes_accessed += float(cost.get("bytes accessed", 0.0))
        temp = max(temp, int(getattr(c.memory_analysis(), "temp_size_in_bytes", 0)))

    def run_chain():
        y = args[-1]
        for c in compiled:
            y = c(*fixed, y)
        return y

    memory_first, memory_last = compiled[0].memory_analysis(), compiled[-1].memory_analysis()
    return FusionReport(
        name=name,
        fusions=dict(fusions),
        standalone=dict(standalone),
        custom_calls=dict(custom),
        data_movement_fusions=movement,
        flops=flops,
        bytes_accessed=bytes_accessed,
        temp_bytes=temp,
        argument_bytes=int(getattr(memory_first, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(memory_last, "output_size_in_bytes", 0)),
        seconds=_median_seconds(run_chain, repeats),
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


def _as_pure(model: Any, mode: str, loss: Callable[[Any, jax.Array], jax.Array]):
    """(f, params, stats): `f(params, stats, x)` is the eval forward or the train-mode gradient."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    if mode == "forward":

        def f(params, stats, x):
            m = nnx.merge(graphdef, params, stats, copy=True)
            m.eval()
            return m(x)

    elif mode == "train":

        def f(params, stats, x):
            def objective(p):
                m = nnx.merge(graphdef, p, stats, copy=True)
                m.train()
                return loss(m, x)

            return jax.grad(objective)(params)

    else:
        raise ValueError(f"mode must be forward or train, got {mode!r}")
    return f, params, stats


def unit_case(channels: int, shuffle: str, depthwise: str, mode: str):
    """One stride-1 ShuffleUnit."""
    unit = nnx.eval_shape(
        lambda: ShuffleUnit(
            channels,
            channels,
            1,
            ops=impls.named_ops(shuffle=shuffle, depthwise=depthwise),
            rngs=nnx.Rngs(0),
        )
    )
    return _as_pure(_random_model(unit), mode, lambda m, x: jnp.mean(m(x) ** 2))


class UnitPair(nnx.Module):
    """Two stride-1 units. `shuffle="folded"`: no shuffle op between them; the second unit reads
    its split from the unshuffled concatenation, with the branch's 1x1 conv weights permuted
    (the part of the shuffle a weight permutation can absorb) and the pass-through half
    interleaved from two quarter slices (the part it cannot: no weights touch it)."""

    def __init__(self, channels: int, shuffle: str, depthwise: str, rngs: nnx.Rngs):
        impl = "transpose" if shuffle == "folded" else shuffle
        kw = dict(ops=impls.named_ops(shuffle=impl, depthwise=depthwise), rngs=rngs)
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
        passthrough = ops.channel_shuffle_stack(jnp.concatenate([a[..., :q], b[..., :q]], -1), 2)
        first_conv, *rest = self.second.branch2.layers
        w = first_conv.kernel[...]  # (1, 1, C/2 in, C/2 out); input k of the branch is shuffled k
        y = ops.pointwise_dot(a[..., q:], w[:, :, 0::2]) + ops.pointwise_dot(
            b[..., q:], w[:, :, 1::2]
        )
        for layer in rest:
            y = layer(y)
        return ops.channel_shuffle(jnp.concatenate([passthrough, y], -1), 2)


def pair_case(channels: int, shuffle: str, depthwise: str, mode: str):
    pair = nnx.eval_shape(lambda: UnitPair(channels, shuffle, depthwise, nnx.Rngs(0)))
    return _as_pure(_random_model(pair), mode, lambda m, x: jnp.mean(m(x) ** 2))


class ConvBnRelu(nnx.Module):
    """1x1 conv, BatchNorm, ReLU: the element-wise tail every ShuffleNet conv has."""

    def __init__(self, channels: int, rngs: nnx.Rngs):
        from shufflenet_jax.model.layers import BatchNorm, Conv2d

        self.conv = Conv2d(channels, channels, 1, rngs=rngs)
        self.bn = BatchNorm(channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(self.bn(self.conv(x)))


def block_case(channels: int, bn_relu: str, mode: str):
    """`bn_relu="fused"`: one compiled function; `"separate"`: conv, BN and ReLU compiled as
    three programs run in turn, each writing its result to memory (forward only). An
    optimization barrier cannot stand in for the latter: XLA's CPU pipeline removes barriers
    before fusing."""
    block = _random_model(nnx.eval_shape(lambda: ConvBnRelu(channels, nnx.Rngs(0))))
    f, params, stats = _as_pure(block, mode, lambda m, x: jnp.mean(m(x) ** 2))
    if bn_relu == "fused":
        return f, params, stats
    if bn_relu != "separate" or mode != "forward":
        raise ValueError("bn_relu is 'fused', or 'separate' in forward mode")
    graphdef = nnx.graphdef(block)

    def stage(pick):
        def run(params, stats, x):
            m = nnx.merge(graphdef, params, stats, copy=True)
            m.eval()
            return pick(m, x)

        return run

    stages = [
        stage(lambda m, x: m.conv(x)),
        stage(lambda m, x: m.bn(x)),
        stage(lambda m, x: nnx.relu(x)),
    ]
    return stages, params, stats


def net_case(width: float, shuffle: str, depthwise: str, mode: str):
    model = abstract_model(width, 1000, ops=impls.named_ops(shuffle=shuffle, depthwise=depthwise))

    def loss(m, x):
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, jnp.zeros(x.shape[0], jnp.int32)
        ).mean()

    return _as_pure(_random_model(model), mode, loss)


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


def build(target: str, variant: dict[str, str], args: argparse.Namespace):
    """(f, params, stats, x) for one variant."""
    if target == "net":
        f, p, s = net_case(args.width, variant["shuffle"], variant["depthwise"], args.mode)
        x = jnp.ones((args.batch, args.size, args.size, 3))
    elif target == "block":
        f, p, s = block_case(args.channels, variant["bn_relu"], args.mode)
        x = jnp.ones((args.batch, args.size, args.size, args.channels))
    else:
        case = unit_case if target == "unit" else pair_case
        f, p, s = case(args.channels, variant["shuffle"], variant["depthwise"], args.mode)
        x = jnp.ones((args.batch, args.size, args.size, args.channels))
    x = jax.random.normal(jax.random.key(0), x.shape)
    return f, p, s, x


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [
        "variant",
        "fusions",
        "standalone_transpose",
        "standalone_copy",
        "standalone_concatenate",
        "standalone_gather",
        "custom_calls",
        "gflops",
        "mb_accessed",
        "temp_mb",
        "ms",
    ]
    short = {
        "standalone_transpose": "transp",
        "standalone_copy": "copy",
        "standalone_concatenate": "concat",
        "standalone_gather": "gather",
        "custom_calls": "custom",
        "mb_accessed": "MB acc",
        "temp_mb": "temp MB",
    }
    head = " ".join(f"{short.get(c, c):>9s}" if c != "variant" else f"{c:36s}" for c in cols)
    lines = [head]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if c == "variant":
                cells.append(f"{v:36s}")
            elif isinstance(v, float):
                cells.append(f"{v:9.3f}")
            else:
                cells.append(f"{v!s:>9s}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for variant in variants(args.target, args.compare):
        label = ",".join(f"{k}={v}" for k, v in variant.items())
        f, p, s, x = build(args.target, variant, args)
        hlo = None
        if args.save_hlo:
            hlo = Path(args.save_hlo) / f"{args.target}_{args.mode}_{label.replace(',', '_')}.txt"
        report = analyze(f, p, s, x, name=label, repeats=args.repeats, save_hlo=hlo)
        row = {
            "variant": label,
            **report.summary(),
            "fusion_kinds": report.fusions,
            "standalone_ops": report.standalone,
            "custom_call_targets": report.custom_calls,
            "flops": report.flops,
            "bytes_accessed": report.bytes_accessed,
            "data_movement_fusions": report.data_movement_fusions,
        }
        rows.append(row)
        print(format_table([row]).splitlines()[-1], flush=True)
        if args.evidence:
            for body in report.data_movement_fusions:
                print(f"    a fusion holding {dict(sorted(body.items()))}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", choices=["unit", "pair", "block", "net"], default="unit")
    p.add_argument("--mode", choices=["forward", "train"], default="forward")
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
        help="print the ops of each fusion holding a concatenate/transpose/gather",
    )
    args = p.parse_args(argv)
    if args.size is None:
        args.size = 224 if args.target == "net" else 28
    print(
        f"{args.target} {args.mode} on {jax.devices()[0].platform}: batch {args.batch}, "
        f"{args.size}x{args.size}" + ("" if args.target == "net" else f", {args.channels} ch")
    )
    print(format_table([]))
    rows = run(args)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "target": args.target,
                    "mode": args.mode,
                    "batch": args.batch,
                    "size": args.size,
                    "rows": rows,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
