"""Look at the candidates: a colour gallery and a keyboard grading page for chosen rows of a predictions CSV.

PREDICTIONS is a predictions.csv from `predict`, `evaluate` or a training run; DATA is the data it came from,
in any source kind (loose images, FITS by HDU, per-band FITS, the challenge layout, .npy, packed shards).
Writes to --out (default: inspect/ next to PREDICTIONS):

  gallery.png  a mosaic labelled with ID, score (± ensemble spread), label; false positives framed red,
               missed lenses blue (the first --gallery-max candidates)
  index.html   one self-contained page (works from the file system, no network): thumbnails sortable by
               score, a filter by label, keyboard grading (arrows move, 0-3 grade: 0 not a lens, 1 possible,
               2 probable, 3 definite; s/space skip), grades kept in the browser, "export grades.csv"
               (id,grade,score); --grades brings an exported file back into a new page

Colour: 3+ float bands are an asinh RGB composite in the Lupton et al. (2004) style (--rgb-bands R,G,B picks
the bands; default 2,1,0 = the first three reversed, for bands ordered blue to red like g,r,i; the challenge
ground track R,I,G,U defaults to 1,0,2); 1-2 bands are greyscale asinh; PNG/JPEG cutouts are shown as they
are. Masked pixels (NaN/inf and --mask-value) are drawn flat grey and do not affect the stretch. A missing
or unreadable cutout is a placeholder tile naming the problem (and a log line); IDs not in DATA are listed.

Examples:
  python -m dali_lens.inspect runs/single-small_cnn/predictions.csv data/lenses --top 200
  python -m dali_lens.inspect eval/predictions.csv challenge/ --false-positives 50 --missed 50 --out look
  python -m dali_lens.inspect preds.csv /data/cutouts --ids followup.txt --grades grades.csv --out look2
  python -m dali_lens.inspect --grades grades.csv --summary
Exit status: 0 done, 2 bad input (the message names the file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from .choices import ANY_NUMBER, COUNT, HDUS, NON_NEGATIVE, PROBABILITY, THREADS, IntList
from .cli import Parser, log, run_command
from .data.dataset import DataError, parse_hdus


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.inspect", description=__doc__)
    ap.add_argument("predictions", nargs="?", metavar="PREDICTIONS", help="predictions CSV (file,id[,label],score...)")
    ap.add_argument("data", nargs="?", metavar="DATA", help="the data the predictions came from")
    ap.add_argument("--out", "-o", default=None, help="output folder (default: inspect/ next to PREDICTIONS)")
    ap.add_argument("--top", type=NON_NEGATIVE, default=0, metavar="N", help="the N highest scores (default 100 when no "
                                                                        "other selection is given)")
    ap.add_argument("--bottom", type=NON_NEGATIVE, default=0, metavar="N", help="the N lowest scores")
    ap.add_argument("--ids", default=None, metavar="FILE", help="the IDs listed in FILE (one per line)")
    ap.add_argument("--false-positives", type=NON_NEGATIVE, default=0, metavar="N",
                    help="labelled data: the N highest-scoring non-lenses")
    ap.add_argument("--missed", type=NON_NEGATIVE, default=0, metavar="N", help="labelled data: the N lowest-scoring lenses")
    ap.add_argument("--threshold", type=PROBABILITY, default=0.5,
                    help="labelled candidates shown are marked false positive (non-lens >= it) or missed (lens "
                         "below it) (default: 0.5)")
    ap.add_argument("--rgb-bands", type=IntList(0, count=3, what="band indices"), default=None,
                    metavar="R,G,B", help="0-based bands shown as red, green, blue")
    ap.add_argument("--mask-value", type=ANY_NUMBER, default=None,
                    help="pixels with this value are masked (default: the value a generated set records in its "
                         "dataset.json/generator.json, else 100 for the challenge layout; NaN/inf always are)")
    ap.add_argument("--hdus", type=HDUS, default=None, help="FITS: HDU indices/EXTNAMEs per band")
    ap.add_argument("--grades", default=None, metavar="FILE",
                    help="grades CSV (id,grade[,score]) to bring into the new page; with --summary: the file to "
                         "summarise")
    ap.add_argument("--summary", action="store_true", help="print the purity of --grades by score bin and stop")
    ap.add_argument("--bins", default=None, help="--summary score bin edges (default: 0,0.5,0.8,0.9,0.95,0.99,1)")
    ap.add_argument("--gallery-max", type=COUNT, default=200, metavar="N",
                    help="at most N tiles in gallery.png (index.html has every candidate) (default: 200)")
    ap.add_argument("--workers", type=THREADS, default=None, help="reader threads (default: the cores, at most 8)")
    ap.add_argument("--overwrite", action="store_true", help="replace gallery.png/index.html in --out")
    ap.add_argument("--injected", type=NON_NEGATIVE, default=0, metavar="N", help="N arcs of the run's --inject (config.json next to PREDICTIONS) on DATA's backgrounds, bare and with arcs, next to N real lenses")
    return ap


def _bins(text: str | None):
    from .inspection import DEFAULT_BINS

    if not text:
        return DEFAULT_BINS
    try:
        edges = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"--bins: expected comma-separated numbers, got {text!r}") from None
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise DataError(f"--bins {text}: need at least two increasing edges")
    return edges


def run(args) -> int:
    from . import inspection

    if args.summary:
        print(inspection.grades_summary(args.grades, _bins(args.bins)))
        return 0
    if args.injected:  # issue 25: inspection/injected.py
        return 0 if inspection.show_injected(args.predictions, args.data, args.out, args.injected, overwrite=args.overwrite, log=log) else 2
    res = inspection.inspect_predictions(
        args.predictions, args.data, args.out, top=args.top, bottom=args.bottom, ids=args.ids,
        false_positives=args.false_positives, missed=args.missed, rgb_bands=args.rgb_bands,
        mask_value=args.mask_value, hdus=parse_hdus(args.hdus), threshold=args.threshold, grades=args.grades,
        gallery_max=args.gallery_max, overwrite=args.overwrite, workers=args.workers, log=log)
    bad = len(res["problems"])
    log(f"{res['shown']} candidates" + (f" ({bad} not shown: placeholder tiles)" if bad else "")
        + f"; wrote {res['out']}/gallery.png and {res['out']}/index.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.summary:
        if not args.grades:
            ap.error("--summary needs --grades FILE")
    elif not (args.predictions and args.data):
        ap.error("PREDICTIONS and DATA are required (or --grades FILE --summary)")
    return run_command(lambda: run(args), (DataError, FileNotFoundError, PermissionError, IsADirectoryError),
                       "interrupted: files already written are complete (each is written atomically)",
                       output=args.out)


if __name__ == "__main__":
    sys.exit(main())
