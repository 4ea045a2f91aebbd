#!/usr/bin/env bash
# GPU tests + kernel bandwidth + decode tokens/s on a CUDA machine; JSON lands in bench/results/.
# Usage: bench/gpu.sh [--steps 128] [--batch 1] [--skip-tests]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter
exec "$PY" -m kiln.bench.gpu "$@"
