"""Where a JAX ShuffleNet V2 step spends its time, by XLA operation, from a profiler trace.

    python benchmarks/profile_step.py [--mode train|infer] [--batch 32] [--steps 3]
        [--xla-default-train-options] [--top 15] [--json OUT]

Traces `--steps` steady-state calls of benchmarks/throughput.py's JAX step with
`jax.profiler` and sums the duration of every executed XLA thunk (fusions, YNNPACK/XNNPACK
library calls, copies) per step: by kind (the fusion's name without its number, e.g.
`slice_select_fusion`) and for the most expensive single operations, with their output shapes
from the compiled HLO. Durations are thread time: operations on the two threads overlap, so
the total can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import JaxCase  # noqa: E402

from shufflenet_jax.process import setup_process  # noqa: E402

_NOT_OPS = ("ThunkExecutor", "$", "Pjit", "SlinkyThreadPool", "end: ")


def op_durations(trace_dir: Path) -> dict[str, float]:
    """Total microseconds per executed operation name in the trace under `trace_dir`."""
    (path,) = trace_dir.glob("plugins/profile/*/*.trace.json.gz")
    events = json.load(gzip.open(path))["traceEvents"]
    totals: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
            totals[e["name"]] += e["dur"]
    return totals


def hlo_shapes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> output shape, from compiled HLO text."""
    return dict(re.findall(r"^\s+%(\S+) = (\S+\[[^\]]*\])", hlo_text, re.M))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", default="train", choices=["train", "infer"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--xla-default-train-options", action="store_true")
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    print(*setup_process(), sep="\n")  # as train.py and eval.py do
    options = {} if args.xla_default_train_options else None
    case = JaxCase(args.width, args.batch, args.size, True, options)
    step = getattr(case, args.mode)
    step()
    step()
    if args.mode == "train":
        hlo = case.train_step.lower(case.state, case.batch)
    else:
        hlo = case.predict.lower(*case.infer_state, case.x)
    shapes = hlo_shapes(hlo.compile().as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall_ms = 1e3 * (time.perf_counter() - start) / args.steps
        jax.profiler.stop_trace()
        ops = {k: v / 1e3 / args.steps for k, v in op_durations(Path(tmp)).items()}
    kinds: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for name, ms in ops.items():
        kind = kinds[re.sub(r"\.\d+$", "", name)]
        kind[0] += ms
        kind[1] += 1
    total = sum(ops.values())
    print(
        f"{args.mode} step, {args.width}x, batch {args.batch}: wall {wall_ms:.1f} ms per step "
        f"(traced), operations {total:.1f} ms of thread time"
    )
    print(f"{'kind':<34}{'ms/step':>9}{'share':>8}{'ops':>6}")
    by_kind = sorted(kinds.items(), key=lambda kv: -kv[1][0])
    for kind, (ms, count) in by_kind[: args.top]:
        print(f"{kind:<34}{ms:9.1f}{ms / total:8.1%}{count:6d}")
    print(f"\n{'operation':<34}{'ms/step':>9}  output")
    top_ops = sorted(ops.items(), key=lambda kv: -kv[1])[: args.top]
    for name, ms in top_ops:
        print(f"{name:<34}{ms:9.1f}  {shapes.get(name, '')}")
    if args.json:
        report = {
            "mode": args.mode,
            "width": args.width,
            "batch": args.batch,
            "backend": jax.default_backend(),
            "wall_ms": wall_ms,
            "thread_ms": total,
            "kinds": {k: {"ms": v[0], "ops": v[1]} for k, v in by_kind},
            "top_ops": [{"name": n, "ms": ms, "shape": shapes.get(n, "")} for n, ms in top_ops],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
