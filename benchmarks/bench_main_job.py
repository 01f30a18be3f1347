"""Time the README's main job (`python -m dali_lens.train` with no arguments) from an empty cache.

Runs the command in a subprocess with a fresh $DALI_LENS_CACHE and a fresh run directory, measures wall
time (including generating the default synthetic set) and writes its test metrics and the machine to
benchmarks/results/main-job-<host>.json. Example: python -m benchmarks.bench_main_job
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, command_line, machine_info, result_path, utc_timestamp, write_json_atomic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/main-job-<host>.json)")
    ap.add_argument("extra", nargs="*", help="extra flags passed to dali_lens.train (none for the README job)")
    args = ap.parse_args(argv)
    info = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DALI_LENS_CACHE": os.path.join(tmp, "cache")}
        run_dir = os.path.join(tmp, "run")
        cmd = [sys.executable, "-m", "dali_lens.train", "--no-progress", "--out", run_dir, *args.extra]
        load = os.getloadavg()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    result = {"benchmark": "main-job", "machine": info, "command": command_line(), "timestamp": utc_timestamp(),
              "job": "python -m dali_lens.train " + " ".join(args.extra), "wall_s": round(wall, 1),
              "loadavg_start": load, "loadavg_end": os.getloadavg(), "log": proc.stdout.splitlines(),
              "test_metrics": metrics.get("metrics"), "history": metrics.get("history"),
              "train_seconds": metrics.get("train_seconds"), "backend": metrics.get("backend")}
    out = result_path(args.out, "main-job", info)
    write_json_atomic(out, result)
    print(f"main job: {wall:.0f} s wall, test AUC {metrics['metrics']['roc_auc']:.3f} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
