#!/usr/bin/env bash
# One accelerator check in at most 9 minutes (the stages' device limits add up to 540 s), for a
# machine with Python 3.12, JAX with CUDA, flax, optax, orbax, chex and torch preinstalled and
# no network (docs/accelerator.md):
#
#   bash benchmarks/device_check.sh [--cpu-dry-run] [OUT]
#
# OUT defaults to $OUT (the device tool's folder), else device_check_out/. The packages the
# image lacks come as wheels from $WHEELS (default .whl/, made here by
# benchmarks/device_wheels.sh) and are installed into a private folder; nothing else is
# installed. Each stage runs under its own timeout and writes its JSON or log under OUT, so a
# slow stage cannot lose the others' results; OUT/stages.tsv lists each stage's exit status
# and seconds. --cpu-dry-run runs every stage on the CPU at tiny sizes (CI runs it so that the
# script cannot rot); the GPU-only parts (nvidia-smi, torch.compile) are skipped there, and the
# deviceless stage compares an H100 compile with this CPU's. That stage needs JAX's CUDA plugin
# (the [aot] extra): it runs with $AOT_PYTHON (default: the same Python).
# Each stage has two limits: the device's (what the lent machine's time allows) and the dry
# run's, set at 4x or more what the stage took on the slowest CPU kind seen (AMD EPYC Zen 3,
# 2 vCPUs; docs/accelerator.md), since there the compiles, not the tiny sizes, take the time:
# the dry run checks that the stages work, not how fast this machine compiles.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [[ "${1:-}" == "--cpu-dry-run" ]]; then dry=1; shift; fi
out=${1:-${OUT:-device_check_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
aot_py=${AOT_PYTHON:-$py}
wheels=${WHEELS:-.whl}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
printf 'stage\texit\tseconds\n' >"$out/stages.tsv"

stage() {  # stage NAME DEVICE_S DRY_S COMMAND...: run with a timeout, log to OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  if ((dry)); then limit=$3; fi
  shift 3
  echo "== $name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >>"$out/stages.tsv"
  tail -n 15 "$out/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

# the dry run uses this machine's packages unless WHEELS names a folder for its Python
if [[ $dry == 0 || -n "${WHEELS:-}" ]] && compgen -G "$wheels/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/shufflenet_jax_site
  stage wheels 40 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$PYTHONPATH:$site"
fi

if ((dry)); then
  export JAX_PLATFORMS=cpu
  # the two throughput stages compile one train step (same width, batch and size): the second
  # loads it from this cache instead of spending its half minute compiling it again
  export JAX_COMPILATION_CACHE_DIR="$out/xla_cache"
  tests=(tests/test_ops.py tests/test_low_precision.py -k "shuffle or op_cases_cover")
  precision=(--batch 1 --only depthwise_shifted_28x28x58_s1 pointwise_dot_28x28x116to58)
  big=(--widths 0.5 --batches 8 --size 32 --round-seconds 0.2 --repeats 1)
  small=(--widths 0.5 --batches 8 --size 32 --round-seconds 0.2 --repeats 1 --no-torch)
  fusion=(--batch 2 --size 32 --repeats 1)
  copy=(--batch 8 --repeats 2)
  deviceless=(--target h100 --batch 8 --size 32)
else
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
  tests=(tests/test_ops.py tests/test_models.py tests/test_steps.py tests/test_low_precision.py)
  if "$py" -c "import torch, torchvision" 2>/dev/null; then tests+=(tests/test_convert.py); fi
  precision=()
  big=(--widths 1.0 --batches 256 --torch-compile --repeats 5)
  small=(--widths 0.5 --batches 256 --repeats 3)
  fusion=()
  copy=(--batch 1024 --repeats 3)
  deviceless=()  # this GPU's target; width 0.5, batch 128, 224x224, bf16
  stage nvidia_smi 10 10 nvidia-smi
fi

stage versions 20 60 "$py" -c "
import json, platform, importlib.metadata as m, jax
names = ['jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'chex', 'grain',
         'tensorflow-datasets', 'ml-collections', 'torch', 'torchvision']
def version(n):
    try: return m.version(n)
    except m.PackageNotFoundError: return None
info = {'python': platform.python_version(), 'backend': jax.default_backend(),
        'devices': [str(d) for d in jax.devices()], 'device_kind': jax.devices()[0].device_kind}
info |= {n: version(n) for n in names}
print(json.dumps(info, indent=1))
json.dump(info, open('$out/versions.json', 'w'), indent=1)"

# float32 tolerances of the equivalence tests assume float32 matmuls, not TF32
JAX_DEFAULT_MATMUL_PRECISION=highest stage tests 95 240 "$py" -m pytest -q -p no:cacheprovider \
  --junitxml="$out/tests.xml" "${tests[@]}"
stage bf16_errors 40 180 "$py" -m lab.precision "${precision[@]}" \
  --json "$out/bf16_errors.json"
stage throughput_1_0 150 480 "$py" benchmarks/throughput.py --fake-data "${big[@]}" \
  --json "$out/throughput_1_0.json"
stage throughput_0_5 55 300 "$py" benchmarks/throughput.py --fake-data "${small[@]}" \
  --json "$out/throughput_0_5.json"
stage input_copy 15 60 "$py" benchmarks/input_pipeline.py --copy-only "${copy[@]}" \
  --json "$out/input_copy.json"
stage fusion_unit 25 120 "$py" -m lab.fusion --subject unit --mode train "${fusion[@]}" \
  --json "$out/fusion_unit_train.json"
stage fusion_net 30 120 "$py" -m lab.fusion --subject net --mode forward --compare shuffle \
  "${fusion[@]}" --json "$out/fusion_net_forward.json"
stage deviceless 60 400 "$aot_py" benchmarks/deviceless_check.py "${deviceless[@]}" \
  --json "$out/deviceless.json"

cat "$out/stages.tsv"
! awk 'NR > 1 && $2 != 0 { bad = 1 } END { exit !bad }' "$out/stages.tsv"
