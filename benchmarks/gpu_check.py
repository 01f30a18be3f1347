#!/usr/bin/env python
"""Run the loader tests on the DALI GPU backend and record the outcome as JSON, with the device name.

The test suite parametrizes its DALI tests over ``conftest.DALI_BACKENDS``: ``dali-cpu`` everywhere, and
``dali`` (the same pipeline code with ``device_id`` set: the ``'mixed'`` decoder, the GPU numpy / FITS /
webdataset readers, every later op on the GPU) where CUDA and DALI are present. This script selects exactly
the ``dali`` cases, most important first (``FIRST``: the checks no CPU machine could make, .fits.fz through
DALI's GPU reader and .npy with and without cuFile, then equivalence with torchvision), then every other
``dali`` case of ``TEST_FILES`` (every sample exactly once, DDP shards, shuffling, augmentation shared by the
scales, mid-epoch resume, uint8 output, bad input, the challenge layout, packed shards).

Results are written WHILE the tests run (``gpu_results_plugin.py``): the JSON (--out, default
$OUT/gpu-tests.json on the device, else benchmarks/results/gpu-tests-<gpu>.json) is rewritten after every
test, and pytest's output goes line by line to the log beside it (gpu-check.log). A run killed by a time limit
keeps every finished test's outcome; "finished": false says it was cut short.

Without a GPU it writes nothing and exits with status 2 (nothing to record), unless ``--backend dali-cpu``
rehearses the same run with the CPU cases.

  python -m benchmarks.gpu_check            # on the GPU machine
  python -m benchmarks.gpu_check --list     # only show which tests would run
  python -m benchmarks.gpu_check --backend dali-cpu --out /tmp/x.json   # rehearsal on a CPU machine
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys

from benchmarks import common
from benchmarks.common import RESULTS, ROOT

TEST_FILES = ("tests/test_gpu_logic.py", "tests/test_loaders.py", "tests/test_challenge.py", "tests/test_shards.py")
# most important first: what no CPU machine can check, then the equivalence of the GPU pipeline with torchvision
FIRST = ("test_fits_fz_through_dali", "test_npy_through_the_gpu_reader", "test_dali_matches_torchvision",
         "test_fits_hdus_by_index")


def case_pattern(backend: str) -> re.Pattern:
    if backend == "dali":
        return re.compile(r"[\[-]dali(?:\]|-(?!cpu))")  # the 'dali' parameter, not 'dali-cpu'
    return re.compile(r"[\[-]dali-cpu(?:\]|-)")


def select(backend: str = "dali") -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *TEST_FILES], cwd=ROOT, capture_output=True, text=True)
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    pat = case_pattern(backend)
    cases = [i for i in ids if "[" in i and pat.search(i[i.index("["):])]

    def rank(test_id: str) -> int:
        name = test_id.split("::")[-1]
        return next((k for k, prefix in enumerate(FIRST) if name.startswith(prefix)), len(FIRST))

    return sorted(cases, key=rank)  # stable: file order within a rank


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="result JSON (default $OUT/gpu-tests.json, else benchmarks/results/gpu-tests-<gpu>.json)")
    p.add_argument("--log", help="pytest's output, line by line (default: gpu-check.log beside --out)")
    p.add_argument("--list", action="store_true", help="print the selected tests and exit")
    p.add_argument("--first", type=int, metavar="N", help="only the N most important cases (a rehearsal)")
    p.add_argument("--backend", choices=("dali", "dali-cpu"), default="dali",
                   help="dali-cpu: rehearse the run with the CPU cases (no GPU needed)")
    args = p.parse_args(argv)
    cases = select(args.backend)
    if args.first is not None:
        if args.first < 1:
            p.error(f"--first: at least 1 (got {args.first})")
        cases = cases[:args.first]
    if args.list:
        print("\n".join(cases) or "(none: no CUDA GPU with DALI here)")
        return 0
    info = common.machine_info()
    if args.backend == "dali" and (not info.get("gpu") or not cases):
        print("no CUDA GPU with DALI here: the GPU cases are not collected; nothing to record", file=sys.stderr)
        return 2
    default_dir = os.environ.get("OUT") or RESULTS
    out = os.path.abspath(args.out or os.path.join(default_dir, "gpu-tests.json" if os.environ.get("OUT") else
                                                   f"gpu-tests-{common.device_tag(info)}.json"))
    log = os.path.abspath(args.log or os.path.join(os.path.dirname(out), "gpu-check.log"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    common.write_json_atomic(out, {"benchmark": "gpu-tests", "backend": args.backend, "machine": info,
                                   "command": common.command_line(), "timestamp": common.utc_timestamp(),
                                   "selected": cases, "finished": False})
    env = dict(os.environ, GPU_CHECK_JSON=out, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    with open(log, "w", buffering=1) as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                                 "-p", "benchmarks.gpu_results_plugin", *cases], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

        def stop(signum, frame):  # a time limit (timeout sends SIGTERM): stop pytest too, keep what it wrote
            fh.write(f"gpu_check: stopped by signal {signum}\n")
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
            sys.exit(124)

        signal.signal(signal.SIGTERM, stop)
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write(line)
        rc = proc.wait()
    print(f"pytest exit status {rc}; results -> {out}, log -> {log}")
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
