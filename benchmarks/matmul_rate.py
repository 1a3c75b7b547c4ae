"""Float32 matmul GFLOP/s of XLA (JAX) and PyTorch on this machine, at the 1x1-convolution
shapes of ShuffleNet V2 1.0x at batch 32 and on one large square matmul: the ceiling for the
matmul part of the network (docs/performance.md).

    python benchmarks/matmul_rate.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ops import _ms  # noqa: E402  (benchmarks/ops.py: warm-up, then median milliseconds)

SHAPES = [
    (2048, 2048, 2048),
    (100352, 58, 58),
    (25088, 116, 116),
    (6272, 232, 232),
    (1568, 464, 464),
]


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    matmul = jax.jit(jnp.matmul)
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k), np.float32)
        b = rng.standard_normal((k, n), np.float32)
        ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
        flop = 2 * m * k * n
        t_jax = _ms(matmul, ja, jb, repeats=args.repeats) / 1e3
        t_torch = _ms(torch.matmul, ta, tb, repeats=args.repeats) / 1e3
        print(
            f"{m}x{k} @ {k}x{n}: JAX {flop / t_jax / 1e9:6.0f} GFLOP/s   "
            f"PyTorch {flop / t_torch / 1e9:6.0f} GFLOP/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
