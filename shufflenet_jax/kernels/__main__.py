"""python -m shufflenet_jax.kernels: build (or find in the cache) all of the package's C++ now
(the network's CPU kernels, the input's JPEG decoder and resize) and say where each stands;
exit status 1 where any does not build here."""

import argparse
import sys

from shufflenet_jax import kernels
from shufflenet_jax.data import jpeg, resample

if __name__ == "__main__":
    argparse.ArgumentParser(
        prog="python -m shufflenet_jax.kernels", description=__doc__
    ).parse_args()
    ok = kernels.load()
    print(f"C++ kernels: {kernels.status()}")
    built = {"C++ JPEG decoder": jpeg.available(), "C++ resize": resample.available()}
    for what, available in built.items():
        print(f"{what}: {'built' if available else 'not built (Pillow is used)'}")
    sys.exit(0 if ok and all(built.values()) else 1)
