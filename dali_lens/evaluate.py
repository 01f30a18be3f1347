"""Evaluate trained lens finders on a labelled split: metrics with confidence intervals, completeness, plots.

Scores the split with every member of the given checkpoint(s) and their ensemble, and writes to --out:

  metrics.json     per-member and ensemble metrics side by side (accuracy, precision, recall, F1 at
                   --threshold; ROC AUC, PR AUC, ECE, TPR0, TPR10), bootstrap confidence intervals
                   (stratified percentile bootstrap, --n-boot replicates) for ROC AUC, TPR0 and TPR10,
                   completeness of the lenses at --threshold binned by every numeric catalogue column of
                   the samples (einstein_area, numb_pix_lensed_image, flux_lensed_image_in_sigma, ...), and
                   the expected contamination (false positives per true lens, purity) in a survey whose
                   lens fraction is --prior, purity@N and completeness@N (--at-n) and completeness at
                   purity 50% and 90%, on the split and at --prior
  predictions.csv  file,id,label,score[,score_<member>...,member_std]
  roc.png          ROC curves of the members and the ensemble
  completeness_<column>.png   one per catalogue column
  gallery/         gallery.png and index.html (grading page) of the false positives and missed lenses
                   (--no-gallery: off)

TPR0 / TPR10 follow the lens-finding challenge (Metcalf et al. 2019): the highest true-positive rate with
no false positive / fewer than ten. Every file is written atomically; an existing non-empty --out is not
touched unless --overwrite.

Examples:
  python -m dali_lens.evaluate --checkpoint runs/single-small_cnn /data/lenses --out eval/small_cnn
  python -m dali_lens.evaluate -c runs/a -c runs/b /data/lenses --split val --fusion mean_logit --out eval/ab
  python -m dali_lens.evaluate -c runs/ens/best.pt /data/lenses --tta --fusion temperature --out eval/ens
  python -m dali_lens.evaluate -c runs/a challenge_data/ --prior 1e-4 --threshold 0.9 --out eval/challenge
Exit status: 0 done, 2 bad input (the message names the file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from .choices import AT_N, COUNT, FRACTION_OPEN, NON_NEGATIVE, PROBABILITY, SEED
from .cli import Parser, add_scoring_args, run_command
from .data.dataset import DataError
from .evaluation import EvaluateError, evaluate_files
from .metrics import DEFAULT_AT_N


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.evaluate", description=__doc__)
    ap.add_argument("data", metavar="DATA", help="labelled data: a dataset root, or a CSV manifest with labels")
    ap.add_argument("--checkpoint", "-c", action="append", required=True, metavar="CKPT",
                    help="a checkpoint (best.pt/last.pt) or a run directory (its best.pt); repeat for an ensemble")
    ap.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    ap.add_argument("--split", default="test",
                    help="split to evaluate: test (default), val (the training run's validation split), train, all; "
                         "DATA with no splits of its own (class folders, the challenge layout, flat files) is "
                         "evaluated whole")
    ap.add_argument("--threshold", type=PROBABILITY, default=0.5,
                    help="score threshold for accuracy/precision/recall/F1, completeness, contamination (default: 0.5)")
    ap.add_argument("--prior", type=FRACTION_OPEN, default=1e-3,
                    help="lens fraction of the survey for the expected contamination and the purity/completeness "
                         "at N and at purity at the prior (default: 1e-3)")
    ap.add_argument("--at-n", type=AT_N, default=DEFAULT_AT_N, metavar="N,...",
                    help="purity@N and completeness@N at these N, each capped at the split's size (default: "
                         "10,100,1000)")
    ap.add_argument("--n-boot", type=NON_NEGATIVE, default=1000, help="bootstrap replicates for the intervals (0 = none; "
                                                             "default: 1000)")
    ap.add_argument("--alpha", type=FRACTION_OPEN, default=0.05, help="intervals at level 1 - alpha (default: 0.05)")
    ap.add_argument("--seed", type=SEED, default=0, help="bootstrap seed (default: 0)")
    ap.add_argument("--gallery", action=argparse.BooleanOptionalAction, default=True,
                    help="write gallery/ (gallery.png, index.html: the 50 highest-scoring non-lenses and 50 "
                         "lowest-scoring lenses; see python -m dali_lens.inspect) (default: on)")
    ap.add_argument("--bins", type=COUNT, default=5, help="completeness: quantile bins per column (default: 5)")
    ap.add_argument("--completeness-columns", default=None, metavar="COLS",
                    help="comma-separated catalogue columns (default: every numeric column that varies among "
                         "the lenses)")
    add_scoring_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from .inference import CheckpointError
    from .pipelines import BackendError

    options = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "data", "out")}
    return run_command(lambda: evaluate_files(args.checkpoint, args.data, args.out, **options),
                       (DataError, CheckpointError, EvaluateError, BackendError, FileNotFoundError, PermissionError),
                       "interrupted: nothing was written", output=args.out)


if __name__ == "__main__":
    sys.exit(main())
