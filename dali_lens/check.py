"""``python -m dali_lens.check DATA``: scan a dataset and report every problem, file by file.

Checks each sample is readable (not zero-byte, truncated or corrupt), has the dataset's band count and
size, and holds no NaN/inf (unless ``--mask-value`` says masked pixels are expected). Exit status 1 when
problems are found.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from .data.dataset import DataError, Dataset
from .data.readers import check_array, read_sample


def _problem(dataset: Dataset, i: int, allow_nonfinite: bool) -> str | None:
    s = dataset.samples[i]
    try:
        arr = read_sample(s, dataset, check=False)
        check_array(arr, s, dataset, allow_nonfinite=allow_nonfinite)
    except DataError as exc:
        return str(exc)
    return None


def scan(dataset: Dataset, allow_nonfinite: bool = False, workers: int | None = None,
         max_problems: int | None = None) -> dict[int, str]:
    """``{sample index: problem}`` for every bad sample (stops early after ``max_problems``)."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    found: dict[int, str] = {}
    chunk = 256
    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(dataset), chunk):
            idx = range(start, min(start + chunk, len(dataset)))
            for i, msg in zip(idx, pool.map(lambda j: _problem(dataset, j, allow_nonfinite), idx)):
                if msg:
                    found[i] = msg
            if max_problems and len(found) >= max_problems:
                break
    return found


def find_problems(dataset: Dataset, max_problems: int | None = None, allow_nonfinite: bool = False) -> list[str]:
    return list(scan(dataset, allow_nonfinite, max_problems=max_problems).values())


def drop_bad(dataset: Dataset, allow_nonfinite: bool = False, log=print) -> Dataset:
    """The dataset without its bad samples; reports how many and which were skipped."""
    bad = scan(dataset, allow_nonfinite)
    if not bad:
        return dataset
    log(f"skipping {len(bad)} bad sample(s) in {dataset.split}:")
    for msg in bad.values():
        log(f"  {msg}")
    keep = [i for i in range(len(dataset)) if i not in bad]
    return dataset.subset(keep)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dali_lens.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="dataset root (folders, CSV manifests, FITS, .npy, challenge layout)")
    ap.add_argument("--hdus", default=None, help="FITS: comma-separated HDU indices or EXTNAMEs, one per band")
    ap.add_argument("--mask-value", type=float, default=None,
                    help="masked pixels use this value (NaN/inf then count as masked, not as errors)")
    args = ap.parse_args(argv)
    from .data.sources import discover

    hdus = tuple(int(h) if h.isdigit() else h for h in args.hdus.split(",")) if args.hdus else None
    try:
        splits = discover(args.data, hdus=hdus, val_fraction=0)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    total = 0
    for name, ds in splits.items():
        print(ds.describe())
        bad = scan(ds, allow_nonfinite=args.mask_value is not None)
        for msg in bad.values():
            print(f"  problem: {msg}")
        total += len(bad)
    print(f"{total} problem(s) found" if total else "no problems found")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
