#!/usr/bin/env bash
# One call on a machine of several GPUs (device tool; carry .whl for FlashInfer, and .carry too where .whl is the
# --prebuilt kit of scripts/flashinfer_kit.py, which leaves pydantic to it): the fused all-reduce + norm
# kernel's GPU test, then its variants timed side by side (scripts/compare_allreduce_kernels.py) at TP 4 and 2.
# FlashInfer's JIT build (one nvcc unit, 235-480 s) goes to .flashinfer-cache in the working tree, and the built
# module comes back as $OUT/trtllm_comm.so: put it in .whl/aot/ and later calls load it (device_setup.sh) instead
# of compiling. FI_BACKGROUND=1: build it in the background while the rest runs without FlashInfer.
# Env: TPS ("4 2"), TOKENS (or TOKENS4, TOKENS2: by TP) / SPLITS / QUANTS (the probe's), PROBE_SECONDS, TEST=0 skips
# the test, TEST_K picks its cases (pytest -k; default "several_gpus": ours and FlashInfer's).
# Usage there:  bash scripts/device_compare_allreduce.sh
if [ "${FI_BACKGROUND:-0}" = 1 ] && [ -d .whl ]; then mkdir -p .whl-later; mv .whl/flashinfer_python-*.whl .whl-later/; fi
source "$(dirname "$0")/device_setup.sh"
export FLASHINFER_WORKSPACE_BASE=$PWD/.flashinfer-cache PATH=/tmp/site/bin:/tmp/fisite/bin:$PATH MAX_JOBS=16
if [ -d .whl-later ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fisite .whl-later/*.whl .whl/*.whl || exit 1
  (PYTHONPATH=/tmp/fisite:/tmp/site timeout 560 python3 -c "
import time; t = time.time()
from flashinfer.comm.trtllm_ar import get_trtllm_comm_module
get_trtllm_comm_module(); print(f'== FlashInfer built in {time.time() - t:.0f} s')" > "$OUT/flashinfer-build.log" 2>&1) &
  builder=$!
fi
nvidia-smi --query-gpu=index,name,power.limit,clocks.max.sm --format=csv,noheader
if [ "${TEST:-1}" = 1 ]; then
  timeout -k 10 "${TEST_SECONDS:-240}" python3 -m pytest -q -p no:cacheprovider --tb=short -k "${TEST_K:-several_gpus}" \
    tests/test_allreduce_rms_kernel.py 2>&1 | grep -vE "^(  |$)" | tail -30
fi
gpus=$(nvidia-smi -L | wc -l)
for tp in ${TPS:-4 2}; do
  [ "$gpus" -lt "$tp" ] && continue
  sizes=TOKENS$tp
  TOKENS=${!sizes:-${TOKENS:-}} CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((tp - 1))) timeout -k 10 "${PROBE_SECONDS:-280}" \
    python3 scripts/compare_allreduce_kernels.py "$tp" "$OUT/compare-tp$tp.csv" 2>&1 | grep -v Warning
done
if [ -n "${builder:-}" ]; then wait "$builder"; cat "$OUT/flashinfer-build.log" | tail -5; fi
built=$(find .flashinfer-cache -name trtllm_comm.so 2>/dev/null | head -1)  # carry it back as .whl/aot/
[ -n "$built" ] && cp "$built" "$OUT/" && ls -la "$OUT/trtllm_comm.so"
echo "== done in ${SECONDS}s"
