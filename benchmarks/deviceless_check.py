"""One train step compiled twice: for this machine's own device, and deviceless for the
`shufflenet_jax.aot` target that describes it (an H100 or H200 by its device kind). Prints and
writes what each compiler made of the step side by side (fusions by kind, library calls,
kernels, memory), so that the first run on a real GPU checks the deviceless estimates of
`train.py --compile_for` (docs/accelerator.md).

    python benchmarks/deviceless_check.py --json OUT.json            # on a GPU machine
    python benchmarks/deviceless_check.py --target h100 --width 0.5 --batch 8 --size 32

Without a GPU (`--target` given), the "device" compile is this machine's CPU: the two then
differ by design; the run checks that the script works.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import jax

from configs import imagenet
from shufflenet_jax.aot import compile as aot
from shufflenet_jax.aot import targets
from shufflenet_jax.train import parallel

KINDS = {"H100": "h100", "H200": "h200"}  # a word of jax's device_kind -> target


def matching_target(device_kind: str) -> str:
    """The target whose description is this device; a one-line error if none is."""
    for word, name in KINDS.items():
        if word in device_kind:
            return name
    raise SystemExit(f"no aot target describes {device_kind!r}; pass --target (known: {KINDS})")


def compiled_summary(jitted: Any, args: tuple, target: targets.Target, batch: int) -> dict:
    lowered, compiled, seconds = aot.compile_step(jitted, args)
    r = aot.report(lowered, compiled, seconds, target, batch)
    keep = ("compile_s", "memory", "fusions", "library_calls", "unfused", "kernels")
    return {k: r[k] for k in keep}


def compare(device: dict, deviceless: dict) -> dict:
    """Where the deviceless compile agrees with the device's: equal counts, memory ratios."""
    mem = lambda r, k: r["memory"][k]  # noqa: E731
    return {
        "same_fusions": device["fusions"] == deviceless["fusions"],
        "same_library_calls": device["library_calls"] == deviceless["library_calls"],
        "kernels": [device["kernels"], deviceless["kernels"]],
        "temp_bytes_deviceless_over_device": mem(deviceless, "temp_bytes")
        / max(1, mem(device, "temp_bytes")),
        "total_bytes_deviceless_over_device": mem(deviceless, "total_bytes")
        / max(1, mem(device, "total_bytes")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", help="aot target to compare with (default: this GPU's)")
    p.add_argument("--width", default="0.5")
    p.add_argument("--batch", type=int, default=128, help="images per step, one device")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", help="write the comparison here")
    args = p.parse_args()

    aot.without_persistent_cache()
    device_kind = jax.devices()[0].device_kind
    target = targets.get(args.target or matching_target(device_kind))
    if target.devices != 1:
        raise SystemExit(f"compare with a one-device target, not {target.name}")
    config = imagenet.get_config(args.width)
    config.data.image_size = args.size
    config.train.batch_size = config.train.eval_batch_size = args.batch
    config.train.compute_dtype = args.dtype

    here = aot.steps_on(config, parallel.make_mesh(1), jax.default_backend())
    there = aot.steps_for(config, target)
    out = {
        "device_kind": device_kind,
        "target": target.name,
        "jax": jax.__version__,
        "config": {"width": args.width, "batch": args.batch, "size": args.size},
        "dtype": args.dtype,
        "device": compiled_summary(here.train, here.train_args(args.batch), target, args.batch),
        "deviceless": compiled_summary(
            there.train, there.train_args(args.batch), target, args.batch
        ),
    }
    out["agreement"] = compare(out["device"], out["deviceless"])
    for side in ("device", "deviceless"):
        r = out[side]
        print(
            f"{side:10s} compiled in {r['compile_s']:.1f} s: {r['kernels']} kernels, "
            f"fusions {r['fusions']}, library calls {r['library_calls']}, "
            f"temp {r['memory']['temp_bytes'] / 2**20:.1f} MiB"
        )
    print(f"agreement: {out['agreement']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
