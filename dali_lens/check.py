"""``python -m dali_lens.check DATA``: scan a dataset and report every problem, file by file.

Checks each sample is present and readable (not zero-byte, truncated or corrupt: images are fully decoded,
PNG chunk checksums and libjpeg's corrupt-data warnings included), has the dataset's band count and size,
and holds no NaN/inf (unless ``--mask-value`` says masked pixels are expected). Also reports duplicates: the
same file listed twice, and files with identical content, within a split and across splits. A packed set
(``python -m dali_lens.pack``) is verified against its manifest. Exit status:
0 no problems, 2 problems found or the data cannot be read (bad input, as for every command).
The checks themselves live in ``dali_lens/data/validate.py``.
"""
from __future__ import annotations

import argparse
import os
import sys

from .choices import ANY_NUMBER, HDUS
from .cli import Parser, run_command
from .data.dataset import DataError, parse_hdus
from .data.validate import duplicates, scan


def check_packed(root: str, allow_nonfinite: bool | None = None) -> int:
    """Verify a packed set (``python -m dali_lens.pack``): per-split sample counts, every shard's sha256, index
    and sample list, and every member read and decoded. Prints the problems; returns the exit status."""
    from .data.shards import verify

    problems = verify(root, allow_nonfinite=allow_nonfinite)
    for msg in problems:
        print(f"  problem: {msg}")
    print(f"{len(problems)} problem(s) found" if problems else "no problems found")
    return 2 if problems else 0


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.check", description=__doc__)
    ap.add_argument("data", help="dataset root (folders, CSV manifests, FITS, .npy, challenge layout, or a packed "
                                 "set: then every shard's checksum and member is verified)")
    ap.add_argument("--hdus", type=HDUS, default=None, help="FITS: comma-separated HDU indices or EXTNAMEs, one per band")
    ap.add_argument("--mask-value", type=ANY_NUMBER, default=None,
                    help="masked pixels use this value (NaN/inf then count as masked, not as errors)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run_command(lambda: check(args), (DataError, FileNotFoundError, PermissionError),
                       "interrupted: nothing was written")


def check(args: argparse.Namespace) -> int:
    """The check of ``args.data``: the problems on stdout; 2 if there are any, else 0."""
    from .data.shards import is_packed
    from .data.sources import discover

    if os.path.isdir(args.data) and is_packed(args.data):  # a packed set: verify shards against manifest.json
        return check_packed(args.data, allow_nonfinite=True if args.mask_value is not None else None)

    splits = discover(args.data, hdus=parse_hdus(args.hdus), val_fraction=0)
    total = 0
    for name, ds in splits.items():
        print(ds.describe())
        bad = scan(ds, allow_nonfinite=args.mask_value is not None)
        for msg in bad.values():
            print(f"  problem: {msg}")
        total += len(bad)
    dups = duplicates(splits)
    if dups:
        print("duplicates:")
    for msg in dups:
        print(f"  problem: {msg}")
    total += len(dups)
    print(f"{total} problem(s) found" if total else "no problems found")
    return 2 if total else 0


if __name__ == "__main__":
    sys.exit(main())
