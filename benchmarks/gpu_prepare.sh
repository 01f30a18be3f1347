#!/usr/bin/env bash
# Here (no GPU needed), from the project root: everything a GPU session must send to the device machine.
#
# The GPU machine has Python 3.12, torch, torchvision, numpy, pillow, matplotlib, tqdm and pytest, but not
# DALI, astropy or webdataset, and no package registry. This script
#   1. downloads the Python 3.12 wheels dali_lens needs besides DALI into .whl/ (about 13 MB),
#   2. packs DALI with ../shared/device/dali-parts.sh into parts of at most 48 MiB (so that the first part
#      and the wheels travel together under the 64 MiB a call carries; ~8 minutes the first time),
#   3. prints the device calls: one per part, back to back, the last one running benchmarks/gpu_session.sh.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
mkdir -p .whl
for req in astropy==8.0.2 pyerfa==2.0.1.5 astropy-iers-data==0.2026.11.2.0.34.55 \
           webdataset==1.0.2 braceexpand==0.1.7; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "$req" 2>&1 | grep -v '^WARNING: Location' || true
done
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1)"
PART_MIB=48 ../shared/device/dali-parts.sh | sed -e 's/^plan:/plan (the FIRST call also carries ".whl" and installs it, see below):/'
cat <<'PLAN'

First call: carry [".dali-parts/p00", ".whl"] and start its command with
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
Last call's <your GPU work>: bash benchmarks/gpu_session.sh   (writes everything under $OUT; at most 8.5 minutes, most important check first)
PLAN
