"""Score cutouts with trained lens finders and write their lens probabilities to a CSV file.

DATA is any number of cutouts: a folder of loose files, a CSV manifest (a 'filepath' column), FITS/PNG/.npy
files given one by one, a text file listing one path per line (.txt/.lst), or a dataset root (the split
folders or manifests written by `python -m dali_lens.generate`; --split picks one, default all of them).
Labels are not needed.

The output has one row per cutout, `file,id,label,score` (label: 1 lens, 0 non-lens, empty when the data
has no labels; score: the ensemble's lens probability), plus with several members `score_<member>` for each
member and `member_std` (their spread); member scores are sigmoid(logit/T) with the checkpoint's temperature T
under --fusion temperature, sigmoid(logit) otherwise. Rows are appended and flushed batch by batch, so memory
stays bounded and an interrupted run loses at most one batch. Rerunning the same command resumes: rows already
in --out are kept untouched (a truncated last line is cut off), the files they name are skipped, and the missing
rows are appended. A complete output is left as it is.

What wrote --out is recorded next to it in OUT.meta.json (the checkpoints' sha256, --fusion, --tta, --hdus,
DATA). A rerun appends only to a file whose first line is exactly this run's header and whose record matches
(else it stops, listing what differs, and touches nothing); any other existing file is never modified. A run
holds OUT.lock (an exclusive flock naming its pid and host) from start to end: a second run onto the same
--out stops at once, naming the first. Every cell reads back identically with Python's csv module (file
names with commas, quotes, CR or LF included); a cell starting with = + - @ (or tab, CR, ') is written with a
leading ' so that a spreadsheet does not run it as a formula, and dali-lens's readers remove that quote.

--out NAME.parquet: a folder of Parquet part files (pandas/pyarrow read it as one table) with the data's
catalogue columns (a name clashing with ours becomes cat_<name>) and the provenance in each part's schema
metadata instead of OUT.meta.json; resumed alike. --top K (Parquet only): keep only the K best-scoring rows of
the whole run, with the histogram of every score in the metadata (see README, "Survey-scale predictions").

Several processes: under torchrun each rank scores its share of the remaining cutouts (every cutout exactly
once) into OUT.part-<rank>-of-<world>.csv, then rank 0 merges the parts into OUT atomically. --merge does the
merge step alone (for ranks launched as separate jobs). A restarted job skips the rows already in the parts.
Job arrays need no rendezvous: --shard I/N scores part I of N fixed, disjoint parts of DATA (whole tar shards
of packed data) into OUT.shard-I-of-N.csv (.parquet for a Parquet OUT), resumable like OUT; --merge joins
all N (refusing missing, unfinished, overlapping or mismatched parts, by name) and removes them. --embeddings
adds each member's pooled features: emb_<member> columns in Parquet, OUT.embeddings.<k>.npy beside a CSV.

Examples:
  python -m dali_lens.predict --checkpoint runs/single-small_cnn/best.pt /data/cutouts --out preds.csv
  python -m dali_lens.predict --checkpoint runs/a --checkpoint runs/b survey.csv --out preds.csv --tta
  python -m dali_lens.predict --checkpoint runs/a /data/lenses --split test --out test_preds.csv
  python -m dali_lens.predict --checkpoint runs/a tile1/*.fits --out tile1.csv --backend dali-cpu
  torchrun --nproc_per_node 4 -m dali_lens.predict --checkpoint runs/a /data/cutouts --out preds.csv
  python -m dali_lens.predict --merge --out preds.csv
  python -m dali_lens.predict -c runs/a /data/packed --out p.csv --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT
Exit status: 0 done (or nothing left to do), 2 bad input or options (the message names the file or option),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); both keep the rows written so far.
"""
from __future__ import annotations

import argparse
import sys

from ..choices import SHARD
from ..cli import Parser, add_scoring_args, run_command
from ..data.dataset import DataError
from ..predictions import PredictError, merge_only, predict_files


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.predict", description=__doc__)
    ap.add_argument("data", nargs="*", metavar="DATA",
                    help="cutouts: folder(s), CSV manifest(s), image/FITS/.npy file(s), a .txt list of paths, or a "
                         "dataset root")
    ap.add_argument("--checkpoint", "-c", action="append", metavar="CKPT",
                    help="a checkpoint (best.pt/last.pt) or a run directory (its best.pt); repeat for an ensemble")
    ap.add_argument("--out", "-o", required=True, help="the CSV file to write (appended to when resuming); "
                    "OUT.parquet: a folder of Parquet parts with the catalogue columns")
    ap.add_argument("--split", default="all",
                    help="for a labelled dataset root: train, val, test, or all (every split; default)")
    add_scoring_args(ap, "the cores divided among local processes", limit=True)
    ap.add_argument("--merge", action="store_true", help="only merge OUT.part-*-of-*.csv (torchrun) or the "
                    "--shard parts OUT.shard-I-of-N.csv into OUT (no checkpoint or DATA needed)")
    ap.add_argument("--shard", type=SHARD, default=None, metavar="I/N", help="score only part I (0-based) of N "
                    "disjoint parts of DATA into OUT.shard-I-of-N.csv (a job-array task; see docs/slurm.md)")
    ap.add_argument("--embeddings", action="store_true", help="also write each member's pooled features (see "
                    "README, 'Job arrays and embeddings')")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if not args.merge:
        if not args.checkpoint:
            ap.error("--checkpoint is required (or --merge)")
        if not args.data:
            ap.error("DATA is required (or --merge)")
    from ..inference import CheckpointError
    from ..pipelines import BackendError

    try:
        return run_command(lambda: merge_only(args.out) if args.merge else predict_files(
                               args.checkpoint, args.data, args.out, split=args.split, backend=args.backend,
                               batch_size=args.batch_size, tta=args.tta, fusion=args.fusion, workers=args.workers,
                               threads=args.threads, hdus=args.hdus, skip_bad=args.skip_bad, limit=args.limit,
                               progress=args.progress, top=args.top, shard=args.shard, embeddings=args.embeddings),
                           (DataError, CheckpointError, PredictError, BackendError, FileNotFoundError,
                            PermissionError, IsADirectoryError),
                           f"interrupted: rows written so far are kept in {args.out} (or its part files); "
                           "rerun the same command to resume", output=args.out)
    finally:
        from ..distributed import shutdown

        shutdown()


if __name__ == "__main__":
    sys.exit(main())

