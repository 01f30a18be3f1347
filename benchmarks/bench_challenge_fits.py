"""Per-band FITS loading (the lens-finding-challenge layout): DALI CPU backend vs torchvision backend.

Generates the challenge ground track (4 bands, one FITS file per band per object, 101 px) and measures
images/s over whole evaluation epochs after a warm-up, with masking and asinh scaling on, at the native size
and at 3 scales. On this CPU machine both backends read FITS with astropy (DALI's FITS reader needs CUDA);
DALI then does masking, scaling, resizing and normalisation. Writes benchmarks/results/challenge-fits-<host>.json.
Example: python -m benchmarks.bench_challenge_fits --n 1000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from benchmarks.common import command_line, machine_info, result_path, utc_timestamp, write_json_atomic


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="objects (default 1000; x4 FITS files)")
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs after one warm-up epoch")
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.epochs = 40, 1
    from dali_lens.data import discover
    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.pipelines import build_loader
    from dali_lens.pipelines.dali_backend import available

    info = machine_info()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "challenge")
        generate_dataset(root, n=args.n, layout="challenge", track="ground", seed=0)
        ds = discover(root, val_fraction=0)["train"]
        backends = ["dali-cpu", "torchvision"] + (["dali"] if info.get("gpu") and available() else [])
        for scales in ((101,), (64, 101, 128)):
            for backend in backends:
                loader = build_loader(ds, backend=backend, scales=scales, batch_size=64, mask_value=100.0,
                                      scaling="asinh", scale_a=1e11)
                list(loader)  # warm-up
                t0, n = time.perf_counter(), 0
                for _ in range(args.epochs):
                    n += sum(len(b["index"]) for b in loader)
                dt = time.perf_counter() - t0
                runs.append({"backend": backend, "scales": list(scales), "objects": args.n, "bands": 4,
                             "size": 101, "images_per_s": round(n / dt, 1), "epochs": args.epochs,
                             "loadavg": os.getloadavg()})
                print(f"{backend:12s} scales {scales}: {n / dt:.0f} objects/s")
    out = result_path(args.out, "challenge-fits", info)
    write_json_atomic(out, {"benchmark": "challenge-fits", "machine": info, "command": command_line(),
                            "timestamp": utc_timestamp(), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
