"""``python -m dali_lens.pack DATA OUT``: pack a dataset into WebDataset shards that DALI streams.

DATA is anything ``discover`` reads (split/class folders, CSV manifests, the challenge layout, loose files);
every split it finds (train/val/test, or one ``predict`` split of unlabelled files) becomes
``OUT/<split>/shard-000000.tar, shard-000001.tar, ...`` of about --shard-size bytes each, with the DALI index
(``.idx``, wds2idx format) and the sample list (``.json``) of every shard, and ``OUT/manifest.json`` (shards,
sample counts, bands, shape, kind, image extension, sha256 per shard, per-split totals). See
``dali_lens/data/shards.py`` for the format. Train with ``--data-root OUT``, score with
``python -m dali_lens.predict ... OUT``, verify with ``python -m dali_lens.check OUT``.

* PNG/JPEG stay encoded: the original bytes are copied (member ``png``/``jpg``), after a strict check of those
  bytes (``data/validate.py``: PNG chunk checksums, a full decode, libjpeg's corrupt-data warnings, size, band
  count), so that no decoder is later handed a corrupt file. ``.npy``, FITS and per-band FITS
  are read (numpy/astropy), checked (bands, size, NaN/inf unless --allow-nonfinite) and stored as float32
  (bands, H, W) ``.npy`` members.
* Each sample keeps its label (``cls``: 1, 0, -1 if unlabelled) and its original id, path and catalogue
  columns (``json``); its key is its number in the packed set.
* The training split is shuffled once (seeded by --seed) so that shards stream in a mixed order; the other
  splits keep their order.
* Atomic and resumable: every shard (and its index and sample list) is written under a temporary name and
  renamed when complete; the assignment of samples to shards is deterministic, so rerunning the same command
  after an interruption keeps the complete shards and writes the same remaining ones (byte for byte).
* A bad input file stops the run with its name (complete shards are kept: fix the file and rerun);
  --skip-bad skips bad files and lists them (also in the manifest).

Examples:
  python -m dali_lens.pack /data/lenses /data/lenses-packed
  python -m dali_lens.pack survey_tile.csv /scratch/tile-packed --shard-size 1G --skip-bad
Exit status: 0 done, 2 bad input or options (the message names the file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys

from .choices import HDUS, HOLD_OUT, NON_NEGATIVE, SEED, Parsed
from .cli import Parser, log, run_command
from .data.dataset import DataError, parse_hdus
from .data.packing import PackError, pack, parse_size

__all__ = ["PackError", "main", "pack", "parser"]  # pack: the library core (dali_lens.data.packing), kept here


# ============================================================================================ CLI

def _shard_size(text: str) -> str:
    """--shard-size's check: a size of at least 1 kB (kept as the text)."""
    if parse_size(text) < 1024:
        raise PackError(f"{text} is under 1 kB")
    return text


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.pack", description=__doc__)
    ap.add_argument("data", metavar="DATA", help="dataset root, CSV manifest or folder of cutouts")
    ap.add_argument("out", metavar="OUT", help="folder to write the shards and manifest.json to")
    ap.add_argument("--shard-size", default="256MB",
                    type=Parsed(_shard_size, "a size >= 1 kB (256MB, 1G, 64M)", ("0", "12", "x")),
                    help="target shard size, e.g. 256MB (default), 1G, 64M")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad input files (listed) instead of stopping")
    ap.add_argument("--hdus", type=HDUS, default=None, help="FITS: comma-separated HDU indices or EXTNAMEs, one per band")
    ap.add_argument("--val-fraction", type=HOLD_OUT, default=0.15,
                    help="without a val split, this fraction of train becomes val (as in training; default 0.15)")
    ap.add_argument("--seed", type=SEED, default=0, help="seed of the val split and of the train shuffle")
    ap.add_argument("--allow-nonfinite", action="store_true",
                    help="float data: keep NaN/inf pixels (masked data) instead of treating them as bad input")
    ap.add_argument("--workers", type=NON_NEGATIVE, default=None,
                    help="read-ahead threads (default 1; 0 = none; more help only on slow network file systems)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous pack in OUT (its files only)")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false",
                    help="do not fsync each shard (faster; an OS crash may then lose the last shards)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    hdus = parse_hdus(args.hdus)

    def run():
        _report(pack(args.data, args.out, shard_size=args.shard_size, skip_bad=args.skip_bad, hdus=hdus,
                     val_fraction=args.val_fraction, seed=args.seed, allow_nonfinite=args.allow_nonfinite,
                     overwrite=args.overwrite, workers=args.workers, progress=args.progress, fsync=args.fsync,
                     log=log), args.out)

    def hint(exc):
        if isinstance(exc, DataError) and not args.skip_bad:
            return "(fix or remove the file and rerun to resume, or pass --skip-bad to skip bad files)"
        return None

    return run_command(run, (DataError, PackError, FileNotFoundError, PermissionError),
                       f"interrupted: the complete shards in {args.out} are kept; rerun the same command to resume",
                       hint, output=args.out)


def _report(m: dict, out: str) -> None:
    for name, info in m["splits"].items():
        log(f"{name}: {info['samples']} samples in {info['shards']} shard(s), {info['bytes'] / 2 ** 20:.1f} MB"
            + (f", {info['skipped']} bad file(s) skipped" if info["skipped"] else ""))
    if m["skipped"]:
        log("skipped:")
        for k in m["skipped"]:
            log(f"  {k['problem']}")
    run = m.get("run")
    if run and run["samples_packed_now"]:
        log(f"packed {run['samples_packed_now']} samples in {run['packing_seconds']:.1f} s "
            f"({run['samples_per_s']:.0f} samples/s, {run['mb_per_s']:.1f} MB/s) into {os.path.abspath(out)}")


if __name__ == "__main__":
    sys.exit(main())
