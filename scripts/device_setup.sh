# Sourced by the device scripts: log everything to $OUT/<script>.log, install the carried kit (.carry, built by
# ../shared/device/carry-kit.sh) and fusiontune, and say what machine and software this run is on.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fusiontune-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/$(basename "$0" .sh).log") 2>&1
bash .carry/carry-install.sh .carry && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import torch, triton, ray; print('torch', torch.__version__, 'triton', triton.__version__, 'ray', ray.__version__)"
