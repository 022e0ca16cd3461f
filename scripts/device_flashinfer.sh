#!/usr/bin/env bash
# One call on a machine of several GPUs (device tool, carrying .whl built by scripts/flashinfer_kit.py, not .carry):
# build FlashInfer's communication kernels (nvcc, first use), time them beside ours with bench-kernels --tp, and run
# the GPU kernel test, whose FlashInfer part checks its fused op against the unfused chain. CSV and log under $OUT.
# The build is one nvcc translation unit: 258-286 s on 2 x H200 once, over 330 s another time; a build cut short
# keeps nothing, and the next import starts it again, so give it room (BUILD_TIMEOUT, seconds).
# Usage there:  bash scripts/device_flashinfer.sh
source "$(dirname "$0")/device_setup.sh"
export PATH=/tmp/site/bin:$PATH MAX_JOBS=${MAX_JOBS:-16}
tp=${TP:-$(nvidia-smi -L | wc -l)}
echo "== building FlashInfer's trtllm_comm module"
timeout "${BUILD_TIMEOUT:-480}" python3 -c "
import time; t = time.time()
from flashinfer.comm.trtllm_ar import get_trtllm_comm_module
get_trtllm_comm_module(); print(f'built in {time.time() - t:.0f} s')" || { echo "== the build failed"; exit 1; }
timeout "${BENCH_TIMEOUT:-240}" fusiontune bench-kernels --tp "$tp" --op allreduce+add+rms_norm \
  --op "allreduce+add+rms_norm->fp8-static" --csv "$OUT/flashinfer-tp$tp.csv"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -x -q tests/test_allreduce_rms_kernel.py -k several_gpus 2>&1 | tail -25
echo "== done in ${SECONDS}s"
