#!/usr/bin/env python
"""predict into Parquet at scale (issue 26, item 4): peak memory against the number of cutouts, and the cost of
Parquet against CSV in scoring throughput.

For each N in --n, a packed set of N unlabelled tiny cutouts (--size px, 1 band, float32 .npy: hard links to a
pool of 256 generated arrays, packed with ``dali_lens.data.packing.pack``; every link is its own sample) is
scored by ``python -m dali_lens.predict`` (the small CNN, untrained weights, --backend, --batch, 1 PyTorch thread,
1 loader thread) into ``OUT.csv`` and into ``OUT.parquet``, interleaved, --repeats times each, every run a fresh
process onto a fresh output. Per run: the "scored N cutouts in S s (R img/s)" line (scoring throughput:
loading, the model and writing the rows, without start-up), the process tree's peak RSS and PSS (sampled every
50 ms, ``common.TreeMemorySampler``), the rows read back (pyarrow / the CSV), the CPU time and the share of the
CPUs other processes used meanwhile (the machine may be shared: compare runs with small values).

Targets (the issue's): Parquet keeps peak memory flat with N (peak RSS at the largest N within 10 % of that
at the smallest; the issue's figure is 1 M vs 100 k cutouts); Parquet costs no more than 5 % of the scoring
throughput against CSV (median Parquet rate >= 0.95 x median CSV rate at the largest N).

  python -m benchmarks.bench_predict_parquet                       # 10k and 100k (~6 min on 2 cores)
  python -m benchmarks.bench_predict_parquet --quick               # a smoke test (~1 min)
  python -m benchmarks.bench_predict_parquet --n 100000,1000000 --backend dali --batch 4096   # a GPU machine
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import (MB, CpuAccount, TreeMemorySampler, child_env, command_line, machine_info,
                               result_path, save_partial, save_result, utc_timestamp)

NAME = "predict-parquet"
RATE = re.compile(r"scored (\d+) cutouts in ([\d.]+) s \(([\d.]+) img/s\)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_pool(folder: str, size: int, n: int = 256) -> list[str]:
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = os.path.join(folder, f"p{i:04d}.npy")
        if not os.path.exists(p):
            np.save(p, rng.normal(0.1, 0.05, (1, size, size)).astype(np.float32))
        out.append(p)
    return out


def packed_set(work: str, pool: list[str], n: int) -> tuple[str, float]:
    """A packed set of ``n`` samples (reused when already there); returns (folder, seconds packing took)."""
    from dali_lens.data.packing import pack
    from dali_lens.data.shards import is_packed

    out = os.path.join(work, f"packed-{n}")
    if is_packed(out):
        return out, 0.0
    flat = os.path.join(work, f"flat-{n}")
    shutil.rmtree(flat, ignore_errors=True)
    os.makedirs(flat)
    for i in range(n):
        os.link(pool[i % len(pool)], os.path.join(flat, f"c{i:07d}.npy"))
    t = time.perf_counter()
    pack(flat, out, fsync=False, log=lambda *a, **k: None)
    took = time.perf_counter() - t
    shutil.rmtree(flat)
    log(f"packed {n} cutouts in {took:.0f} s")
    return out, took


def make_checkpoint(path: str, size: int) -> str:
    import torch

    from dali_lens.checkpoint import Checkpoint, PixelSettings
    from dali_lens.models import build_model
    from dali_lens.trainers.config import TrainConfig

    torch.manual_seed(0)
    model = build_model("small_cnn", in_chans=1, img_size=size)
    spec = {"arch": "small_cnn", "scales": (size,), "seed": 0, "name": f"small_cnn@{size}#0"}
    member = {"spec": spec, "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": None,
              "temperature": 1.0, "history": []}
    Checkpoint(members=[member], bands=1, pixels=PixelSettings(kind="npy", mean=[0.1], std=[0.05]),
               config=TrainConfig(trainer="single").to_dict(), epoch=1, best_auc=0.5).save(path)
    return path


def rows_in(out: str) -> int:
    if out.endswith(".parquet"):
        import pyarrow.dataset as ds

        return ds.dataset(out, format="parquet").count_rows()
    with open(out, "rb") as fh:
        return sum(1 for _ in fh) - 1


def run_predict(ckpt: str, data: str, out: str, args) -> dict:
    cmd = [sys.executable, "-m", "dali_lens.predict", "-c", ckpt, data, "--out", out, "--backend", args.backend,
           "--batch-size", str(args.batch), "--threads", "1", "--workers", "1", "--no-progress"]
    cpu = CpuAccount()
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeMemorySampler(proc.pid)
    sampler.start()
    text, _ = proc.communicate(timeout=args.timeout)
    mem = sampler.stop()
    rec = {"format": "parquet" if out.endswith(".parquet") else "csv", "ok": proc.returncode == 0,
           "wall_s": round(time.perf_counter() - t, 2), **mem, **cpu.finish()}
    m = RATE.search(text or "")
    if proc.returncode != 0 or not m:
        rec.update(ok=False, output_tail=(text or "")[-2000:])
        return rec
    rec.update(scored=int(m.group(1)), scoring_s=float(m.group(2)), images_per_s=float(m.group(3)),
               rows_read_back=rows_in(out), peak_rss_mb=round(sampler.peak_rss / MB, 1))
    return rec


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)
    for side in (path + ".meta.json", path + ".lock"):
        if os.path.lexists(side):
            os.unlink(side)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="10000,100000", help="cutout counts, comma-separated (default: 10000,100000)")
    ap.add_argument("--size", type=int, default=16, help="cutout size in px (default: 16)")
    ap.add_argument("--batch", type=int, default=1024, help="predict --batch-size (default: 1024)")
    ap.add_argument("--backend", default="dali-cpu", help="predict --backend (default: dali-cpu)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per format and N (default: 2)")
    ap.add_argument("--work", default=None, help="folder for the data (default: a temporary folder, removed)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per predict run")
    ap.add_argument("--out", default=None, help="result JSON (default: benchmarks/results/predict-parquet-<host>.json)")
    ap.add_argument("--formats", default="csv,parquet",
                    help="output formats to run, comma-separated, from csv,parquet (default: both; parquet alone "
                         "measures the memory target only)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: N 2000,6000, one repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats = "2000,6000", 1
    ns = sorted({int(v) for v in args.n.split(",")})
    asked = args.formats.split(",")
    formats = [f for f in ("csv", "parquet") if f in asked]
    if not formats or set(asked) - set(formats):
        ap.error(f"--formats: a comma-separated choice from csv,parquet, got {args.formats!r}")
    info = machine_info()
    out = result_path(args.out, NAME, info)
    work = args.work or tempfile.mkdtemp(prefix="bench-pq-")
    t0 = time.perf_counter()
    records = []
    try:
        pool = make_pool(os.path.join(work, "pool"), args.size)
        ckpt = make_checkpoint(os.path.join(work, "small_cnn.pt"), args.size)
        for n in ns:
            data, pack_s = packed_set(work, pool, n)
            for r in range(args.repeats):
                for fmt in formats:
                    target = os.path.join(work, f"out-{n}-{r}.{fmt}")
                    rec = {"n": n, "repeat": r, "pack_s": round(pack_s, 1) if r == 0 else None,
                           **run_predict(ckpt, data, target, args)}
                    records.append(rec)
                    save_partial(out, NAME, info, records)
                    log(f"N={n} {fmt} #{r}: " + (f"{rec['images_per_s']:.0f} img/s, peak RSS {rec['peak_rss_mb']:.0f}"
                                                  f" MB, PSS {rec['peak_host_mb']:.0f} MB, rows {rec['rows_read_back']}"
                                                  if rec["ok"] else "FAILED\n" + rec.get("output_tail", "")))
                    remove(target)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    def med(fmt, n, key):
        v = [r[key] for r in records if r["ok"] and r["format"] == fmt and r["n"] == n]
        return statistics.median(v) if v else None

    lo, hi = ns[0], ns[-1]
    summary = {f"{fmt}_{n}": {"images_per_s": med(fmt, n, "images_per_s"), "peak_rss_mb": med(fmt, n, "peak_rss_mb"),
                              "peak_pss_mb": med(fmt, n, "peak_host_mb")} for fmt in ("csv", "parquet") for n in ns}
    targets = []
    rss_lo, rss_hi = med("parquet", lo, "peak_rss_mb"), med("parquet", hi, "peak_rss_mb")
    if rss_lo and rss_hi:
        growth = rss_hi / rss_lo - 1
        targets.append({"name": f"parquet peak RSS at {hi} within 10 % of {lo}", "value": round(growth, 4),
                        "met": growth <= 0.10})
        c_lo, c_hi = med("csv", lo, "peak_rss_mb"), med("csv", hi, "peak_rss_mb")
        if c_lo and c_hi:
            targets.append({"name": f"parquet minus csv peak RSS at {hi} (MB; what Parquet adds)",
                            "value": round(rss_hi - c_hi, 1), "met": None})
    r_csv, r_pq = med("csv", hi, "images_per_s"), med("parquet", hi, "images_per_s")
    if r_csv and r_pq:
        targets.append({"name": f"parquet / csv scoring throughput at {hi} >= 0.95", "value": round(r_pq / r_csv, 3),
                        "met": r_pq / r_csv >= 0.95})
    doc = {"benchmark": NAME, "machine": info, "command": command_line(), "timestamp": utc_timestamp(),
           "mode": "quick" if args.quick else "full",
           "settings": {"n": ns, "formats": formats, "size": args.size, "bands": 1, "batch": args.batch,
                        "backend": args.backend, "repeats": args.repeats, "model": "small_cnn (untrained)", "threads": 1, "workers": 1},
           "runs": records, "summary": summary, "targets": targets, "total_s": round(time.perf_counter() - t0, 1)}
    save_result(doc, out)
    for t in targets:
        log(f"{t['name']}: {t['value']} ({'met' if t['met'] else 'not met' if t['met'] is False else 'info'})")
    log(f"wrote {out}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
