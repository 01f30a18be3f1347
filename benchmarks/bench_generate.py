"""Throughput of the synthetic lens generator (dali_lens.data.synthetic).

Measures, at 64 x 64 px and 3 bands (g, r, i) with the default difficulty:

* simulate only (``simulate``), single-threaded and with the default thread count;
* simulate + write the standard layout as PNG and as .npy (``generate_dataset``, temporary directory);

and writes the figures plus a description of the machine (CPU model, cores, Python / numpy versions, load
average) to ``benchmarks/results/generate.json``.

    python benchmarks/bench_generate.py            # full run (~1 minute)
    python benchmarks/bench_generate.py --quick    # tiny run (smoke test)
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dali_lens.data import synthetic as syn  # noqa: E402
from dali_lens.data.io import atomic_write_json  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate.json")


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (not Linux)
        usable = os.cpu_count()
    try:
        load = list(os.getloadavg())
    except OSError:  # pragma: no cover
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "python": platform.python_version(),
            "numpy": np.__version__, "platform": platform.platform(), "loadavg_at_start": load}


def bench_simulate(n: int, workers: int | None, repeats: int) -> dict:
    syn.simulate(min(n, 64), workers=workers)  # warm-up (imports, caches)
    times, cpu = [], []
    for r in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        syn.simulate(n, seed=r, workers=workers)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    best = min(times)
    return {"n": n, "workers": workers if workers is not None else min(4, os.cpu_count() or 1),
            "seconds_best": best, "seconds_all": times, "cutouts_per_s": n / best,
            "cutouts_per_s_median": n / float(np.median(times)),
            "cpu_seconds_all": cpu, "cutouts_per_cpu_s": n / min(cpu)}


def bench_write(n: int, fmt: str, repeats: int) -> dict:
    times, cpu = [], []
    root = tempfile.mkdtemp(prefix="bench_generate_")
    try:
        for r in range(repeats):
            out = os.path.join(root, f"{fmt}{r}")
            t, c = time.perf_counter(), time.process_time()
            syn.generate_dataset(out, n=n, fmt=fmt, seed=r)
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
            files = sum(len(f) for _, _, f in os.walk(out))
            size = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(out) for x in fs)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(times)
    return {"n": n, "format": fmt, "workers": min(4, os.cpu_count() or 1), "seconds_best": best,
            "seconds_all": times, "cutouts_per_s": n / best, "cpu_seconds_all": cpu,
            "cutouts_per_cpu_s": n / min(cpu), "files": files, "bytes": size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (256 cutouts, 1 repeat): a smoke test")
    p.add_argument("--n", type=int, default=None, help="cutouts per measurement (default 8192; quick: 256)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement, best kept (default 3)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default: {os.path.relpath(DEFAULT_OUT)})")
    args = p.parse_args(argv)
    n = args.n or (256 if args.quick else 8192)
    repeats = args.repeats or (1 if args.quick else 3)
    n_write = max(64, n // 2)

    info = {"benchmark": "generate", "quick": args.quick, "machine": machine(),
            "settings": {"size": 64, "bands": ["g", "r", "i"], "difficulty": syn.DEFAULT_DIFFICULTY,
                         "supersample": 2,
                         "note": "best of `repeats` runs; simulate = float32 images in memory. cutouts_per_s is "
                                 "wall-clock; cutouts_per_cpu_s divides by the process CPU time, which is "
                                 "robust to other processes competing for the cores (see loadavg)"}}
    results = {}
    results["simulate_1_thread"] = bench_simulate(n, 1, repeats)
    print(f"simulate, 1 thread:        {results['simulate_1_thread']['cutouts_per_s']:8.0f} cutouts/s "
          f"({results['simulate_1_thread']['cutouts_per_cpu_s']:.0f} per CPU-second)")
    results["simulate_default_threads"] = bench_simulate(n, None, repeats)
    print(f"simulate, {results['simulate_default_threads']['workers']} threads:       "
          f"{results['simulate_default_threads']['cutouts_per_s']:8.0f} cutouts/s "
          f"({results['simulate_default_threads']['cutouts_per_cpu_s']:.0f} per CPU-second)")
    for fmt in ("png", "npy"):
        results[f"write_{fmt}"] = bench_write(n_write, fmt, repeats)
        print(f"simulate + write {fmt}:     {results[f'write_{fmt}']['cutouts_per_s']:8.0f} cutouts/s "
              f"({results[f'write_{fmt}']['bytes'] / n_write / 1024:.1f} KiB/cutout)")
    info["results"] = results
    info["machine"]["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_json(args.out, info)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
