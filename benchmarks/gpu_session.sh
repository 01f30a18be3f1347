#!/usr/bin/env bash
# On the GPU machine, after dali-install-remote.sh (see benchmarks/gpu_prepare.sh and the timed plan in
# benchmarks/README.md): the checks only a GPU can make, most important first, each bounded in time, every
# result and the whole log written under $OUT AS IT GOES (a step cut short keeps what it finished). Copy $OUT
# to benchmarks/results/ and commit it.
#   0. environment: GPU, versions, where yaml/astropy/DALI come from, cuFile found or not   -> env.txt
#   1. gpu_check.py: every DALI loader test on the GPU backend, .fits.fz and .npy-with/without-cuFile first
#                                                                                          -> gpu-tests.json
#   2. bench_multiscale_memory.py: host and GPU memory vs the legacy mode (the 50 % target) -> multiscale-memory-gpu.json
#   3. bench_loaders.py: DALI GPU vs the baseline, 64 px PNG/JPEG -> 3 scales             -> loaders-gpu.json
#   4. bench_train.py: ResNet-18 and the small CNN at 224 px, data-wait fraction          -> train-gpu.json
# Limits: 10 + 210 + 75 + 75 + 60 s = 430 s (7.2 min) at most.
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
from dali_lens.pipelines import dali_backend
print("libcufile.so.0:", dali_backend._load_cufile() or "not found: .npy read on the CPU, then .gpu()")
PY
}
step 10 env_report > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
step 210 python3 -m benchmarks.gpu_check --out "$OUT/gpu-tests.json"
step 75 python3 -m benchmarks.bench_multiscale_memory --backends dali --batches 128 --no-loader-only --repeats 1 \
  --out "$OUT/multiscale-memory-gpu.json"
step 75 python3 -m benchmarks.bench_loaders --backends dali,dali-cpu,baseline --formats png,jpeg --sizes 64 \
  --scales multi --batches 256 --deadline 60 --out "$OUT/loaders-gpu.json"
step 60 python3 -m benchmarks.bench_train --models resnet18,small_cnn --sizes 224 --backends dali,torchvision \
  --out "$OUT/train-gpu.json"
ls -la "$OUT"
