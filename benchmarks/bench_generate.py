"""Throughput of the synthetic lens generator (dali_lens.data.synthetic).

Measures, at 64 x 64 px and 3 bands (g, r, i) with the default difficulty:

* simulate only (``simulate``), single-threaded and with the default thread count;
* the command users run, ``python -m dali_lens.generate OUT --n N --size 64`` (PNG, and ``--format npy``), timed
  as a whole in a subprocess: start, imports, simulation, the stretch and encoding, writing, manifests;

and writes the figures, the machine (CPU model, cores, GPU, versions of torch / torchvision / DALI / numpy),
the command and the load average to ``benchmarks/results/generate-<gpu-or-host>.json`` (--out), with a bar
chart next to it (same name, .png). Target (from the foundation issue): >= 1,000 cutouts/s simulate-only.

    python -m benchmarks.bench_generate            # full run (~1 minute)
    python -m benchmarks.bench_generate --quick    # tiny run (smoke test)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import common
from dali_lens.data import synthetic as syn


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


def bench_command(n: int, fmt: str, repeats: int) -> dict:
    """``python -m dali_lens.generate OUT --n N --size 64 --format FMT --seed R --quiet`` as users run it, timed
    as a whole in a fresh subprocess (interpreter start, imports, simulation, encoding, writing, manifests)."""
    import resource
    import subprocess

    times, cpu = [], []
    root = tempfile.mkdtemp(prefix="bench_generate_")
    try:
        for r in range(repeats):
            out = os.path.join(root, f"{fmt}{r}")
            cmd = [sys.executable, "-m", "dali_lens.generate", out, "--n", str(n), "--size", "64", "--format", fmt,
                   "--seed", str(r), "--quiet"]
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=common.child_env(), capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
            cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            files = sum(len(f) for _, _, f in os.walk(out))
            size = sum(os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(out) for x in fs)
            shutil.rmtree(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(times)
    return {"n": n, "format": fmt, "workers": min(4, os.cpu_count() or 1), "command": " ".join(cmd[1:]),
            "seconds_best": best, "seconds_all": times, "cutouts_per_s": n / best, "cpu_seconds_all": cpu,
            "cutouts_per_cpu_s": n / min(cpu), "files": files, "bytes": size}


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    labels = ["simulate\n1 thread", f"simulate\n{res['simulate_default_threads']['workers']} threads",
              "generate\ncommand, PNG", "generate\ncommand, .npy"]
    keys = ["simulate_1_thread", "simulate_default_threads", "write_png", "write_npy"]
    vals = [res[k]["cutouts_per_s"] for k in keys]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bars = ax.bar(range(len(vals)), vals, color=["#2a7ab9", "#2a7ab9", "#888888", "#888888"])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(1000, color="k", ls="--", lw=1, label="target 1,000 cutouts/s (simulate)")
    ax.set_xticks(range(len(vals)), labels, fontsize=8)
    ax.set_ylabel("cutouts / s (best of repeats)")
    ax.set_title(f"Synthetic lens generator, 64 px, 3 bands\n{common.machine_line(doc['machine'])}", fontsize=8)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (256 cutouts, 1 repeat): a smoke test")
    p.add_argument("--n", type=int, default=None, help="cutouts per measurement (default 8192; quick: 256)")
    p.add_argument("--repeats", type=int, default=None, help="repeats per measurement, best kept (default 3)")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/generate-<gpu-or-host>.json)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = p.parse_args(argv)
    n = args.n or (256 if args.quick else 8192)
    repeats = args.repeats or (1 if args.quick else 3)
    n_write = max(64, n // 2)

    machine = common.machine_info()
    out = common.result_path(args.out, "generate", machine)
    info = {"benchmark": "generate", "mode": "quick" if args.quick else "full", "machine": machine,
            "command": common.command_line(), "timestamp": common.utc_timestamp(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()],
            "settings": {"size": 64, "bands": ["g", "r", "i"], "difficulty": syn.DEFAULT_DIFFICULTY,
                         "supersample": 2, "n": n, "n_write": n_write, "repeats": repeats,
                         "note": "best of `repeats` runs; simulate = float32 images in memory; write_png/npy = "
                                 "the whole `python -m dali_lens.generate` command in a subprocess. cutouts_per_s is "
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
        results[f"write_{fmt}"] = bench_command(n_write, fmt, repeats)
        print(f"python -m dali_lens.generate, {fmt}: {results[f'write_{fmt}']['cutouts_per_s']:8.0f} cutouts/s "
              f"({results[f'write_{fmt}']['bytes'] / n_write / 1024:.1f} KiB/cutout)")
    info["results"] = results
    best = results["simulate_default_threads"]["cutouts_per_s"]
    info["targets"] = [{"name": "simulate >= 1000 cutouts/s (64 px, 3 bands)", "value": round(best, 1),
                        "met": best >= 1000}]
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    common.write_json_atomic(out, info)
    if not args.no_plot:
        plot(info, os.path.splitext(out)[0] + ".png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
