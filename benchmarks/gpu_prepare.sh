#!/usr/bin/env bash
# Here (no GPU needed), from the project root: everything a GPU session must send to the device machine.
# The plan these files serve is benchmarks/gpu_plan.py (`python3 -m benchmarks.gpu_plan show`; its table is
# benchmarks/README.md's timed plan).
#
# The GPU machine (Python 3.12, torch 2.11, torchvision 0.26, numpy 2.5.2 as one session's pip list read it:
# /work/.library/device/KINDS.md) has no DALI, astropy or webdataset, and no package registry. This script
#   1. downloads the wheels dali_lens needs besides DALI into .whl/ (about 17 MB): astropy and its two
#      helpers, webdataset with braceexpand and PyYAML (without PyYAML webdataset silently falls back to
#      another decoder path), timm (resnet18 and every timm --arch; it imports without its optional
#      huggingface_hub and safetensors, which only the hub and .safetensors --weights need), for the device's
#      Python ($DALI_PY, default 3.12); any failed download STOPS here. pyarrow (Parquet predictions) and
#      tensorboard are not carried: the plan writes CSV, and a run without tensorboard says so and goes on;
#   2. checks that astropy's numpy requirement admits the device's numpy ($DEVICE_NUMPY, default 2.5.2);
#   3. packs DALI with the shared packer dali-parts.sh (same $DALI_PY) into parts of at most 52 MiB ($PART_MIB):
#      DALI 2.4 packs to 244 MiB: 5 parts, the last ~36 MiB, which travels with the wheels (50 MiB + the
#      tree, under the 64 MiB a call carries); 8 minutes on an idle 2-core machine, 40 under load at nice 19;
#      then checks that every wheel DALI's metadata asks for was downloaded (the packer does not);
#   4. writes the checkout's commit to .gpu-meta/COMMIT (.git does not travel; every result JSON's machine
#      block reads it: benchmarks/common.py git_commit), with "-dirty" when tracked files differ from it;
#   5. checks the plan against the device limits and prints the device calls (gpu_plan.py commands).
# SKIP_PACK=1 skips step 3 (a rehearsal without the 8-40 minute packer; the calls are then printed for 5 parts).
#
#   bash benchmarks/gpu_prepare.sh                 # for the device (Python 3.12)
#   DALI_PY=3.11 bash benchmarks/gpu_prepare.sh    # rehearsal with this machine's Python
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY="${DALI_PY:-3.12}"
DEVICE_NUMPY="${DEVICE_NUMPY:-2.5.2}"
fail() { echo "gpu_prepare: FAILED: $*" >&2; exit 1; }
exclude="$(git rev-parse --git-path info/exclude)"  # also right in a git worktree, where .git is a file
mkdir -p "$(dirname "$exclude")"
for d in /.whl/ /.gpu-meta/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done

WHEELS=(astropy==8.0.2 pyerfa==2.0.1.5 astropy-iers-data==0.2026.11.2.0.34.55 webdataset==1.0.2 braceexpand==0.1.7
        PyYAML==6.0.3 timm==1.0.31)
stamp="py$PY ${WHEELS[*]}"
if [ "$(cat .whl/STAMP 2>/dev/null)" != "$stamp" ]; then
  rm -rf .whl && mkdir -p .whl
  for req in "${WHEELS[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 -d .whl "$req" > .whl/pip.log 2>&1 \
      || { cat .whl/pip.log >&2; rm -rf .whl; fail "could not download $req for Python $PY"; }
  done
  rm -f .whl/pip.log
  echo "$stamp" > .whl/STAMP
fi
[ "$(ls .whl/*.whl | wc -l)" -eq "${#WHEELS[@]}" ] || fail "expected ${#WHEELS[@]} wheels in .whl, found $(ls .whl/*.whl | wc -l)"
echo "wheels for Python $PY: $(ls .whl/*.whl | wc -l) files, $(du -sh .whl | cut -f1)"

# astropy's numpy requirement against the device's numpy (no registry there: a mismatch would fail on the device)
unzip -p .whl/astropy-*.whl '*/METADATA' > .whl/astropy.METADATA
python3 - .whl/astropy.METADATA "$DEVICE_NUMPY" <<'PY' || fail "astropy does not take the device's numpy $DEVICE_NUMPY: pick another astropy or carry a numpy"
import sys
from pip._vendor.packaging.requirements import Requirement
meta, have = sys.argv[1], sys.argv[2]
reqs = [Requirement(ln.split(":", 1)[1].strip()) for ln in open(meta) if ln.startswith("Requires-Dist:")]
spec = next((r.specifier for r in reqs if r.name == "numpy" and not r.marker), None)
ok = spec is None or have in spec
verdict = "ok" if ok else "NOT OK"
print(f"astropy needs numpy{spec}; the device has numpy {have}: {verdict}")
sys.exit(0 if ok else 1)
PY
rm -f .whl/astropy.METADATA

# the commit the device runs (carried as .gpu-meta in calls 1, 5 and 6)
mkdir -p .gpu-meta
commit="$(git rev-parse HEAD)"
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
echo "$commit" > .gpu-meta/COMMIT
echo "commit for the device: $commit"

if [ "${SKIP_PACK:-0}" = 1 ]; then
  echo "DALI packing SKIPPED (SKIP_PACK=1): no .dali-parts; the calls below assume 5 parts"
  python3 -m benchmarks.gpu_plan commands --parts 5
  exit $?
fi

# the shared DALI packer: shared/device in a checkout that has it, else beside this checkout, else /work/shared
packer="${DALI_PARTS:-}"
for c in shared/device/dali-parts.sh ../shared/device/dali-parts.sh /work/shared/device/dali-parts.sh; do
  [ -z "$packer" ] && [ -x "$c" ] && packer="$c"
done
[ -n "$packer" ] || fail "no dali-parts.sh (set DALI_PARTS=/path/to/dali-parts.sh)"
[ -d .git ] || fail "the packer writes .git/info/exclude, which a git worktree lacks: run this in a plain clone (git clone . /tmp/clone)"
DALI_PY="$PY" PART_MIB="${PART_MIB:-52}" "$packer" | sed -e 's/^plan:/plan (the LAST call also carries ".whl" and installs it, see below):/'

# every wheel DALI's metadata requires (numpy, six, packaging are on the device) must have been downloaded
missing=()
for req in $(unzip -p .dali-whl/nvidia_dali_cuda120-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
             | cut -d';' -f1 | tr -d ' ' | sed 's/\[all\]//'); do
  name=$(echo "$req" | sed 's/[<>=~!].*//' | tr 'A-Z.-' 'a-z__')
  case "$name" in numpy|six|packaging) continue ;; esac
  ls .dali-whl | sed 's/-.*//' | tr 'A-Z.-' 'a-z__' | grep -qxF "$name" || missing+=("$req")
done
[ ${#missing[@]} -eq 0 ] || fail "DALI's packer did not download: ${missing[*]} (its download errors are not reported: rerun it)"
echo "DALI's requirements: all $(ls .dali-whl/*.whl | wc -l) wheels present"
last=$(( $(cat .dali-parts/COUNT) - 1 ))
echo "sizes: last part $(du -sm .dali-parts/p$(printf %02d $last) | cut -f1) MiB + .whl $(du -sm .whl | cut -f1) MiB + the tree $(git ls-files -z | du -cm --files0-from=- | tail -1 | cut -f1) MiB (at most 64)"
echo
python3 -m benchmarks.gpu_plan commands  # the calls, back to back (gpu_plan.py; limits checked: exit 1 if broken)
