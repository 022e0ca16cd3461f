#!/usr/bin/env bash
# One call on a GPU machine of 2 or more GPUs (device tool, nvidia-h100-x2/-x4 or nvidia-h200-x2/-x4): how the GPUs
# are linked, the collective kernel tests (fused all-reduce + norm with its meetings, under CUDA graphs; the
# symmetric-memory all-reduces; AsyncTP's fused ops), then bench-kernels --tp 2 (and --tp 4 where 4 GPUs are seen).
# Usage there:  bash scripts/device_collectives.sh [bench-kernels options]   (CSV and log under $OUT)
source "$(dirname "$0")/device_setup.sh"
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi topo -m | head -8
timeout -k 10 300 python3 -m pytest -q -p no:cacheprovider --tb=short tests/test_allreduce_rms_kernel.py 2>&1 \
  | grep -vE "^(  |$)" | tail -40
for tp in 2 4; do
  [ "$gpus" -lt "$tp" ] && continue
  timeout -k 10 "${BENCH_SECONDS:-240}" fusiontune bench-kernels --tp "$tp" --csv "$OUT/bench-collectives-tp$tp.csv" "$@"
done
echo "== collectives done in ${SECONDS}s"
