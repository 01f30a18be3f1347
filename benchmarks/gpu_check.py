#!/usr/bin/env python
"""Run the loader tests on the DALI GPU backend and record the outcome as JSON, with the device name.

The test suite parametrizes its DALI tests over ``conftest.DALI_BACKENDS``: ``dali-cpu`` everywhere, and
``dali`` (the same pipeline code with ``device_id`` set: the ``'mixed'`` decoder, the GPU numpy / FITS /
webdataset readers, every later op on the GPU) where CUDA and DALI are present. This script selects exactly
the ``dali`` cases (equivalence with the torchvision backend for PNG, JPEG, .npy, FITS and multi-band data,
every sample exactly once, DDP shards, shuffling, augmentation shared by the scales, mid-epoch resume,
uint8 output, bad input, the challenge layout through DALI's per-band FITS readers, packed shards), runs
them with pytest and writes benchmarks/results/gpu-tests-<gpu name>.json (--out): device, versions, counts,
and every test's outcome with the first lines of its failure.

Without a GPU it writes nothing and exits with status 2: there is nothing to record.

  python benchmarks/gpu_check.py            # on the GPU machine
  python benchmarks/gpu_check.py --list     # only show which tests would run
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import common  # noqa: E402

TEST_FILES = ("tests/test_loaders.py", "tests/test_challenge.py", "tests/test_shards.py")
GPU_CASE = re.compile(r"[\[-]dali(?:\]|-(?!cpu))")  # the 'dali' parameter, not 'dali-cpu'


def gpu_cases() -> list[str]:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          *TEST_FILES], cwd=ROOT, capture_output=True, text=True)
    ids = [ln.strip() for ln in out.stdout.splitlines() if "::" in ln]
    return [i for i in ids if "[" in i and GPU_CASE.search(i[i.index("["):])]


def parse_junit(path: str) -> list[dict]:
    cases = []
    for tc in ET.parse(path).getroot().iter("testcase"):
        rec = {"test": f"{tc.get('classname', '')}::{tc.get('name')}", "seconds": float(tc.get("time") or 0)}
        rec["outcome"] = "passed"
        for kind in ("failure", "error", "skipped"):
            el = tc.find(kind)
            if el is not None:
                rec["outcome"] = {"failure": "failed"}.get(kind, kind)
                text = (el.get("message") or "") + "\n" + (el.text or "")
                rec["message"] = "\n".join(text.strip().splitlines()[:12])
        cases.append(rec)
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="result JSON (default benchmarks/results/gpu-tests-<gpu>.json)")
    p.add_argument("--list", action="store_true", help="print the selected tests and exit")
    args = p.parse_args(argv)
    cases = gpu_cases()
    if args.list:
        print("\n".join(cases) or "(none: no CUDA GPU with DALI here)")
        return 0
    info = common.machine_info()
    if not info.get("gpu") or not cases:
        print("no CUDA GPU with DALI here: the GPU cases are not collected; nothing to record", file=sys.stderr)
        return 2
    out = args.out or os.path.join(HERE, "results", f"gpu-tests-{common.device_tag(info)}.json")
    fd, xml = tempfile.mkstemp(suffix=".xml")
    os.close(fd)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                           *cases], cwd=ROOT, capture_output=True, text=True)
    results = parse_junit(xml)
    os.unlink(xml)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("passed", "failed", "error", "skipped")}
    common.write_json_atomic(out, {"benchmark": "gpu-tests", "machine": info, "command": common.command_line(),
                                   "timestamp": common.utc_timestamp(), "pytest_returncode": proc.returncode,
                                   "counts": counts, "tests": results,
                                   "output_tail": proc.stdout.strip().splitlines()[-5:]})
    print(f"{counts} -> {out}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
