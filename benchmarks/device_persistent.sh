#!/usr/bin/env bash
# Issue 15's device check, one call on a lent H100/H200, from the repository root:
#
#   bash benchmarks/device_persistent.sh     # under 8 minutes in all (30 + 60 + 110 + 115 + 135 s at most)
#
# 1. install this package (editable, no index) and print versions and the GPU state;
# 2. the sm_90 compile records of tests/sm90_persistent_worker.py with the device's own
#    Triton (registers, shared memory, HGMMA/UTMALDG counts; SDD, DSD, DSD^T, GLU backward), at most 60 s;
# 3. the persistent-kernel tests compiled on the GPU (tests/test_sdd_persistent.py,
#    tests/test_dsd_persistent.py, tests/test_sdd_glu_backward.py and tests/test_persistent_ffn.py,
#    interpreter off: TMA for real, the float64 references, NaN-poisoned outputs, the
#    layer's no-host-read check under set_sync_debug_mode("error")), at most 110 s;
# 4. python -m benchmarks.persistent_layer: the SwiGLU expert layer fwd+bwd (and fwd) built
#    only from the persistent kernels (backends/persistent_ffn.py) vs backend="triton" vs
#    backend="grouped" (F.grouped_mm), Mixtral and fine-grained shapes, uniform then skewed,
#    bf16, step peak memory, errors against grouped; $OUT/results/persistent-layer.json after
#    every measurement, none started after LAYER_BUDGET_S (default 80 s);
# 5. python -m benchmarks.persistent --sweep: sdd vs sdd_persistent (pointers, TMA,
#    a few TMA configs) vs torch._grouped_mm vs dense torch.matmul, and the fused
#    SwiGLU SDD vs its unfused forms, then the fused gather (sdd_persistent / sdd_glu with
#    gather=, w1 by TMA) vs permute.gather + the TMA-fed SDD on its [S, H] copy, then dsd
#    vs dsd_persistent (pointers, TMA, K-major down_proj^T, row_weights + gather-sum
#    combine) vs torch._grouped_mm, then dsd_t vs dsd_t_persistent (pointers, TMA,
#    [E,H,ffn] target) vs torch._grouped_mm rows, then the GLU backward's SDD (with routing
#    weights) vs its unfused form, Mixtral and fine-grained shapes, uniform and skewed, bf16.
#    It writes $OUT/results/persistent.json after every measurement and starts none after
#    BUDGET_S (default 90 s), so a cut-short run keeps its numbers.
#    Step 3 leaves tests/test_dsd_t_persistent.py out (run it with BSMOE_TEST_DEVICE=cuda
#    when the device time allows).
#
# 4b. python -m benchmarks.auto_table: the committed results plus this run's layer file ->
#    $OUT/results/measured_layers.json, what backend="auto" would follow (a second; to adopt it,
#    commit the layer file under benchmarks/results/ with the device in its name and rerun
#    python -m benchmarks.auto_table: tests/test_backend_select.py checks the table is current).
#
# The layer step comes before the kernel sweep: the layer time is the issue's headline target.
# BSMOE_AUTOTUNE=0 skips sdd's autotuning (faster, but then sdd runs one default config).
# Dry run on any CPU machine: python -m benchmarks.persistent --dry-run; python -m benchmarks.persistent_layer --smoke
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bsmoe-out}
mkdir -p "$OUT/results"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$PWD/.triton-cache" TRITON_INTERPRET=0
BUDGET_S=${BUDGET_S:-90}  # the kernel sweep; 40 s went to the layer step
LAYER_BUDGET_S=${LAYER_BUDGET_S:-80}
export BSMOE_GIT_SHA=${BSMOE_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

echo "=== setup ($(date -u +%T))"
if ! python3 -c "import blocksparse_moe.kernels.sdd_persistent" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/setup.log" 2>&1 \
    || { tail -20 "$OUT/setup.log"; exit 1; }
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu --format=csv
echo "git $BSMOE_GIT_SHA"

echo "=== sass ($(date -u +%T))"  # the device image's Triton (3.6 per KINDS.md), not the 3.9 of the CPU evidence
timeout 60 python3 tests/sm90_persistent_worker.py "$OUT/results/persistent-sass.json" >"$OUT/sass.log" 2>&1
echo "sass exit $?"; python3 -c "
import json, sys
for r in json.load(open(sys.argv[1])):
    print(r['name'], 'ok' if r.get('ok') else r.get('error', '?')[:200], r.get('resources'), r.get('shared'), r.get('sass'))
" "$OUT/results/persistent-sass.json" 2>&1 | tail -16

echo "=== tests ($(date -u +%T))"
BSMOE_TEST_DEVICE=cuda timeout 110 python3 -m pytest -q -p no:cacheprovider -ra \
  --junitxml "$OUT/tests-persistent.xml" tests/test_sdd_persistent.py tests/test_dsd_persistent.py \
  tests/test_sdd_glu_backward.py tests/test_persistent_ffn.py \
  -k "not compile_for_sm90 and not compiles_for_sm90" >"$OUT/tests-persistent.log" 2>&1
echo "pytest exit $?"; grep -E "passed|failed|error" "$OUT/tests-persistent.log" | tail -15

echo "=== layer ($(date -u +%T))"
timeout $((LAYER_BUDGET_S + 35)) python3 -m benchmarks.persistent_layer --budget-s "$LAYER_BUDGET_S" \
  --out "$OUT/results" 2>&1 | tee "$OUT/bench-persistent-layer.log" | tail -30
echo "layer exit ${PIPESTATUS[0]}"

echo "=== auto table ($(date -u +%T))"  # what backend="auto" would pick with this run's layer times added
python3 -m benchmarks.auto_table benchmarks/results/*.json "$OUT/results/persistent-layer.json" \
  --out "$OUT/results/measured_layers.json" 2>&1 | tail -8

echo "=== bench ($(date -u +%T))"
timeout $((BUDGET_S + 45)) python3 -m benchmarks.persistent --sweep --kernels sdd,gather,dsd,dsd_t,glu_bwd \
  --budget-s "$BUDGET_S" --out "$OUT/results" \
  2>&1 | tee "$OUT/bench-persistent.log" | tail -60
echo "bench exit ${PIPESTATUS[0]}"
echo "=== done ($(date -u +%T))"
