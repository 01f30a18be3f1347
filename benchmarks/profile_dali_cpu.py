#!/usr/bin/env python
"""Where does the DALI CPU loader spend its time and memory? Variants of dali-cpu, through its own options.

Each variant runs ``build_loader(backend='dali-cpu')`` on 64 px PNG -> 3 scales (64,112,224) in a fresh
subprocess (bench_loaders.py's harness, warm-up and memory sampler), with the build_loader options it names:

  as-shipped        the library as it is
  queue=K           pipeline prefetch_queue_depth=K (LoaderOptions.prefetch_queue_depth; the default is 1 on the CPU)
  no-augment        training loader without the random dihedral augmentation (no DALI conditionals)
  threads=N         DALI num_threads=N (default: usable cores)
  baseline          the mechine_lensing-style baseline (benchmarks/legacy.py), for reference

Variants combine with '+', e.g. ``queue=2+threads=1``. Results are printed and written as JSON (--out,
default benchmarks/results/profile-dali-cpu-<host>.json).

Earlier versions also emulated candidate library changes by monkeypatching dali_lens at run time
(no-finite-check, cheap-finite, queue1, resize-u8, branchless-aug); their measurements stay in the committed
results (profile-dali-cpu-vm*.json). The NaN/inf scan is now skipped for 8-bit images by the library itself,
and a benchmark measures the library as it is: no run patches it.

  python -m benchmarks.profile_dali_cpu                      # from the repository root
"""
from __future__ import annotations

import argparse
import os
import sys

from benchmarks import bench_loaders as bl
from benchmarks import common

DEFAULT_VARIANTS = ("as-shipped", "queue=2", "no-augment", "threads=1", "threads=3", "baseline")


def loader_kwargs(variant: str) -> dict:
    """The build_loader options of ``variant`` (parts joined by '+'); SystemExit for an unknown part."""
    kwargs: dict = {}
    for part in variant.split("+"):
        if part in ("as-shipped", "baseline"):
            continue
        if part.startswith("queue="):
            kwargs["prefetch_queue_depth"] = int(part.split("=", 1)[1])
        elif part == "no-augment":
            kwargs["augment"] = False
        elif part.startswith("threads="):
            kwargs["num_workers"] = int(part.split("=", 1)[1])
        else:
            raise SystemExit(f"unknown variant {part!r} in {variant!r}")
    return kwargs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS), help="variants (default: all)")
    p.add_argument("--batches", default="64,256", help="comma list of batch sizes (default 64,256)")
    p.add_argument("--n", type=int, default=2048, help="images (default 2048)")
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--format", default="png", choices=bl.FORMATS)
    p.add_argument("--single", action="store_true", help="native scale only instead of 3 scales (64,112,224)")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dali-lens-bench"))
    p.add_argument("--out", help="JSON output (default benchmarks/results/profile-dali-cpu-<host>.json)")
    args = p.parse_args(argv)

    info = common.machine_info()
    root, gen = bl.prepare_dataset(args.data_dir, args.format, args.size, args.n, 0, print)
    workers = common.usable_cores()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for variant in args.variants:
            backend = "baseline" if "baseline" in variant.split("+") else "dali-cpu"
            scales = [args.size] if args.single else list(bl.MULTI_SCALES)
            cfg = {"backend": backend, "format": args.format, "size": args.size, "scales": scales,
                   "scale_mode": "single" if args.single else "multi", "batch": batch, "root": root,
                   "workers": workers, "train": True, "min_time": args.min_time, "min_epochs": 1,
                   "max_epochs": args.max_epochs, "loader_kwargs": loader_kwargs(variant)}
            rec = bl.launch(cfg, 300, print)
            rec["variant"] = variant
            rows.append(rec)
            if rec["ok"]:
                print(f"batch {batch:>3} {variant:<32} {rec['images_per_s']:>8.0f} img/s "
                      f"{rec['cpu_ms_per_image']:>6.2f} CPU ms/img  peak {rec['peak_host_mb']:>6.0f} MB PSS  "
                      f"(others used {100 * rec['foreign_cpu_frac']:.0f}% CPU)", flush=True)
    out = common.result_path(args.out, "profile-dali-cpu", info)
    common.write_json_atomic(out, {"benchmark": "profile-dali-cpu", "machine": info, "command": common.command_line(),
                                   "timestamp": common.utc_timestamp(), "generator": gen, "runs": rows})
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
