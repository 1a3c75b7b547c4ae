"""A step's per-device memory on an accelerator target at chosen per-device batches, each from
one deviceless compile (XLA's memory analysis; "refused" where the compiler runs out of memory).
`train.py --compile_for --max_batch` searches for the largest batch assuming memory grows with
the batch; this checks that assumption at the batches given.

    python benchmarks/step_memory.py --target v5e:2x2 --width 1.0 --step eval 4692 7033
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import imagenet  # noqa: E402
from shufflenet_jax.aot import compile as aot  # noqa: E402
from shufflenet_jax.aot import targets  # noqa: E402
from shufflenet_jax.cli import one_line_errors  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help=f"one of {sorted(targets.TARGETS)}")
    parser.add_argument("--width", default="1.0")
    parser.add_argument("--dtype", default="bfloat16", help="the config's compute dtype")
    parser.add_argument("--step", choices=("train", "eval"), default="train")
    parser.add_argument("per_device", type=int, nargs="+", help="per-device batches")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")  # a plugin without its device must not start
    aot.without_persistent_cache()
    with one_line_errors(ValueError):  # an unknown target, width or dtype; a missing plugin
        config = imagenet.get_config(args.width)
        config.train.compute_dtype = args.dtype
        target = targets.get(args.target)
        steps = aot.steps_for(config, target)
    jitted, args_at = (
        (steps.train, steps.train_args) if args.step == "train" else (steps.eval, steps.eval_args)
    )
    usable = targets.usable_bytes(target) / 2**30
    for batch in args.per_device:
        start = time.perf_counter()
        total = aot.total_bytes(jitted, args_at, batch, target) / 2**30
        memory = "refused" if math.isinf(total) else f"{total:.2f} GiB"
        print(
            f"{args.target} {args.width}x {args.dtype} {args.step}, {batch} per device: "
            f"{memory} of {usable:.2f} usable ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
