"""Fingerprints of the optimized HLO that XLA compiles for the float32 train and inference steps.

    python benchmarks/hlo_fingerprint.py [--width 1.0] [--batch 32] [--save DIR]

Prints a hash of each step's optimized HLO with source locations and stack frames removed, so
two commits (or two machines) can be compared: the same hash means XLA runs the same program,
and so the same speed. ShuffleNet V2 train step (SGD with momentum, `step.make_train_step`)
and the folded inference step (`model.inference.make_predict`), 224x224.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

import jax.numpy as jnp
import optax
from flax import nnx

from shufflenet_jax.model import ShuffleNetV2, fold_batchnorm
from shufflenet_jax.model.inference import make_predict, split_model
from shufflenet_jax.train.state import TrainState
from shufflenet_jax.train.step import make_train_step


def program_text(hlo: str) -> str:
    """The HLO's instructions without metadata, source locations or stack frame tables."""
    lines = [line for line in hlo.splitlines() if not re.match(r"\s*\d+ (\{file|\")", line)]
    text = "\n".join(lines)
    return re.sub(r"metadata=\{[^}]*\}|,? ?stack_frame_id=\d+", "", text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--save", metavar="DIR", help="also write each program's text here")
    args = p.parse_args()
    model = ShuffleNetV2(args.width, rngs=nnx.Rngs(0))
    x = jnp.ones((args.batch, 224, 224, 3))
    graphdef, params, stats = split_model(model)
    tx = optax.sgd(0.1, momentum=0.9)
    state = TrainState(jnp.zeros((), jnp.int32), params, stats, tx.init(params), None)
    batch = {"image": x, "label": jnp.zeros((args.batch,), jnp.int32)}
    train = make_train_step(graphdef, tx).lower(state, batch)
    model.eval()
    folded_graphdef, *folded_state = split_model(fold_batchnorm(model))
    infer = make_predict(folded_graphdef).lower(*folded_state, x)
    for name, lowered in (("train", train), ("infer_folded", infer)):
        text = program_text(lowered.compile().as_text())
        print(f"{name:<14} {hashlib.sha256(text.encode()).hexdigest()[:16]}  {len(text)} chars")
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            (Path(args.save) / f"{name}.hlo").write_text(text)


if __name__ == "__main__":
    main()
