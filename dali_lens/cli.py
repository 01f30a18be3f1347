"""What the ``python -m dali_lens.<command>`` entry points share: logging and exit codes."""
from __future__ import annotations

import argparse
import sys
import warnings

from .choices import BACKENDS, FUSIONS


def log(*parts) -> None:
    """Progress and errors go to stderr, so that a command's stdout stays clean for its results."""
    print(*parts, file=sys.stderr, flush=True)


def run_command(action, errors: tuple, interrupted: str, hint=None) -> int:
    """Run a command's ``action()`` and turn the outcome into an exit code.

    ``action``'s own int (any other return value means success, 0); 2 with a one-line ``error: ...`` (no
    traceback) for the expected ``errors``, plus ``hint(exc)``'s line when it returns one; 130 with the
    ``interrupted`` line on Ctrl-C.
    DALI's advice to iterator authors (``set reader_name``) is silenced: it is not meant for a CLI's users.
    """
    warnings.filterwarnings("ignore", message=".*set `reader_name`")
    try:
        rc = action()
    except KeyboardInterrupt:
        log(interrupted)
        return 130
    except errors as exc:
        log(f"error: {exc}")
        extra = hint(exc) if hint is not None else None
        if extra:
            log(extra)
        return 2
    return rc if isinstance(rc, int) else 0


def add_scoring_args(ap: argparse.ArgumentParser, workers_help: str = "all cores") -> None:
    """The options ``predict`` and ``evaluate`` share: loader, batch, fusion, TTA, threads, FITS HDUs, bad files."""
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="loader: auto (DALI on GPU, else DALI CPU, else torchvision) (default: auto)")
    ap.add_argument("--batch-size", type=int, default=64, help="cutouts per batch (default: 64)")
    ap.add_argument("--tta", action="store_true", help="average over the 8 rotations/flips (8x the compute)")
    ap.add_argument("--fusion", choices=FUSIONS, default=None,
                    help="how member scores are combined (default: the training run's, else mean_prob); "
                         "temperature uses the temperatures stored in the checkpoints")
    ap.add_argument("--workers", type=int, default=None, help=f"loader threads per process (default: {workers_help})")
    ap.add_argument("--threads", type=int, default=None,
                    help="PyTorch CPU threads for the models (default: PyTorch's choice; on a small, busy machine "
                         "--threads 1 --workers 1 can be much faster)")
    ap.add_argument("--hdus", default=None, help="FITS: HDU indices/EXTNAMEs per band (default: the checkpoint's)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="read every file first and skip the unreadable/bad ones (listed) instead of stopping")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
