#!/usr/bin/env bash
# Issue 19, one call on a one-GPU machine: the repro sweep (sweeps/repro-single-gpu-llama8b-fp8-static.yaml, paired)
# into results/<its name>-<TAG>, TAG naming the machine (run it on a second machine with another tag, then
# `fusiontune compare` the two). With COST=1, then the cost of paired timing: the same sweep at a fixed 20 repeats
# (no settling), unpaired and then paired, Inductor's cache warm from the first run, each run's wall time said.
# Run folders come back as $OUT/<folder>.tar.gz. Usage there:  TAG=a COST=1 bash scripts/device_repro.sh
source "$(dirname "$0")/device_setup.sh"
tag=${TAG:?TAG names the machine: a, b, ...}
nvidia-smi -L  # the GPU's UUID: which machine this was
sweep=sweeps/repro-single-gpu-llama8b-fp8-static.yaml
name=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$sweep")
timed_run() {  # folder, then fusiontune run's options; says the wall time, returns the folder as a tarball
  local folder=$1; shift
  local t0=$SECONDS
  timeout -s INT -k 20 "${LIMIT:-480}" fusiontune run "$@" --out "results/$folder" --resume 2>&1 | grep -v "^[│┃┏┡└]"
  echo "== $folder: $((SECONDS - t0)) s wall"
  tar czf "$OUT/$folder.tar.gz" --exclude=traces -C results "$folder"
}
timed_run "$name-h200-$tag" "$sweep"
if [ "${COST:-0}" = 1 ]; then
  python3 - "$sweep" <<'PY'
import sys, yaml
spec = yaml.safe_load(open(sys.argv[1]))
spec["name"] += "-fixed20"
spec["measure"].update(repeats=20, max_repeats=20)
open("/tmp/fixed20.yaml", "w").write("# the repro sweep at a fixed 20 repeats: the cost of paired timing\n"
                                     + yaml.safe_dump(spec, sort_keys=False))
PY
  for how in unpaired paired; do
    left=$((570 - SECONDS)); [ "$left" -lt 60 ] && { echo "== cost, $how: not started, ${left}s left"; continue; }
    LIMIT=$left timed_run "$name-fixed20-$how-h200-$tag" /tmp/fixed20.yaml "--$how"
  done
fi
echo "== done in ${SECONDS}s"
