"""Atomic file writes: a file is either absent, its old version, or complete, never truncated.

Every helper writes to a temporary file in the destination directory (hidden name ``.<name>.<pid>.<n>.tmp``,
so dataset discovery never picks it up), optionally ``fsync``s it and then ``os.replace``s it onto the final
name. ``os.replace`` is atomic on POSIX and Windows when source and target are on the same file system, which
is why the temporary file lives next to the target. If the process is interrupted (Ctrl-C, kill, exception)
the temporary file is removed when possible and the target is untouched.

``fsync=True`` (the default) also makes the new content durable across a power loss / OS crash before the
rename; bulk writers that create many small files (the synthetic dataset generator) may pass ``fsync=False``:
the rename still guarantees that an interrupted *process* never leaves a truncated file.

:func:`load_torch_plain` is the one reader of what :func:`atomic_save_torch` writes (checkpoints, ``--weights``
files): tensors and plain data only, never an unpickled object.

A write that fails (full disk, read-only file system, quota) raises ``OSError`` with the errno of the cause and
the *final* path as its ``filename`` (not the hidden temporary name), so that ``cli.run_command`` reports it
as one line, ``error: cannot write PATH: no space left on device``; ``torch.save``'s zip writer turns such a
failure into a RuntimeError (``unexpected pos``), which ``atomic_save_torch`` maps back to the OSError.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import itertools
import json
import os
from typing import IO, Any, Iterable, Iterator, Sequence

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_write_csv",
    "atomic_save_torch",
    "load_torch_plain",
    "open_text",
]

_counter = itertools.count()


def _tmp_path(path: str) -> str:
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}.{os.getpid()}.{next(_counter)}.tmp")


def fsync_dir(directory: str) -> None:
    """fsync a directory so that the rename itself is durable (POSIX only; a no-op elsewhere)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", *, fsync: bool = True,
                encoding: str | None = None, newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces ``path`` atomically.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8). On an exception the temporary file
    is deleted and ``path`` is left as it was. The file is created with the usual permissions (0o666 minus the
    umask), like ``open(path, "w")``.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open: mode must be 'wb' or 'w', got {mode!r}")
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        raise _named(exc, path) from exc
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    try:
        with f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _named(exc, path) from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def _named(exc: OSError, path: str) -> OSError:
    """``exc`` with the final ``path`` as its file name (the temporary name means nothing to a user)."""
    if exc.errno is None or exc.filename == path:
        return exc
    return OSError(exc.errno, os.strerror(exc.errno), path)  # OSError picks the subclass of the errno


def write_failure(path: str) -> OSError | None:
    """Why writing in ``path``'s folder fails, as an OSError naming ``path``: a read-only file system or a full
    one (for writers that lose the errno, like torch's zip writer); None if neither."""
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    except (OSError, AttributeError):
        return None
    if st.f_flag & getattr(os, "ST_RDONLY", 1):
        code = errno.EROFS
    elif st.f_bavail * st.f_frsize < 1 << 20:  # under 1 MiB left: the write ran out of space
        code = errno.ENOSPC
    else:
        return None
    return OSError(code, os.strerror(code), path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same directory, fsync, os.replace)."""
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (no newline translation: what you pass is what is written)."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, fsync: bool = True,
                      sort_keys: bool = False) -> None:
    """Serialise ``obj`` as JSON (numpy scalars/arrays are converted) and write it atomically."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default)
    atomic_write_text(path, text + "\n", fsync=fsync)


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence[Any]], *,
                     fsync: bool = True) -> None:
    """Write a CSV file (``header`` then ``rows``, ``\\n`` line endings) atomically."""
    buf = io.StringIO(newline="")
    write_csv_rows(buf, [header, *rows])
    atomic_write_text(path, buf.getvalue(), fsync=fsync)


def atomic_save_torch(obj: Any, path: str | os.PathLike, *, fsync: bool = True) -> None:
    """``torch.save(obj, path)`` atomically: a checkpoint is never left half-written."""
    import torch

    with atomic_open(path, "wb", fsync=fsync) as f:
        try:
            torch.save(obj, f)
        except RuntimeError as exc:  # the zip writer's "unexpected pos": the file system refused a write
            cause = write_failure(os.fspath(path))
            if cause is None:
                raise
            raise cause from exc


