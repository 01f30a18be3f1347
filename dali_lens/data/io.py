"""Atomic file writes: a file is either absent, its old version, or complete, never truncated.

Every helper writes to a temporary file in the destination directory (hidden name ``.<name>.<pid>.<n>.tmp``,
so dataset discovery never picks it up), optionally ``fsync``s it and then ``os.replace``s it onto the final
name. ``os.replace`` is atomic on POSIX and Windows when source and target are on the same file system, which
is why the temporary file lives next to the target. If the process is interrupted (Ctrl-C, kill, exception)
the temporary file is removed when possible and the target is untouched.

``fsync=True`` (the default) also makes the new content durable across a power loss / OS crash before the
rename; bulk writers that create many small files (the synthetic dataset generator) may pass ``fsync=False``:
the rename still guarantees that an interrupted *process* never leaves a truncated file.

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
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
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
