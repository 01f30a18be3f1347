"""What the ``python -m dali_lens.<command>`` entry points share: their parser, logging and exit codes."""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import warnings

from .choices import BACKENDS, COUNT, FUSIONS, HDUS, LOADER_WORKERS, THREADS

#: exit status on SIGTERM (128 + 15), as on Ctrl-C (130): the same message, the same files kept
EXIT_TERMINATED = 143


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's documented range (its ``type``'s ``describe``, from ``choices.py``)."""

    def _get_help_string(self, action):
        text = action.help or ""
        rng = getattr(action.type, "describe", None)
        return f"{text} [{rng}]" if rng and action.help != argparse.SUPPRESS else text


def one_line(text) -> str:
    """``text`` as one printable line: control characters (a CR or LF in a file name or id from the data) are
    shown escaped (``\\r``), so an ``error:`` line stays one line on a terminal and in a log."""
    import unicodedata

    return "".join(repr(ch)[1:-1] if unicodedata.category(ch).startswith("C") else ch for ch in str(text))


class Parser(argparse.ArgumentParser):
    """Every command's parser: a bad option is one ``error: --option ...`` line (then exit 2), no usage block."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)

    def error(self, message):
        if message.startswith("argument "):
            message = message[len("argument "):]
        self.exit(2, f"error: {one_line(message)} (see {self.prog} --help)\n")


def check_options(ap: argparse.ArgumentParser, options: dict) -> None:
    """The library's door to a command's options (``dali_lens.predict(**options)``): each value is held to the
    range its flag declares in ``ap``, raising ``choices.OptionRangeError`` naming the flag."""
    for action in ap._actions:
        if action.dest in options and hasattr(action.type, "check"):
            action.type.check(action.option_strings[-1] if action.option_strings else action.dest,
                              options[action.dest])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is so that it unwinds like Ctrl-C (checkpoints and rows kept)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def write_problem(exc: OSError, output: str | None = None) -> str | None:
    """The one line for an output that could not be written (full disk, read-only, ...), naming the path
    (the error's own file name, else the command's ``output``); None for other errors."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EROFS: "read-only file system",
               errno.EDQUOT: "disk quota exceeded", errno.EFBIG: "file too large"}
    if exc.errno not in reasons:
        return None
    path = exc.filename or output
    return f"cannot write {path}: {reasons[exc.errno]}" if path else f"cannot write the output: {reasons[exc.errno]}"


def log(*parts) -> None:
    """Progress and errors go to stderr, so that a command's stdout stays clean for its results."""
    print(*parts, file=sys.stderr, flush=True)


def run_command(action, errors: tuple, interrupted: str, hint=None, output: str | None = None) -> int:
    """Run a command's ``action()`` and turn the outcome into an exit code.

    ``action``'s own int (any other return value means success, 0); 2 with a one-line ``error: ...`` (no
    traceback) for the expected ``errors``, plus ``hint(exc)``'s line when it returns one; 130 with the
    ``interrupted`` line on Ctrl-C, 143 with it on SIGTERM (which unwinds like Ctrl-C: checkpoints and rows
    written so far are kept). An output that cannot be written (full disk, read-only file system: an
    ``OSError`` named by ``data.io``'s writers, else by ``output``, what the command writes) is 2 too.
    DALI's advice to iterator authors (``set reader_name``) is silenced: it is not meant for a CLI's users.
    """
    warnings.filterwarnings("ignore", message=".*set `reader_name`")
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        pass
    try:
        rc = action()
    except Terminated:
        log(interrupted.replace("interrupted", "terminated (SIGTERM)", 1))
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        log(interrupted)
        return 130
    except errors as exc:
        log("error: " + one_line(write_problem(exc, output) if isinstance(exc, OSError) and write_problem(exc) else exc))
        extra = hint(exc) if hint is not None else None
        if extra:
            log(extra)
        return 2
    except OSError as exc:
        line = write_problem(exc, output)
        if line is None:
            raise
        log(f"error: {one_line(line)}")
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return rc if isinstance(rc, int) else 0


def add_scoring_args(ap: argparse.ArgumentParser, workers_help: str = "all cores", limit: bool = False) -> None:
    """The options ``predict`` and ``evaluate`` share: loader, batch, fusion, TTA, threads, FITS HDUs, bad files
    (and ``predict``'s ``--limit``: the options ``dali_lens.predict`` checks through :func:`scoring_parser`)."""
    ap.add_argument("--backend", default="auto", choices=BACKENDS,
                    help="loader: auto (DALI on GPU, else DALI CPU, else torchvision) (default: auto)")
    ap.add_argument("--batch-size", type=COUNT, default=64, help="cutouts per batch (default: 64)")
    ap.add_argument("--tta", action="store_true", help="average over the 8 rotations/flips (8x the compute)")
    ap.add_argument("--fusion", choices=FUSIONS, default=None,
                    help="how member scores are combined (default: the training run's, else mean_prob); "
                         "temperature uses the temperatures stored in the checkpoints")
    ap.add_argument("--workers", type=LOADER_WORKERS, default=None,
                    help=f"loader threads per process; 0: torchvision loads in the process itself, DALI uses 1 thread "
                         f"(default: {workers_help})")
    ap.add_argument("--threads", type=THREADS, default=None,
                    help="PyTorch CPU threads for the models (default: PyTorch's choice; on a small, busy machine "
                         "--threads 1 --workers 1 can be much faster)")
    ap.add_argument("--hdus", type=HDUS, default=None, help="FITS: HDU indices/EXTNAMEs per band (default: the checkpoint's)")
    ap.add_argument("--skip-bad", action="store_true",
                    help="read every file first and skip the unreadable/bad ones (listed) instead of stopping")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    if limit:
        ap.add_argument("--limit", type=COUNT, default=None, metavar="N",
                        help="score at most N of the cutouts not yet in --out, then stop (rerun to continue)")
        ap.add_argument("--top", type=COUNT, default=None, metavar="K",
                        help="keep only the K best-scoring rows of the whole run, plus the histogram of every score "
                             "(a Parquet --out only)")


def scoring_parser() -> argparse.ArgumentParser:
    """The scoring options alone (``predict``'s), for the library's :func:`check_options`."""
    ap = Parser(add_help=False)
    add_scoring_args(ap, limit=True)
    return ap
