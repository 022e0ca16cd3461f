#!/usr/bin/env bash
# One call on the GPU machine: the Triton kernel tests on CUDA (bf16, fp16, every form, odd sizes) and the kernel
# benchmark. Usage there (CSV and log under $OUT):
#   bash scripts/device_kernels.sh [bench-kernels options]     tests, then the benchmark (its tables and how they
#                                                              stand against issue 22's targets: bench-kernels.md)
#   bash scripts/device_kernels.sh --bench-only [options]      the benchmark alone
#   bash scripts/device_kernels.sh --tests-only | --probe-warps | --probe-gemm
#   bash scripts/device_kernels.sh --compare OLD.py... [opts]  tests, then an A/B of kernels/triton_rows.py versions
#                                                              (compare_row_kernels.py's options: --form, --inductor...;
#                                                              a version may be PATH:NAME=VALUE, constants set)
# The whole table takes longer than one call on a cold machine (93 of 112 rows in 530 s on an H100; 201 s warm), so
# the benchmark stops after BENCH_SECONDS (default 520) with the rows it has, and a copy stays on the machine outside
# the working tree (which each call replaces): with --resume among the options, the next call on the same warm
# machine goes on from that copy, or from the CSV named by RESUME_FROM (carried in the working tree) if set.
source "$(dirname "$0")/device_setup.sh"
if [ "${1:-}" = "--bench-only" ]; then  # no tests: a call whose minutes are few
  shift
else
  python3 -m pytest -q -p no:cacheprovider --tb=line tests/test_triton_kernels.py tests/test_kernels.py 2>&1 | grep -E "^E |FAILED|passed|failed"
fi
[ "${1:-}" = "--tests-only" ] && exit 0
[ "${1:-}" = "--probe-warps" ] && { python3 scripts/probe_row_warps.py; exit 0; }
[ "${1:-}" = "--probe-gemm" ] && { python3 scripts/probe_blockwise_mm.py; exit 0; }
[ "${1:-}" = "--compare" ] && { shift; python3 scripts/compare_row_kernels.py "$@" kernels/triton_rows.py; exit 0; }
KEPT=/tmp/fusiontune-kept/bench-kernels.csv
case " $* " in
  *" --resume "*)
    if [ -n "${RESUME_FROM:-}" ]; then cp "$RESUME_FROM" "$OUT/bench-kernels.csv" || exit 1
    elif [ -f "$KEPT" ]; then cp "$KEPT" "$OUT/bench-kernels.csv"; fi ;;
esac
timeout "${BENCH_SECONDS:-520}" fusiontune bench-kernels --csv "$OUT/bench-kernels.csv" "$@"
echo "bench-kernels exit code $? (124: stopped after BENCH_SECONDS; run again with --resume for the rest)"
mkdir -p "$(dirname "$KEPT")" && cp "$OUT/bench-kernels.csv" "$KEPT"
python3 scripts/kernel_table.py "$OUT/bench-kernels.csv" > "$OUT/bench-kernels.md"  # the tables, then the targets
tail -4 "$OUT/bench-kernels.md"
