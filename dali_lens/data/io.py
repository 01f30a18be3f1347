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
"""
from __future__ import annotations

import contextlib
import csv
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
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if fsync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


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
        torch.save(obj, f)


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
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
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
