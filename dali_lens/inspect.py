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

Selections (each candidate shown once, in this order): --top, --bottom, --ids, --false-positives, --missed,
--uncertain (nearest --threshold) and --disagree (largest ensemble spread): the last two pick what is most
informative to grade next.

Colour: 3+ float bands are an asinh RGB composite in the Lupton et al. (2004) style (--rgb-bands R,G,B picks
the bands; default 2,1,0 = the first three reversed, for bands ordered blue to red like g,r,i; the challenge
ground track R,I,G,U defaults to 1,0,2); 1-2 bands are greyscale asinh; PNG/JPEG cutouts are shown as they
are. Masked pixels (NaN/inf and --mask-value) are drawn flat grey and do not affect the stretch. A missing
or unreadable cutout is a placeholder tile naming the problem (and a log line); IDs not in DATA are listed.

Examples:
  python -m dali_lens.inspect runs/single-small_cnn/predictions.csv data/lenses --top 200
  python -m dali_lens.inspect eval/predictions.csv challenge/ --false-positives 50 --missed 50 --out look
  python -m dali_lens.inspect preds.csv /data/cutouts --ids followup.txt --grades grades.csv --out look2
  python -m dali_lens.inspect preds.csv /data/cutouts --uncertain 100 --disagree 50 --out next-round
  python -m dali_lens.inspect --grades grades.csv --summary --at-n 10,50
  python -m dali_lens.inspect preds.csv /data/cutouts --similar J0123+4567 --top 20   (predict --embeddings)
Exit status: 0 done, 2 bad input (the message names the file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import sys

from .cli import log, run_command
from .data.dataset import DataError


def parser() -> argparse.ArgumentParser:
    from .inspection.options import build_parser  # (the options live in the library: inspection/options.py)

    return build_parser(__doc__)


def run(args) -> int:
    from . import inspection
    from .inspection.options import inspect_arguments, parse_bins

    if args.summary:
        print(inspection.grades_summary(args.grades, parse_bins(args.bins), at_n=args.at_n))
        return 0
    if args.injected:  # issue 25: the run's arcs on DATA's backgrounds (inspection/injected.py)
        inspection.show_injected(args.predictions, args.data, args.out, args.injected, overwrite=args.overwrite,
                                 log=log)
        return 0
    res = inspection.inspect_predictions(args.predictions, args.data, args.out, log=log, **inspect_arguments(args))
    bad = len(res["problems"])
    log(f"{res['shown']} candidates" + (f" ({bad} not shown: placeholder tiles)" if bad else "")
        + f"; wrote {res['out']}/gallery.png and {res['out']}/index.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .inspection.options import check

    ap = parser()
    args = ap.parse_args(argv)
    check(ap, args)
    return run_command(lambda: run(args), (DataError, FileNotFoundError, PermissionError, IsADirectoryError),
                       "interrupted: files already written are complete (each is written atomically)",
                       output=args.out)


if __name__ == "__main__":
    sys.exit(main())
