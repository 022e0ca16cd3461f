# Sourced by the device scripts: log everything to $OUT/<script>.log, install what the call carried (.carry: the
# ray / optuna / pydantic kit built by ../shared/device/carry-kit.sh; .whl: extra wheels such as flashinfer-python)
# and fusiontune, and say what machine and software this run is on.
set -uo pipefail
export PYTHONUNBUFFERED=1
# NVLink multicast off in every process a device call starts (kernels/symm_mem.py's MULTICAST_OFF; the launcher
# and bench-kernels --tp set it too): it can take a shared host's GPUs out of service
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/fusiontune-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/$(basename "$0" .sh).log") 2>&1
export PYTHONPATH=/tmp/site
if [ -d .carry ]; then bash .carry/carry-install.sh .carry || exit 1; fi
if [ -d .whl ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  fi
  # scripts/flashinfer_kit.py --prebuilt: FlashInfer's Python files only (no headers: it loads built modules)
  if [ -f .whl/flashinfer-prebuilt.tar.xz ]; then tar -C /tmp/site -xJf .whl/flashinfer-prebuilt.tar.xz || exit 1; fi
  # FlashInfer modules built on an earlier call (.whl/aot/NAME.so, or NAME.so.xz from the prebuilt kit): where
  # FlashInfer looks for prebuilt modules first, so it loads them instead of compiling for minutes
  for so in .whl/aot/*.so .whl/aot/*.so.xz; do
    [ -e "$so" ] && [ -d /tmp/site/flashinfer ] || continue  # (device_compare_allreduce.sh may hold FlashInfer back)
    name=$(basename "${so%.xz}" .so); mkdir -p "/tmp/site/flashinfer/data/aot/$name"
    case "$so" in
      *.xz) xz -dc "$so" > "/tmp/site/flashinfer/data/aot/$name/$name.so" || exit 1 ;;
      *) cp "$so" "/tmp/site/flashinfer/data/aot/$name/" ;;
    esac
    export FLASHINFER_DISABLE_JIT=1  # a module that does not load fails at once instead of compiling for minutes
    export FLASHINFER_USE_CUDA_NORM=1  # its norms from the built norm module (the CuTe DSL they prefer is not carried)
  done
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 - <<'PY'
import importlib.util, torch, triton
have = [n for n in ("ray", "optuna", "flashinfer") if importlib.util.find_spec(n)]
print("torch", torch.__version__, "triton", triton.__version__, "carried:", ", ".join(have) or "nothing")
PY
