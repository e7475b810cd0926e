#!/usr/bin/env bash
# The GPU run on a lent machine, one or more steps per call, from the repository root:
#
#   bash benchmarks/device_run.sh setup ceilings tests=240 kernels=300:uniform layers=400
#
# setup             install the carried wheels (.whl/: stanford-stk, which the image lacks)
#                   and this package (editable, no index), print versions and the GPU state
# ceilings          python -m benchmarks.ceilings: copy bandwidth and bf16 matmul rate
# tests=SECONDS     the test suite on the GPU, interpreter off (CPU-only files left out)
# kernels=S[:R]     python -m benchmarks --full --only kernels, --budget-s S, routings R
# layers=S[:R]      the same for the layer benchmarks
#
# Logs and results go to $OUT (the device tool brings that folder back). Each step
# has its own time allowance so that a call ends inside the tool's 10-minute limit
# with its results written. The Triton cache lives in .triton-cache/, which stays on
# a warm machine between calls.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bsmoe-out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$PWD/.triton-cache" TRITON_INTERPRET=0

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/setup.log" 2>&1 || { cat "$OUT/setup.log"; return 1; }
  python3 -c "import torch, triton, stk, blocksparse_moe.kernels as k
print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv
  git rev-parse HEAD 2>/dev/null || true
}

bench() {  # bench kernels|layers SECONDS[:ROUTINGS]
  local part=$1 budget=${2%%:*} routing=uniform,skewed
  [[ $2 == *:* ]] && routing=${2#*:}
  timeout $((budget + 120)) python3 -m benchmarks --full --only "$part" --routing "$routing" --budget-s "$budget" \
    --out "$OUT/results" --no-report 2>&1 | tee "$OUT/$part-${routing//,/-}.log" | grep -v '^\[' | tail -40
  grep '^\[' "$OUT/$part-${routing//,/-}.log" | tail -3
}

for step in "$@"; do
  echo "=== $step ($(date -u +%T))"
  case $step in
    setup) setup || exit 1 ;;
    ceilings) python3 -m benchmarks.ceilings --out "$OUT/results" ;;
    tests=*)
      BSMOE_TEST_DEVICE=cuda timeout "${step#tests=}" python3 -m pytest -q -p no:cacheprovider -ra --timeout 120 \
        --junitxml "$OUT/tests.xml" tests --ignore tests/test_compile_sm90.py \
        --ignore tests/test_parallel.py --ignore tests/test_parallel_faults.py >"$OUT/tests.log" 2>&1
      echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/tests.log" | tail -25 ;;
    kernels=*) bench kernels "${step#kernels=}" ;;
    layers=*) bench layers "${step#layers=}" ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
echo "=== done ($(date -u +%T))"
