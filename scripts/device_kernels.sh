#!/usr/bin/env bash
# One call on the GPU machine: the Triton kernel tests on CUDA (bf16, fp16, every form, odd sizes) and the kernel
# benchmark. Usage there:  bash scripts/device_kernels.sh [bench-kernels options]   (CSV and log under $OUT)
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fusiontune-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_kernels.log") 2>&1
bash .carry/carry-install.sh .carry && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider --tb=line tests/test_triton_kernels.py tests/test_kernels.py 2>&1 | grep -E "^E |FAILED|passed|failed"
[ "${1:-}" = "--tests-only" ] && exit 0
[ "${1:-}" = "--probe" ] && { python3 scripts/probe_quant_variants.py; shift; }
[ "${1:-}" = "--probe-warps" ] && { python3 scripts/probe_row_warps.py; exit 0; }
fusiontune bench-kernels --csv "$OUT/bench-kernels.csv" "$@"
