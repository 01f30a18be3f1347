"""No flags vs hand-tuned flux flags on raw challenge fluxes in three units (issue 14's "done when").

Generates a challenge-layout training set and a separate test set (ground track, 4 bands, 101 px, raw fluxes
~1e-12..1e-9, masked pixels = 100), writes copies with every flux multiplied by 1e-3 and by 1e6 (masked pixels
stay 100), and for each unit trains the same model with the same seed twice:

* no flags: the defaults (``--scaling auto``: per-band noise from the training set, arcsinh(x / noise);
  ``--mask-value auto``: the layout's sentinel 100);
* hand-tuned: ``--mask-value 100 --scaling asinh --scale-a 1e11`` (the README's values for the original unit).

Both share ``--img-size 64 --resize-mode crop`` and the epochs/batch given here. Records the best validation
AUC (15 % of the training set), the last epoch's, and the test-set AUC of ``evaluate``'s library call
(``dali_lens.evaluation.evaluate_files``); the training is ``dali_lens.train(...)``.
Writes benchmarks/results/autoscale-<host>.json.
Example: python -m benchmarks.bench_autoscale --n 1200 --test-n 400 --epochs 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks.common import command_line, machine_info, result_path, utc_timestamp, write_json_atomic

UNITS = (1.0, 1e-3, 1e6)
#: each configuration's options of ``dali_lens.train`` (``mask_value=100.0`` is ``--mask-value 100``, ...)
CONFIGS = {"no flags": {}, "hand-tuned": {"mask_value": 100.0, "scaling": "asinh", "scale_a": 1e11}}


def scale_fluxes(src: str, dst: str, factor: float, sentinel: float = 100.0) -> str:
    """Copy the FITS folder ``src`` to ``dst`` with every pixel except ``sentinel`` multiplied by ``factor``."""
    from astropy.io import fits

    shutil.copytree(src, dst)
    for folder, _, names in os.walk(dst):
        for name in names:
            if name.endswith((".fits", ".fit", ".fts")):
                path = os.path.join(folder, name)
                with fits.open(path) as hdul:
                    data, header = hdul[0].data.astype(np.float32), hdul[0].header.copy()
                data = np.where(data == np.float32(sentinel), data, data * np.float32(factor)).astype(np.float32)
                fits.PrimaryHDU(data, header=header).writeto(path, overwrite=True)
    return dst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1200, help="training objects (default 1200; 15 %% held out as val)")
    ap.add_argument("--test-n", type=int, default=400, help="test objects, generated with another seed")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.test_n, args.epochs, args.batch_size = 60, 30, 1, 16
    import contextlib
    import io

    import dali_lens
    from dali_lens.data.dataset import DataError
    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.evaluation import evaluate_files

    info = machine_info()
    common = {"img_size": 64, "resize_mode": "crop", "epochs": args.epochs, "batch_size": args.batch_size,
              "seed": args.seed, "patience": 0, "progress": False, "workers": args.workers}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base_train, base_test = os.path.join(tmp, "train-1"), os.path.join(tmp, "test-1")
        generate_dataset(base_train, n=args.n, layout="challenge", seed=args.seed)
        generate_dataset(base_test, n=args.test_n, layout="challenge", seed=args.seed + 1)
        for unit in UNITS:
            train = base_train if unit == 1.0 else scale_fluxes(base_train, os.path.join(tmp, f"train-{unit:g}"), unit)
            test = base_test if unit == 1.0 else scale_fluxes(base_test, os.path.join(tmp, f"test-{unit:g}"), unit)
            for name, flags in CONFIGS.items():
                out = os.path.join(tmp, f"run-{unit:g}-{name.replace(' ', '-')}")
                t0 = time.perf_counter()
                log = io.StringIO()
                with contextlib.redirect_stdout(log):  # the run's log (its 'scaling auto' line)
                    result = dali_lens.train(train, out=out, **common, **flags)
                lines = log.getvalue().splitlines()
                seconds = time.perf_counter() - t0
                ev = os.path.join(tmp, f"eval-{unit:g}-{name.replace(' ', '-')}")
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # its summary table
                        metrics = evaluate_files(out, test, ev, split="all", progress=False, workers=args.workers)
                    test_auc = metrics["ensemble"]["roc_auc"]
                except (DataError, ValueError) as exc:
                    print(f"evaluate {out}: {exc}", file=sys.stderr)
                    test_auc = None
                hist = result["history"]
                rec = {"unit": unit, "config": name, "flags": flags,
                       "val_auc_best": max(h["val_auc"] for h in hist), "val_auc_last": hist[-1]["val_auc"],
                       "val_auc_per_epoch": [h["val_auc"] for h in hist],
                       "test_auc": None if test_auc is None else round(float(test_auc), 4),
                       "scaling_log": next((x for x in lines if x.startswith("scaling auto")), None),
                       "train_seconds": round(seconds, 1)}
                runs.append(rec)
                print(f"unit x{unit:g} {name:10s}: val AUC best {rec['val_auc_best']:.4f} last "
                      f"{rec['val_auc_last']:.4f}  test AUC {rec['test_auc']}  ({seconds:.0f} s)", flush=True)
    out = result_path(args.out, "autoscale", info)
    write_json_atomic(out, {"benchmark": "autoscale", "machine": info, "command": command_line(),
                            "timestamp": utc_timestamp(),
                            "settings": {"n": args.n, "test_n": args.test_n, "epochs": args.epochs,
                                         "batch_size": args.batch_size, "seed": args.seed, "common_flags": common,
                                         "units": list(UNITS), "configs": CONFIGS},
                            "runs": runs})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
