#!/usr/bin/env bash
# GPU tests + kernel bandwidth + decode tokens/s + engine throughput, each figure appended to <out>/gpu_<card>.jsonl
# as it lands (default bench/results/; $OUT when set, as on a device machine, so that the results come back).
# Usage: bench/gpu.sh [--quick] [--phases tests,bandwidth,decode,engine,extras] [--skip decode.hf_compile,...] [--out DIR]
#        bench/gpu.sh --device cpu --tiny    (CPU smoke run)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
unset TRITON_INTERPRET  # kernels must compile for the GPU, not run in the interpreter
# The checkout's root is the package `kiln` (package-dir kiln = "."); without an install (the GPU machine has no
# venv) `import kiln` needs a directory holding a `kiln` link to it on PYTHONPATH. Put first, it also makes sure
# that this checkout is what runs, whatever else is installed.
link_dir="$(mktemp -d)"
trap 'rm -rf "$link_dir"' EXIT
ln -s "$PWD" "$link_dir/kiln"
export PYTHONPATH="$link_dir${PYTHONPATH:+:$PYTHONPATH}"
[ -n "${OUT:-}" ] && set -- --out "$OUT" "$@"  # an --out given here comes later and wins
"$PY" -m kiln.bench.gpu "$@"
