"""bfloat16 against float32 training on the digits quickstart: final top-1 of each, same seeds.

    python benchmarks/bf16_digits.py [--seeds 0 1] [--data_dir DIR] [--json OUT]

Trains configs/digits.py once per seed and compute dtype (parameters and BatchNorm statistics
stay float32 in both) and compares the mean final top-1 over the seeds. Exits 1 when bfloat16
is more than --max_gap (default 1 point) below float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.digits import get_config  # noqa: E402
from shufflenet_jax.data import prepare  # noqa: E402
from shufflenet_jax.process import setup_process  # noqa: E402
from shufflenet_jax.train.loop import train_and_evaluate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--data_dir", default=None, help="TFDS data_dir (default: a fresh one)")
    p.add_argument("--max_gap", type=float, default=0.01)
    p.add_argument("--json", metavar="OUT")
    args = p.parse_args()
    print(*setup_process(), sep="\n")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or str(Path(tmp) / "tfds")
        prepare.prepare("digits", data_dir=data_dir)
        top1: dict[str, list[float]] = {"float32": [], "bfloat16": []}
        for seed in args.seeds:
            for dtype in top1:
                config = get_config()
                config.data.data_dir, config.train.seed, config.train.compute_dtype = (
                    data_dir,
                    seed,
                    dtype,
                )
                result = train_and_evaluate(config, Path(tmp) / f"{dtype}_{seed}")
                top1[dtype].append(result.eval_metrics["top1"])
                print(f"seed {seed} {dtype}: top-1 {top1[dtype][-1]:.4f}", flush=True)
    means = {k: statistics.mean(v) for k, v in top1.items()}
    gap = means["float32"] - means["bfloat16"]
    print(
        f"mean top-1: float32 {means['float32']:.4f}, bfloat16 {means['bfloat16']:.4f}, "
        f"float32 - bfloat16 = {100 * gap:+.2f} points (allowed {100 * args.max_gap:.1f})"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": args.seeds, "top1": top1, "mean": means, "gap": gap}, f, indent=1)
    sys.exit(0 if gap <= args.max_gap else 1)


if __name__ == "__main__":
    main()
