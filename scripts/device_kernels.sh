#!/usr/bin/env bash
# One call on the GPU machine: the Triton kernel tests on CUDA (bf16, fp16, every form, odd sizes) and the kernel
# benchmark. Usage there (CSV and log under $OUT):
#   bash scripts/device_kernels.sh [bench-kernels options]     tests, then the benchmark (its tables and how they
#                                                              stand against issue 22's targets: bench-kernels.md)
#   bash scripts/device_kernels.sh --bench-only [options]      the benchmark alone
#   bash scripts/device_kernels.sh --tests-only | --probe-warps | --probe-gemm
#   bash scripts/device_kernels.sh --compare OLD.py...         tests, then an A/B of kernels/triton_rows.py versions
source "$(dirname "$0")/device_setup.sh"
if [ "${1:-}" = "--bench-only" ]; then  # no tests: a call whose minutes are few
  shift
else
  python3 -m pytest -q -p no:cacheprovider --tb=line tests/test_triton_kernels.py tests/test_kernels.py 2>&1 | grep -E "^E |FAILED|passed|failed"
fi
[ "${1:-}" = "--tests-only" ] && exit 0
[ "${1:-}" = "--probe" ] && { python3 scripts/probe_quant_variants.py; shift; }
[ "${1:-}" = "--probe-warps" ] && { python3 scripts/probe_row_warps.py; exit 0; }
[ "${1:-}" = "--probe-gemm" ] && { python3 scripts/probe_blockwise_mm.py; exit 0; }
[ "${1:-}" = "--compare" ] && { shift; python3 scripts/compare_row_kernels.py "$@" kernels/triton_rows.py; exit 0; }
fusiontune bench-kernels --csv "$OUT/bench-kernels.csv" "$@"
python3 scripts/kernel_table.py "$OUT/bench-kernels.csv" > "$OUT/bench-kernels.md"  # the tables, then the targets
tail -4 "$OUT/bench-kernels.md"
