"""python -m shufflenet_jax.kernels: build (or find in the cache) the C++ CPU kernels now, and
say where they are; exit status 1 where they do not build here."""

import argparse
import sys

from shufflenet_jax import kernels

if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m shufflenet_jax.kernels", description=__doc__
    ).parse_args()
    ok = kernels.load()
    print(f"C++ kernels: {kernels.status()}")
    sys.exit(0 if ok else 1)
