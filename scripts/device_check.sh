#!/usr/bin/env bash
# One call on the GPU machine (device tool): install the carried kit and
# fusiontune, run the kernel tests on CUDA, then the smoke sweep and the Llama-3.1-8B FP8 check sweep through Ray.
# Usage there:  bash scripts/device_check.sh   (results under $OUT, a log in $OUT/device_check.log)
source "$(dirname "$0")/device_setup.sh"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 | tail -4
runs=/tmp/fusiontune-runs
for sweep in "$@"; do
  name=$(basename "$sweep" .yaml)
  fusiontune run "$sweep" --out "$runs/$name" 2>&1 | grep -v "^[│┃┏┡└]"
  mkdir -p "$OUT/$name"  # the PNG is rebuilt here from the Parquet (fusiontune report): 8 files come back at most
  cp "$runs/$name"/{report.md,results.parquet,manifest.json} "$OUT/$name/" 2>/dev/null
done
