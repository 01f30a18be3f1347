#!/usr/bin/env bash
# Here, no GPU: the GPU plan (benchmarks/gpu_plan.py) rehearsed end to end up to the device call, with this
# machine's Python (the same scripts, the wheels' Python version set to it with DALI_PY), every step timed:
#   1. a plain clone of this checkout in $REHEARSE_DIR (the packer needs a .git folder, not a worktree's file);
#   2. gpu_prepare.sh there: wheels, DALI's parts (~8 minutes the first time on an idle 2-core machine), checks;
#   3. what the device calls do: each part copied to /tmp/dali, then the wheels installed into a clean
#      /tmp/site (--target), DALI unpacked by dali-install-remote.sh;
#   4. a python standing in for the device's python3: this machine's Python with torch (TORCH_PY, default the
#      main checkout's .venv), run with -S so that its own site-packages do not count, and only the packages the
#      device has (its site-packages minus what the kit carries: DALI and its helpers, astropy, pyerfa,
#      astropy-iers-data, webdataset, braceexpand, PyYAML) on the path, after /tmp/site and the clone;
#   5. imports dali_lens, nvidia.dali, astropy, webdataset there, checks that yaml, astropy, DALI come from
#      /tmp/site, and runs the GPU graph lint (tests/test_gpu_graphs.py) on the installed DALI;
#   6. --quick: every session of the plan (bg, A, B) with its quick steps on dali-cpu (gpu_plan run --rehearse:
#      the same step runner, limits and $OUT layout, tiny data), the bg session with a python that has no
#      DALI at all, and the files each call would bring back counted against the plan's <= 7;
#   7. the plan's table: expected and worst-case device seconds per call, the total (gpu_plan show).
# /tmp/dali and /tmp/site are the device's paths (dali-install-remote.sh's): they are replaced here.
#   bash benchmarks/gpu_rehearse.sh                      # the whole rehearsal (the packer: 8-40 minutes)
#   bash benchmarks/gpu_rehearse.sh --skip-pack --quick  # no DALI packing (DALI from TORCH_PY's site instead
#                                                        # of /tmp/site), the sessions' quick steps: minutes
set -euo pipefail
skip_pack=0 quick=0
for a in "$@"; do
  case "$a" in --skip-pack) skip_pack=1 ;; --quick) quick=1 ;; *) echo "error: unknown option $a (--skip-pack, --quick)" >&2; exit 2 ;; esac
