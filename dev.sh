#!/usr/bin/env bash
# One entry point for the README's quick start: sets up .venv (once) and runs a job.
#   ./dev.sh demo [args]   the main job: dropless vs capacity-based MoE (python -m blocksparse_moe.demo)
#   ./dev.sh test [args]   the test suite on the CPU through Triton's interpreter
#   ./dev.sh bench [args]  the benchmarks (python -m benchmarks)
# Set TORCH_SPEC to choose the torch build (default torch==2.13.0, whose CPU wheel these
# machines carry; on a GPU machine install your CUDA torch into .venv first).
set -euo pipefail
cd "$(dirname "$0")"
job="${1:-test}"; shift || true
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.bsmoe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  .venv/bin/python -m pip install -q -e ".[test,hf]"
  touch "$stamp"
fi
case "$job" in
  demo)  exec .venv/bin/python -m blocksparse_moe.demo "$@" ;;
  test)  export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
         exec .venv/bin/python -m pytest -q "$@" ;;
  bench) .venv/bin/python -c "import matplotlib" 2>/dev/null || .venv/bin/python -m pip install -q -e ".[bench]"
         exec .venv/bin/python -m benchmarks "$@" ;;
  *) echo "usage: ./dev.sh {demo|test|bench} [args]" >&2; exit 2 ;;
esac
