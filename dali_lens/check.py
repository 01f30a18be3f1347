"""``python -m dali_lens.check DATA``: scan a dataset and report every problem, file by file.

Checks each sample is readable (not zero-byte, truncated or corrupt), has the dataset's band count and
size, and holds no NaN/inf (unless ``--mask-value`` says masked pixels are expected). Exit status: 0 no
problems, 2 problems found or the data cannot be read (bad input, as for every command).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from .data.dataset import DataError, Dataset, parse_hdus
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


_PIL_BANDS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "P": 3, "RGB": 3, "YCbCr": 3, "LA": 2, "RGBA": 4, "CMYK": 4}
_PNG_END = b"IEND\xaeB`\x82"


def quick_problem(dataset: Dataset, i: int) -> str | None:
    """Header-level check of one sample, without decoding it: what DALI's decoders must never be handed.

    Images: readable header, size, channel count, and the end-of-stream marker (truncated PNG/JPEG files
    can crash DALI's CPU decoder instead of raising). ``.npy``: header shape and the file's full length.
    """
    s = dataset.samples[i]
    path = s.path
    try:
        size = os.path.getsize(path)
    except OSError:
        return f"{path}: file not found"
    if size == 0:
        return f"{path}: empty file (0 bytes)"
    if dataset.kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return f"{path}: cannot decode image ({exc})"
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 64))
            tail = fh.read()
        if fmt == "PNG" and not tail.endswith(_PNG_END):
            return f"{path}: truncated PNG (no end-of-image chunk)"
        if fmt == "JPEG" and b"\xff\xd9" not in tail[-32:]:
            return f"{path}: truncated JPEG (no end-of-image marker)"
        bands = _PIL_BANDS.get(mode)
        if bands != dataset.bands:
            return f"{path}: has {bands or mode} band(s), the dataset has {dataset.bands}"
        if dataset.shape is not None and (h, w) != tuple(dataset.shape):
            return (f"{path}: is {h}x{w} px, the dataset's images are {dataset.shape[0]}x{dataset.shape[1]} "
                    "(mixed sizes)")
    elif dataset.kind == "npy":
        import numpy as np

        from .data.readers import npy_header

        try:  # the header only, then the file's length against what the header promises
            shape, dtype, _, offset = npy_header(path)
        except Exception as exc:
            return f"{path}: cannot read .npy (corrupt header: {exc})"
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if size < need:
            return f"{path}: truncated .npy ({size} bytes, the header promises {need})"
        want = (dataset.bands, *dataset.shape) if dataset.shape else None
        if len(shape) == 2 and dataset.bands == 1:
            shape = (1, *shape)
        if want and tuple(shape) != want:
            return f"{path}: array shape {tuple(shape)}, the dataset's samples are {want}"
    return None


def quick_scan(dataset: Dataset, workers: int | None = None) -> dict[int, str]:
    """``{index: problem}`` from header-level checks of every sample (fast: no decoding)."""
    workers = workers or min(16, (os.cpu_count() or 1) * 4)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(lambda j: quick_problem(dataset, j), range(len(dataset)), chunksize=64)
        return {i: msg for i, msg in enumerate(results) if msg}


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


def check_packed(root: str, allow_nonfinite: bool | None = None) -> int:
    """Verify a packed set (``python -m dali_lens.pack``): per-split sample counts, every shard's sha256, index
    and sample list, and every member read and decoded. Prints the problems; returns the exit status."""
    from .data.shards import verify

    problems = verify(root, allow_nonfinite=allow_nonfinite)
    for msg in problems:
        print(f"  problem: {msg}")
    print(f"{len(problems)} problem(s) found" if problems else "no problems found")
    return 2 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dali_lens.check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="dataset root (folders, CSV manifests, FITS, .npy, challenge layout, or a packed "
                                 "set: then every shard's checksum and member is verified)")
    ap.add_argument("--hdus", default=None, help="FITS: comma-separated HDU indices or EXTNAMEs, one per band")
    ap.add_argument("--mask-value", type=float, default=None,
                    help="masked pixels use this value (NaN/inf then count as masked, not as errors)")
    args = ap.parse_args(argv)
    from .data.shards import is_packed
    from .data.sources import discover

    if os.path.isdir(args.data) and is_packed(args.data):  # a packed set: verify shards against manifest.json
        return check_packed(args.data, allow_nonfinite=True if args.mask_value is not None else None)

    hdus = parse_hdus(args.hdus)
    try:
        splits = discover(args.data, hdus=hdus, val_fraction=0)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = 0
    for name, ds in splits.items():
        print(ds.describe())
        bad = scan(ds, allow_nonfinite=args.mask_value is not None)
        for msg in bad.values():
            print(f"  problem: {msg}")
        total += len(bad)
    print(f"{total} problem(s) found" if total else "no problems found")
    return 2 if total else 0


if __name__ == "__main__":
    sys.exit(main())
