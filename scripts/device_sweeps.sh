#!/usr/bin/env bash
# One call on the GPU machine (device tool): install the carried kit and fusiontune, then run each sweep (or tune
# file: tune-*.yaml) into results/<name>, resuming what an earlier call left there (carry results/<name> back in),
# within BUDGET seconds in all (default 540): a run stopped at the budget keeps every config it finished. Each run
# folder comes back as $OUT/<name>.tar.gz without its traces (8 files come back at most; traces stay out of git).
# CONFIG_TIMEOUT (seconds) caps one config of a sweep (fusiontune run --config-timeout). A tune the budget stops is
# summarised from its study (fusiontune tune --summarize: its best marked unconfirmed); run it again to confirm.
# TUNE_ARGS: more options for every tune (--grid: measure every point of the search). RUN_ARGS: more options for
# every sweep (--unpaired: time each config alone; a paired batch's rows are written size by size as it
# measures them, so a budget that cuts a batch keeps the sizes it finished, and --resume measures the rest).
# SUFFIX: appended to every folder's name (results/<name><SUFFIX>), for a machine of another kind than the one a
# folder was measured on (SUFFIX=-h200: a resume refuses rows of another kind of GPU).
# Usage there:  BUDGET=540 bash scripts/device_sweeps.sh sweeps/A.yaml sweeps/tune-B.yaml ...
source "$(dirname "$0")/device_setup.sh"
budget=${BUDGET:-540}
for file in "$@"; do
  name=$(python3 -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['name'])" "$file")${SUFFIX:-}
  left=$((budget - SECONDS))
  if [ "$left" -lt 45 ]; then echo "== $name: not started, ${left}s of the budget left"; continue; fi
  echo "== $name: ${left}s left"
  case "$(basename "$file")" in
    tune-*) cmd=(fusiontune tune "$file" --out "results/$name" ${TUNE_ARGS:-}); left=$((left - 20)) ;;  # to summarise
    *) cmd=(fusiontune run "$file" --out "results/$name" --resume ${CONFIG_TIMEOUT:+--config-timeout "$CONFIG_TIMEOUT"}
            ${RUN_ARGS:-}) ;;
  esac
  timeout -s INT -k 20 "$left" "${cmd[@]}" 2>&1 | grep -v "^[│┃┏┡└]"
  # a tune stopped by the budget wrote no summary (or an older one): write it from the study, measuring nothing
  case "$(basename "$file")" in
    tune-*) db="results/$name/study.db"; summary="results/$name/tune.json"
      if [ -f "$db" ] && { [ ! -f "$summary" ] || [ "$db" -nt "$summary" ]; }; then
        fusiontune tune "$file" --out "results/$name" ${TUNE_ARGS:-} --summarize 2>&1 | tail -3
      fi ;;
  esac
  [ -d "results/$name" ] && fusiontune report "results/$name" >/dev/null 2>&1
  tar czf "$OUT/$name.tar.gz" --exclude=traces -C results "$name"
done
echo "== done in ${SECONDS}s"
