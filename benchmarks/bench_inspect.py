"""``python -m dali_lens.inspect`` speed: 1,000 thumbnails from per-band FITS (the challenge layout).

Generates the lens-finding-challenge ground track (4 bands, one FITS file per band per object, 101 px, ~10 %
of the images with masked pixels), writes a predictions CSV with random scores for every object, and times
``inspect --top N`` end to end in this process (after the imports): reading the 4 FITS files of each object
with the package's reader, the Lupton RGB composites, gallery.png (the first --gallery-max tiles) and
index.html (every thumbnail embedded). Target: 1,000 thumbnails in under 30 s on the 2-core VM.
Writes benchmarks/results/inspect-<host>.json.
Example: python -m benchmarks.bench_inspect --n 1000
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time

from benchmarks.common import command_line, machine_info, result_path, utc_timestamp, write_json_atomic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="objects = thumbnails (default 1000; x4 FITS files)")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs (the best and all are recorded)")
    ap.add_argument("--workers", type=int, default=None, help="reader threads (default: inspect's default)")
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.repeats = 30, 1
    import numpy as np

    from dali_lens.data import discover
    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.inspection import inspect_predictions

    info = machine_info(with_gpu=False)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "challenge")
        t0 = time.perf_counter()
        generate_dataset(root, n=args.n, layout="challenge", track="ground", seed=0)
        gen_s = time.perf_counter() - t0
        preds = os.path.join(tmp, "predictions.csv")
        rng = np.random.default_rng(0)
        with open(preds, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "id", "label", "score"])
            for s in discover(root, val_fraction=0)["train"].samples:
                w.writerow([s.path, s.id, s.label, f"{rng.uniform():.6f}"])
        for k in range(args.repeats):
            out = os.path.join(tmp, f"look{k}")
            t0 = time.perf_counter()
            res = inspect_predictions(preds, root, out, top=args.n, workers=args.workers)
            seconds = time.perf_counter() - t0
            runs.append({"seconds": round(seconds, 2), "stages_s": res["seconds"],
                         "thumbnails_per_s": round(res["shown"] / seconds, 1), "problems": len(res["problems"]),
                         "index_html_mb": round(os.path.getsize(os.path.join(out, "index.html")) / 2 ** 20, 2),
                         "gallery_png_mb": round(os.path.getsize(os.path.join(out, "gallery.png")) / 2 ** 20, 2),
                         "loadavg": os.getloadavg()})
            print(f"run {k}: {res['shown']} thumbnails in {seconds:.1f} s {res['seconds']}")
    best = min(r["seconds"] for r in runs)
    doc = {"benchmark": "inspect", "machine": info, "command": command_line(), "timestamp": utc_timestamp(),
           "data": {"layout": "challenge", "track": "ground", "objects": args.n, "bands": 4, "size": 101,
                    "fits_files": 4 * args.n, "generate_s": round(gen_s, 1)},
           "thumbnails": args.n, "gallery_max": 200, "best_seconds": best, "target_seconds": 30.0,
           "meets_target": best < 30.0 if args.n >= 1000 else None, "runs": runs}
    out = result_path(args.out, "inspect", info)
    write_json_atomic(out, doc)
    print(f"best {best:.1f} s for {args.n} thumbnails -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
