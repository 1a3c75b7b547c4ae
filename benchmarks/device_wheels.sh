#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/device_check.sh installs on an accelerator image
# that has Python 3.12, JAX, flax, optax, orbax, chex and torch but not these (no network there):
#
#   bash benchmarks/device_wheels.sh [DIR]     # DIR defaults to .whl/ (ignored by git)
#
# Versions are the ones the Python 3.12 CI leg resolves; each is fetched without its
# dependencies (the image has the rest). promise has no wheel on PyPI: it is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
mkdir -p "$dir"
py=${PYTHON:-python3}
binary=(
  grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  immutabledict==4.3.1 simple-parsing==0.1.9 docstring-parser==0.18.0 termcolor==3.3.0
  toml==0.10.2 ml-collections==1.1.0 tensorboardX==2.6.5 importlib-resources==7.1.0
  portpicker==1.6.0
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platforms[@]}" -d "$dir" "${binary[@]}"
"$py" -m pip wheel -q --no-deps -w "$dir" promise==2.3
du -sh "$dir"
ls "$dir"
