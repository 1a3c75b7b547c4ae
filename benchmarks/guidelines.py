"""The paper's guideline experiments (Tables 1-4) on the current JAX backend.

    python benchmarks/guidelines.py [--batch 1] [--repeats 20] [--multiplier 1] [--json OUT]

Every table is printed in the paper's shape: each network's multiply-accumulates, XLA's flop
count, our measured batches/s (median of --repeats timed calls after a warm-up, 56x56 inputs,
forward only, float32) beside the paper's GPU batches/s (GTX 1080Ti) and, for Table 1, ARM
images/s (Snapdragon 810). The setups and the assumptions where the paper is silent are in
shufflenet_jax/guidelines.py. Rows of a table are run alternately, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax

from lab import guidelines


def measure(rows, batch: int, repeats: int) -> list[dict]:
    compiled = []
    for row in rows:
        fn, args = row.build(batch)
        c = jax.jit(fn).lower(*args).compile()
        cost = c.cost_analysis() or {}
        jax.block_until_ready(c(*args))
        compiled.append((row, c, args, float(cost.get("flops", 0.0))))
    times = {row.label: [] for row in rows}
    for _ in range(repeats):
        for row, c, args, _ in compiled:
            start = time.perf_counter()
            jax.block_until_ready(c(*args))
            times[row.label].append(time.perf_counter() - start)
    return [
        {
            "network": row.label,
            "mmacs_per_image": row.macs_per_image / 1e6,
            "xla_mflops_per_batch": flops / 1e6,
            "batches_per_s": 1.0 / statistics.median(times[row.label]),
            "paper_gpu_batches_per_s": row.paper_gpu,
            "paper_arm_images_per_s": row.paper_arm,
        }
        for row, _, _, flops in compiled
    ]


def format_table(title: str, results: list[dict]) -> str:
    lines = [
        title,
        f"  {'network':22s} {'MMACs':>8s} {'XLA MFLOP':>10s} {'ours b/s':>9s} "
        f"{'rel':>5s} {'GPU b/s':>8s} {'rel':>5s} {'ARM img/s':>9s}",
    ]
    first, first_gpu = results[0]["batches_per_s"], results[0]["paper_gpu_batches_per_s"]
    for r in results:
        gpu = r["paper_gpu_batches_per_s"]
        arm = r["paper_arm_images_per_s"]
        lines.append(
            f"  {r['network']:22s} {r['mmacs_per_image']:8.1f} {r['xla_mflops_per_batch']:10.1f} "
            f"{r['batches_per_s']:9.1f} {r['batches_per_s'] / first:5.2f} "
            + (f"{gpu:8.0f} {gpu / first_gpu:5.2f} " if gpu else f"{'-':>8s} {'-':>5s} ")
            + (f"{arm:9.1f}" if arm else f"{'-':>9s}")
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--multiplier", type=int, default=1, choices=[1, 2, 4])
    p.add_argument("--json")
    args = p.parse_args()
    print(
        f"backend {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPUs, batch {args.batch}, 56x56, x{args.multiplier} channels\n"
    )
    out = {}
    for title, rows in guidelines.tables(args.multiplier).items():
        out[title] = measure(rows, args.batch, args.repeats)
        print(format_table(title, out[title]) + "\n", flush=True)
    if args.json:
        meta = {
            "backend": jax.devices()[0].platform,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "batch": args.batch,
            "multiplier": args.multiplier,
        }
        with open(args.json, "w") as f:
            json.dump({**meta, "tables": out}, f, indent=2)


if __name__ == "__main__":
    main()