done
root="$(git rev-parse --show-toplevel)"
work="${REHEARSE_DIR:-/tmp/gpu-rehearse}"
TORCH_PY="${TORCH_PY:-$root/.venv/bin/python}"
[ -x "$TORCH_PY" ] || TORCH_PY="$(git -C "$root" rev-parse --path-format=absolute --git-common-dir)/../.venv/bin/python"
PY="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ "$("$TORCH_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = "$PY" ] || { echo "TORCH_PY is not Python $PY" >&2; exit 1; }
timed() {  # run, print its time, keep its exit status
  local s rc=0
  s=$(date +%s.%N)
  "$@" || rc=$?
  printf 'TIME %6.1f s  %s\n' "$(echo "$(date +%s.%N) - $s" | bc)" "$*"
  return $rc
}

# 1-2. clone and prepare
if [ -d "$work/.git" ]; then git -C "$work" pull -q --ff-only; else git clone -q "$root" "$work"; fi
cd "$work"
timed env DALI_PY="$PY" SKIP_PACK=$skip_pack bash benchmarks/gpu_prepare.sh > "$work/prepare.log" 2>&1 || { cat "$work/prepare.log"; exit 1; }
grep -E "^(wheels|astropy needs|DALI|sizes|commit|TIME)" "$work/prepare.log" || true

# 4. the device's python3: torch and what the device has, nothing the kit carries
site="$("$TORCH_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
base="$work/.device-base"
rm -rf "$base" && mkdir -p "$base" "$work/.device-bin"
kit='astropy|astropy_iers_data|erfa|pyerfa|webdataset|wds2idx|rec2idx|braceexpand|yaml|_yaml|pyyaml|__editable__.*|dali_lens'
dali_pack='nvidia|nvidia_.*|astunparse|gast|libcst|makefun|nvtx|optree|dm_tree|tree'  # DALI and what its pack holds
# DALI and its helpers are carried too (from /tmp/site), unless --skip-pack: then they come from TORCH_PY's site
if [ $skip_pack = 1 ]; then carried="^($kit)\$"; else carried="^($kit|$dali_pack)\$"; fi
for f in "$site"/*; do
  name="$(basename "$f")"; key="$(echo "${name%%-[0-9]*}" | sed 's/\.py$//; s/\.pth$//' | tr 'A-Z-' 'a-z_')"
  echo "$key" | grep -qE "$carried" || ln -s "$f" "$base/$name"
done
printf '#!/bin/sh\nPYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}%s" exec %s -S "$@"\n' "$base" "$TORCH_PY" > "$work/.device-bin/python3"
chmod +x "$work/.device-bin/python3"
export PATH="$work/.device-bin:$PATH"
for d in /.device-base/ /.device-bin/ /prepare.log; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done

# 3. the device calls' commands, in order
rm -rf /tmp/dali /tmp/site
if [ $skip_pack = 1 ]; then
  timed python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  echo "DALI packing skipped (--skip-pack): DALI from $site, not /tmp/site"
else
n=$(cat .dali-parts/COUNT)
last=$(printf %02d $((n - 1)))
for ((i = 0; i < n - 1; i++)); do
  p=$(printf %02d $i)
  timed sh -c "mkdir -p /tmp/dali && cp .dali-parts/p$p/* /tmp/dali/ && ls /tmp/dali | wc -l"
done
install_all() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
    mkdir -p /tmp/dali && cp .dali-parts/p$last/* /tmp/dali/ && source /tmp/dali/dali-install-remote.sh
}
timed install_all
fi
echo "installed: $(du -sh /tmp/site | cut -f1) in /tmp/site"

# 5. what the session needs, from where it must come
export PYTHONPATH="/tmp/site:$work" SKIP_PACK=$skip_pack
timed python3 - <<'PY'
import sys
import dali_lens, nvidia.dali, astropy, webdataset, yaml, torch
assert "site-packages" not in "".join(p for p in sys.path if "device-base" not in p), sys.path
import os
for m in (astropy, webdataset, yaml) + (() if os.environ.get("SKIP_PACK") == "1" else (nvidia.dali,)):
    assert m.__file__.startswith("/tmp/site/"), (m.__name__, m.__file__)
print(f"imports ok: dali_lens {dali_lens.__version__}, DALI {nvidia.dali.__version__}, astropy {astropy.__version__}, "
      f"webdataset from {webdataset.__file__}, yaml {yaml.__version__} from {yaml.__file__}, torch {torch.__version__}")
PY
timed python3 -m pytest -q -p no:cacheprovider tests/test_gpu_graphs.py

# 6. the plan's sessions, quick, on dali-cpu (the bg session with no DALI on the path, as on the device)
if [ $quick = 1 ]; then
  export GPU_PLAN_DATA="$work/gpu-data" GPU_PLAN_BG="$work/out-bg"
  rm -rf "$work"/out-* "$GPU_PLAN_DATA"
  nodali="$work/.device-base-nodali"
  rm -rf "$nodali" && mkdir -p "$nodali"
  for f in "$base"/*; do
    case "$(basename "$f")" in nvidia|nvidia_*) ;; *) ln -s "$(readlink "$f")" "$nodali/$(basename "$f")" ;; esac
  done
  [ -e "$nodali/nvidia" ] && { echo "FAILED: DALI still on the bg session's path" >&2; exit 1; }
  # the measured children run "$TORCH_PY -m ..." (sys.executable) with its site-packages: a sitecustomize on
  # PYTHONPATH keeps nvidia.* unimportable in them too
  printf '%s\n' 'import sys' 'class _NoDali:' '    def find_spec(self, name, path=None, target=None):' \
    '        if name == "nvidia" or name.startswith("nvidia."):' \
    '            raise ImportError(f"{name}: no DALI in the bg session (gpu_rehearse.sh)")' \
    'sys.meta_path.insert(0, _NoDali())' > "$nodali/sitecustomize.py"
  PYTHONPATH="$work:$nodali" GPU_PLAN_PYTHON="$TORCH_PY" timed "$TORCH_PY" -m benchmarks.gpu_plan run bg --rehearse \
    --out "$GPU_PLAN_BG"
  grep -q "nvidia" "$GPU_PLAN_BG/session-bg.log" && echo "note: the bg session's log names nvidia (read it)"
  touch "$GPU_PLAN_BG/DONE"
  for s in A B; do
    GPU_PLAN_PYTHON="$work/.device-bin/python3" timed python3 -m benchmarks.gpu_plan run $s --rehearse --out "$work/out-$s"
  done
  python3 - "$work" <<'PY'
import os, sys
from benchmarks import gpu_plan
work = sys.argv[1]
bad = 0
for name in ("A", "B"):
    got = sorted(os.listdir(os.path.join(work, f"out-{name}")))
    want = sorted({f"session-{name}.log", *(f for s in gpu_plan.sessions()[name] for f in s.files)})
    ok = len(got) <= gpu_plan.FILES_LIMIT and set(got) <= set(want)
    bad += not ok
    print(f"session {name}: {len(got)} files back (plan: {len(want)}, at most {gpu_plan.FILES_LIMIT}): {', '.join(got)}"
          + ("" if ok else "  <- NOT AS PLANNED"))
sys.exit(1 if bad else 0)
PY
fi

# 7. the plan: expected and worst-case device seconds per call
python3 -m benchmarks.gpu_plan show
