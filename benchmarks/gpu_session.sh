#!/usr/bin/env bash
# On the GPU machine: one session of the GPU plan (benchmarks/gpu_plan.py holds the steps, their limits and
# the files they write; benchmarks/README.md has the timed plan; `python3 -m benchmarks.gpu_plan commands`
# prints every device call). Everything goes under $OUT AS IT GOES, so a step cut by its limit keeps what it
# wrote; pytest's log is $OUT/gpu-check.log.
#   bash benchmarks/gpu_session.sh bg   # call 1, in the background (setsid): data, then the loader baselines
#   bash benchmarks/gpu_session.sh A    # call 5, after dali-install-remote.sh: env, tests + journeys, loaders
#   bash benchmarks/gpu_session.sh B    # call 6: shards + predict, data stall, multi-scale memory
set -uo pipefail
cd "$(dirname "$0")/.."
session="${1:?usage: gpu_session.sh bg|A|B}"
if [ "$session" = bg ]; then  # started before the wheels and DALI are installed: nothing from /tmp/site
  export PYTHONPATH="$PWD"
else
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
export OUT
mkdir -p "$OUT"
exec python3 -m benchmarks.gpu_plan run "$session" --out "$OUT"
