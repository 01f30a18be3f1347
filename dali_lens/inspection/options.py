"""``python -m dali_lens.inspect``'s options: its parser (one flag per selection, display and output option,
each held to its documented range by ``choices``), the checks argparse cannot make, and the keyword arguments
of :func:`dali_lens.inspection.inspect_predictions` they give. The command module (``dali_lens/inspect.py``)
stays a docstring and a main over these."""
from __future__ import annotations

import argparse

from ..choices import ANY_NUMBER, AT_N, COUNT, HDUS, NON_NEGATIVE, PROBABILITY, THREADS, IntList
from ..cli import Parser
from ..data.dataset import DataError, parse_hdus
from ..metrics import DEFAULT_AT_N


def build_parser(description: str) -> argparse.ArgumentParser:
    """The inspect command's parser, with ``description`` (the command's docstring) as its help."""
    ap = Parser(prog="python -m dali_lens.inspect", description=description)
    ap.add_argument("predictions", nargs="?", metavar="PREDICTIONS",
                    help="predictions CSV or predict's OUT.parquet (file,id[,label],score...)")
    ap.add_argument("data", nargs="?", metavar="DATA", help="the data the predictions came from")
    ap.add_argument("--out", "-o", default=None, help="output folder (default: inspect/ next to PREDICTIONS)")
    ap.add_argument("--top", type=NON_NEGATIVE, default=0, metavar="N", help="the N highest scores (default 100 when no "
                                                                        "other selection is given)")
    ap.add_argument("--bottom", type=NON_NEGATIVE, default=0, metavar="N", help="the N lowest scores")
    ap.add_argument("--ids", default=None, metavar="FILE", help="the IDs listed in FILE (one per line)")
    ap.add_argument("--false-positives", type=NON_NEGATIVE, default=0, metavar="N",
                    help="labelled data: the N highest-scoring non-lenses")
    ap.add_argument("--missed", type=NON_NEGATIVE, default=0, metavar="N", help="labelled data: the N lowest-scoring lenses")
    ap.add_argument("--uncertain", type=NON_NEGATIVE, default=0, metavar="N",
                    help="the N scores nearest --threshold (the most informative to grade next; equally near: the "
                         "higher score first)")
    ap.add_argument("--disagree", type=NON_NEGATIVE, default=0, metavar="N",
                    help="ensemble predictions: the N with the largest spread between the members (member_std, or "
                         "the standard deviation of the score_<member> columns)")
    ap.add_argument("--threshold", type=PROBABILITY, default=0.5,
                    help="labelled candidates shown are marked false positive (non-lens >= it) or missed (lens "
                         "below it); --uncertain picks the scores nearest it (default: 0.5)")
    ap.add_argument("--rgb-bands", type=IntList(0, count=3, what="band indices"), default=None,
                    metavar="R,G,B", help="0-based bands shown as red, green, blue")
    ap.add_argument("--mask-value", type=ANY_NUMBER, default=None,
                    help="pixels with this value are masked (default: the value a generated set records in its "
                         "dataset.json/generator.json, else 100 for the challenge layout; NaN/inf always are)")
    ap.add_argument("--hdus", type=HDUS, default=None, help="FITS: HDU indices/EXTNAMEs per band")
    ap.add_argument("--grades", default=None, metavar="FILE",
                    help="grades CSV (id,grade[,score]) to bring into the new page; with --summary: the file to "
                         "summarise")
    ap.add_argument("--summary", action="store_true",
                    help="print the purity of --grades by score bin, and purity@N, completeness@N and completeness "
                         "at purity of the graded candidates ranked by score (lens = graded 2 or 3), and stop")
    ap.add_argument("--bins", default=None, help="--summary score bin edges (default: 0,0.5,0.8,0.9,0.95,0.99,1)")
    ap.add_argument("--at-n", type=AT_N, default=DEFAULT_AT_N, metavar="N,...",
                    help="--summary: purity@N and completeness@N at these N, capped at the graded count (default: "
                         "10,100,1000)")
    ap.add_argument("--gallery-max", type=COUNT, default=200, metavar="N",
                    help="at most N tiles in gallery.png (index.html has every candidate) (default: 200)")
    ap.add_argument("--workers", type=THREADS, default=None, help="reader threads (default: the cores, at most 8)")
    ap.add_argument("--overwrite", action="store_true", help="replace gallery.png/index.html in --out")
    ap.add_argument("--injected", type=NON_NEGATIVE, default=0, metavar="N",
                    help="N arcs of the run's --inject (config.json next to PREDICTIONS) on DATA's backgrounds, bare "
                         "and with arcs, next to N real lenses")
    ap.add_argument("--similar", metavar="ID", help="the --top K (default 100) nearest to ID by embedding "
                                                    "(predictions made with predict --embeddings)")
    return ap


def check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check by itself: the positional arguments each mode needs (``ap.error``: exit 2)."""
    if args.summary:
        if not args.grades:
            ap.error("--summary needs --grades FILE")
    elif not (args.predictions and args.data):
        ap.error("PREDICTIONS and DATA are required (or --grades FILE --summary)")


def parse_bins(text: str | None):
    """``--bins``: increasing comma-separated edges (default ``DEFAULT_BINS``); DataError naming the option."""
    from .candidates import DEFAULT_BINS

    if not text:
        return DEFAULT_BINS
    try:
        edges = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DataError(f"--bins: expected comma-separated numbers, got {text!r}") from None
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise DataError(f"--bins {text}: need at least two increasing edges")
    return edges


#: the options passed to inspect_predictions under their own names
_PASSED = ("top", "bottom", "ids", "false_positives", "missed", "uncertain", "disagree", "rgb_bands", "mask_value",
           "threshold", "grades", "gallery_max", "overwrite", "workers", "similar")


def inspect_arguments(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``inspect_predictions(args.predictions, args.data, args.out, **...)``."""
    return {**{k: getattr(args, k) for k in _PASSED}, "hdus": parse_hdus(args.hdus)}
