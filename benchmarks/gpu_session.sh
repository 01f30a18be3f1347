#!/usr/bin/env bash
# On the GPU machine, after dali-install-remote.sh (see benchmarks/gpu_prepare.sh): the checks only a GPU can
# make, most important first (a session has about 15 minutes of device time in all, machine start and the
# DALI upload included), each bounded in time, results under $OUT (copy them to benchmarks/results/ and
# commit them):
#   1. gpu_check.py: every DALI loader test on the GPU backend            -> gpu-tests-<gpu>.json
#   2. bench_multiscale_memory.py: host and GPU memory vs the legacy mode (the 50 % target), as shipped and
#      with --micro-batch 16 / --memory-budget 256MB
#   3. bench_loaders.py: DALI GPU vs the baseline with 16 workers, 64 px PNG/JPEG -> 3 scales (GPU target)
#   4. bench_train.py: ResNet-18 and the small CNN at 224 px, data-wait fraction (GPU target < 5 %)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/nvidia-smi.csv" 2>&1
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; timeout "$t" "$@" 2>&1 | tee -a "$OUT/session.log"; }
step 150 python3 benchmarks/gpu_check.py --out "$OUT/gpu-tests.json"
step 150 python3 benchmarks/bench_multiscale_memory.py --backends dali --batches 128 --no-loader-only --repeats 1 \
  --out "$OUT/multiscale-memory-gpu.json"
step 110 python3 benchmarks/bench_loaders.py --backends dali,dali-cpu,baseline --formats png,jpeg --sizes 64 \
  --scales multi --batches 256 --deadline 90 --out "$OUT/loaders-gpu.json"
step 100 python3 benchmarks/bench_train.py --models resnet18,small_cnn --sizes 224 --backends dali,torchvision \
  --out "$OUT/train-gpu.json"
ls -la "$OUT"
