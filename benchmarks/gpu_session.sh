#!/usr/bin/env bash
# On the GPU machine, after dali-install-remote.sh (see benchmarks/gpu_prepare.sh and the timed plan in
# benchmarks/README.md): the checks only a GPU can make, most important first, each bounded in time, every
# result and the whole log written under $OUT AS IT GOES (a step cut short keeps what it finished). Copy $OUT
# to benchmarks/results/ and commit it.
#   0. environment: GPU, versions, where yaml/astropy/DALI come from, cuFile found or not   -> env.txt
#   1. gpu_check.py: every DALI loader test on the GPU backend, .fits.fz and .npy-with/without-cuFile first
#                                                                                          -> gpu-tests.json
#      AT THE SAME TIME gpu_journeys.py: the README's main job with no flags (auto must pick the GPU), then
#      png/jpeg/fits/npy x train/predict/evaluate, multiscale, ensemble, challenge, packed shards on --backend
#      dali (correctness, not timing, so it shares the GPU with the tests)    -> journeys-gpu.json, journeys.log
#   2. bench_multiscale_memory.py: host and GPU memory vs the legacy mode (the 50 % target) -> multiscale-memory-gpu.json
#   3. bench_loaders.py: DALI GPU vs the baseline, 64 px PNG/JPEG -> 3 scales             -> loaders-gpu.json
#   4. bench_train.py: ResNet-18 and the small CNN at 224 px, data-wait fraction          -> train-gpu.json
# Limits: 10 + 280 (the tests and, beside them, the journeys) + 110 + 90 + 90 s = 580 s (9.7 min) at most. The
# first session (H200, 2026-11-29) needed: tests 89 s, journeys ~260 s, memory >75 s (7 of 9 runs at 75 s),
# loaders >75 s (5 of 6), train >60 s (1 of 6 after data generation). At most 8 files come back from $OUT: the
# benchmarks write no plots here (--no-plot; they are drawn from the JSON later) and pytest's log stays in
# session.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
export OUT
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
t0=$(date +%s)
step() {
  local t=$1; shift
  echo "== [$(( $(date +%s) - t0 )) s] $* (limit ${t} s)"
  timeout -k 5 "$t" "$@"
  echo "== exit $? at $(( $(date +%s) - t0 )) s"
}
env_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'PY'
import importlib
for name in ("numpy", "torch", "torchvision", "yaml", "astropy", "webdataset", "nvidia.dali"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} from {m.__file__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: IMPORT FAILED: {exc}")
from dali_lens.data.kinds.npy import load_cufile
print("libcufile.so.0:", load_cufile() or "not found: .npy read on the CPU, then .gpu()")
PY
}
export -f env_report  # timeout runs programs, not shell functions (the first session lost env.txt so)
step 10 bash -c env_report > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
timeout -k 5 280 python3 -m benchmarks.gpu_journeys --out "$OUT/journeys-gpu.json" > "$OUT/journeys.log" 2>&1 &
journeys=$!
step 210 python3 -m benchmarks.gpu_check --out "$OUT/gpu-tests.json" --log /tmp/gpu-check.log
wait $journeys; echo "== journeys exit $? at $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/journeys.log"
step 110 python3 -m benchmarks.bench_multiscale_memory --backends dali --batches 128 --no-loader-only --repeats 1 \
  --no-plot --out "$OUT/multiscale-memory-gpu.json"
step 90 python3 -m benchmarks.bench_loaders --backends dali,dali-cpu,baseline --formats png,jpeg --sizes 64 \
  --scales multi --batches 256 --deadline 60 --no-plot --out "$OUT/loaders-gpu.json"
step 90 python3 -m benchmarks.bench_train --models resnet18,small_cnn --sizes 224 --backends dali,torchvision \
  --no-plot --out "$OUT/train-gpu.json"
ls -la "$OUT"
