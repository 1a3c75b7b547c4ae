"""JAX-only A/B of model implementation choices, alternating in one process.

    python benchmarks/variant_speed.py --mode train --batch 32 \
        --variant default= --variant xla_grads=dense:im2col,depthwise:shifted
    python benchmarks/variant_speed.py --mode infer --variant fused= --variant layers=fused:layers

Each `--variant NAME=key:value,...` builds benchmarks/throughput.py's JaxCase with those
implementations (`op:name` as in `lab.variants`; `train_options:xla` compiles the train step
with XLA's default options instead of `train_compiler_options()`; `xla.NAME:VALUE` sets
one XLA option of the timed step over its defaults, `train_compiler_options()` or
`eval_compiler_options()`, and `xla.NAME:-` removes it). After a warm-up the variants run
round by round, `--repeats` rounds of `--images` images each; it prints the median images/s
per variant and its ratio to the first. Outputs of all variants are checked to agree first
(inference logits, or the first training step's loss), so a faster variant is a faster way to
the same numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from throughput import JaxCase, add_isa_option, apply_isa, seconds_per_call

from lab import variants
from shufflenet_jax.compiler_options import eval_compiler_options, train_compiler_options
from shufflenet_jax.process import setup_process


def parse_variant(text: str, mode: str) -> tuple[str, dict]:
    name, _, spec = text.partition("=")
    kwargs = dict(item.split(":", 1) for item in spec.split(",") if item)
    if kwargs.get("train_options") == "xla":
        kwargs["train_options"] = {}
    options = {k.removeprefix("xla."): v for k, v in kwargs.items() if k.startswith("xla.")}
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("xla.")}
    if options:
        if mode == "train":
            key, defaults = "train_options", train_compiler_options()
        else:
            key, defaults = "eval_options", eval_compiler_options()
        merged = {**kwargs.get(key, defaults), **options}
        kwargs[key] = {k: v for k, v in merged.items() if v != "-"}
    names = {k: kwargs.pop(k) for k in list(kwargs) if k in variants.CATALOGS}
    return name, {**kwargs, "impl": variants.named_impl(**names)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", choices=["infer", "train"], default="train")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=k:v,...")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=64, help="images per variant per round")
    p.add_argument("--json", metavar="OUT")
    add_isa_option(p)
    args = p.parse_args()
    apply_isa(args.isa)
    print(*setup_process(), sep="\n")  # as train.py and eval.py do

    cases = {}
    for name, kwargs in (parse_variant(v, args.mode) for v in args.variant):
        cases[name] = JaxCase(args.width, args.batch, args.size, fold_bn=True, **kwargs)
    if args.mode == "infer":
        outs = {n: np.asarray(c.predict(*c.infer_state, c.x)) for n, c in cases.items()}
    else:
        outs = {}
        for n, c in cases.items():
            c.state, metrics = c.train_step(c.state, c.batch)
            outs[n] = np.asarray(metrics["loss"])
    first = next(iter(outs.values()))
    for n, out in outs.items():
        np.testing.assert_allclose(out, first, rtol=1e-4, atol=1e-4, err_msg=f"variant {n}")

    iters = max(1, args.images // args.batch)
    for c in cases.values():
        getattr(c, args.mode)()
    times: dict[str, list[float]] = {n: [] for n in cases}
    for _ in range(args.repeats):
        for n, c in cases.items():
            times[n].append(seconds_per_call(getattr(c, args.mode), iters))
    rates = {n: args.batch / statistics.median(t) for n, t in times.items()}
    base = next(iter(rates.values()))
    print(f"ShuffleNet V2 {args.width}x, {args.mode}, batch {args.batch}, {args.size}x{args.size}")
    for n, r in rates.items():
        print(f"  {n:24s} {r:7.1f} img/s  {r / base:5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "img_s": rates}, f, indent=1)


if __name__ == "__main__":
    main()