@contextlib.contextmanager
def open_text(path: str | os.PathLike, newline: str | None = None) -> Iterator[IO[str]]:
    """Open a text input (a CSV manifest, a list of files, a predictions or grades CSV) as UTF-8: bytes that
    are not UTF-8 (a Latin-1 file name) are one ``DataError`` naming the file and line, not a traceback."""
    from .dataset import DataError

    with open(path, encoding="utf-8", newline=newline) as fh:
        try:
            yield fh
        except UnicodeDecodeError as exc:
            raise DataError(f"{os.fspath(path)}, line {_undecodable_line(path)}: not UTF-8 text ({exc.reason} "
                            f"at byte {exc.object[exc.start:exc.start + 1]!r}); save the file as UTF-8") from None


def _undecodable_line(path) -> int | str:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError:
                return lineno
    return "?"


def load_torch_plain(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` of tensors and plain data only (dicts, lists, tuples, strings, bytes, numbers, None): no code in
    the file ever runs. ``weights_only=True`` refuses every other object before building it (PyTorch's
    restricted unpickler), and there is no fallback to full unpickling. Raises ``ValueError`` naming ``path``
    when the file holds anything else, is not a PyTorch file, or is unreadable (``FileNotFoundError`` /
    ``PermissionError`` pass through).
    """
    import re
    import warnings

    import torch

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():  # (PyTorch's remarks on the pickle protocol of files it then reads)
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # pickle.UnpicklingError from the restricted unpickler, zip/EOF errors, ...
        text = str(exc)
        # torch names the refused global in two wordings: "Unsupported global: GLOBAL m.f" and (a module it
        # blocks outright, such as os or posix) "Trying to load unsupported GLOBAL m.f whose module m is blocked"
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
        if found:
            raise ValueError(f"{path}: refused: it holds a Python object ({found.group(1)}), not only tensors and "
                             "plain data; dali-lens never unpickles objects from a file (that can run code)") from None
        op = re.search(r"Unsupported operand (\d+)", text)
        if op:  # a bare pickle, or no pickle at all: the restricted unpickler stopped at its first steps
            raise ValueError(f"{path}: refused: not a PyTorch file of tensors and plain data (pickle opcode "
                             f"{op.group(1)}, which such a file never holds); nothing in it was run") from None
        if "WeightsUnpickler error:" in text:  # the restricted unpickler stopped at something else
            text = text.split("WeightsUnpickler error:", 1)[1]
        detail = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
        raise ValueError(f"{path}: not a readable PyTorch file of tensors and plain data ({detail[:200]})") from None


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


# ---------------------------------------------------------------------------------------------------------
# one run at a time per output


class OutputLockedError(FileExistsError):
    """Another run holds the lock of this output (or the lock's name is taken by a file of someone else)."""


class OutputLock:
    """An exclusive ``flock`` on the file ``path``, held from :meth:`acquire` to :meth:`release`.

    The holder writes who it is (pid, host, start time, command) into the lock file; a second ``acquire``
    fails at once with :class:`OutputLockedError`, its message made by ``busy(holder description)``. The
    kernel drops the lock when the holder exits, however it exits (kill -9 included), so a lock file left
    behind never blocks a later run. :meth:`release` removes the file (while still holding the lock:
    ``acquire`` checks that the file it locked is still the one at ``path``, so removing it is safe).
    A file at ``path`` that holds something other than a lock record is never written or removed.
    The folders :meth:`acquire` made for ``path`` are removed by :meth:`release` while they are empty: a
    command that failed before writing anything leaves no folder where there was none.
    (``flock`` on NFS is only as reliable as the NFS server's locking.)
    """

    def __init__(self, path: str | os.PathLike, busy) -> None:
        self.path, self.busy = os.path.abspath(os.fspath(path)), busy
        self.fd: int | None = None
        self.made: list[str] = []  # the folders acquire() created, deepest first

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no protection against a concurrent run
            return
        import datetime
        import json as _json
        import socket
        import sys

        folder, self.made = os.path.dirname(self.path), []
        while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
            self.made.append(folder)
            folder = os.path.dirname(folder)
        while True:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except FileNotFoundError:  # a failed run's release removed the empty folder just now: make it again
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 4096).decode("utf-8", "replace").strip()
                os.close(fd)
                raise OutputLockedError(self.busy(describe_lock_holder(holder))) from None
            try:
                st = os.stat(self.path)
                same = (st.st_ino, st.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev)
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it between our open and our flock: lock the new one
        old = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        if old and _lock_record(old) is None:
            os.close(fd)
            raise OutputLockedError(f"{self.path}: exists and is not a dali-lens lock file; it is left untouched: "
                                    "remove it or choose another output")
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_json.dumps(info) + "\n").encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.unlink(self.path)  # still locked: nobody else holds this file
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None
        for folder in self.made:  # rmdir removes only an empty folder, never a link or a file
            try:
                os.rmdir(folder)
            except OSError:
                break
        self.made = []


def _lock_record(text: str) -> dict | None:
    try:
        h = json.loads(text)
    except ValueError:
        return None
    return h if isinstance(h, dict) and "pid" in h and "host" in h else None


def describe_lock_holder(holder: str) -> str:
    """``pid N on HOST, started T: COMMAND`` from a lock file's text (or what it holds)."""
    h = _lock_record(holder)
    if h is None:
        return "it is just starting" if not holder else holder[:200]
    return f"pid {h['pid']} on {h['host']}, started {h.get('started')}: {h.get('command', '')}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------------
# CSV cells that read back exactly


# Cells a spreadsheet would run as a formula (OWASP CSV injection): written with a leading single quote.
# A cell that itself begins with a quote gets one too, so that ``from_cell`` undoes exactly what ``to_cell`` did.
_RISKY = ("=", "+", "-", "@", "\t", "\r", "'")


def to_cell(text: str) -> str:
    """A text cell (file, id) as a predictions CSV stores it: a spreadsheet never runs it as a formula."""
    text = str(text)
    return "'" + text if text.startswith(_RISKY) else text


def from_cell(text: str) -> str:
    """The text ``to_cell`` stored (every reader of a predictions CSV undoes the quote, so ids round-trip)."""
    return text[1:] if text.startswith("'") else text


def write_csv_rows(fh, rows) -> None:
    """Write rows (the header included) to the text file ``fh`` (opened with ``newline=""``) so that Python's
    csv module reads every cell back exactly: ``\n`` line ends, and a row with a carriage return in a cell
    fully quoted (the csv module leaves a lone CR unquoted with a ``\n`` line end, and its readers then split
    the cell)."""
    plain = csv.writer(fh, lineterminator="\n")
    quoted = csv.writer(fh, lineterminator="\n", quoting=csv.QUOTE_ALL)
    for row in rows:
        (quoted if any("\r" in str(c) for c in row) else plain).writerow(row)


# ---------------------------------------------------------------------------------------------------------
# the record of what a command wrote into a folder it shares with other files


OUTPUT_RECORD = ".dali-lens-outputs.json"


def recorded_outputs(out: str, command: str) -> set[str]:
    """The names (directly inside ``out``) that ``command``'s record there says it wrote; empty without one."""
    try:
        with open(os.path.join(out, OUTPUT_RECORD), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return set()
    if not isinstance(rec, dict) or not isinstance(rec.get(command), list):
        return set()
    return {n for n in rec[command] if isinstance(n, str) and n and os.path.basename(n) == n and n not in (".", "..")}


def claim_outputs(out: str, command: str, names: Iterable[str], what: str = "--overwrite",
                  record: bool = True) -> set[str]:
    """Before ``command`` writes ``names`` into ``out``: refuse (FileExistsError naming them, nothing touched)
    the names that exist there but that its record does not list (someone else's files, or a link); then add
    ``names`` to the record (unless ``record`` is false: a check before any work, which writes nothing).
    Returns what the record listed before (what the command may remove as stale)."""
    names = list(names)
    before = recorded_outputs(out, command)
    theirs = [n for n in names if os.path.lexists(os.path.join(out, n))
              and (n not in before or os.path.islink(os.path.join(out, n)))]
    if theirs:
        raise FileExistsError(f"{out}: {', '.join(sorted(theirs))} {'was' if len(theirs) == 1 else 'were'} not "
                              f"written by {command} (no record in {OUTPUT_RECORD}); {what} replaces only its own "
                              "outputs, so nothing was touched: move them or choose another --out")
    if not record:
        return before
    try:
        with open(os.path.join(out, OUTPUT_RECORD), encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        rec = {}
    rec = rec if isinstance(rec, dict) else {}
    rec[command] = sorted(before | set(names))
    os.makedirs(out, exist_ok=True)
    atomic_write_json(os.path.join(out, OUTPUT_RECORD), rec)
    return before
