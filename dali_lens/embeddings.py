"""The pooled feature vectors ``predict --embeddings`` writes with the predictions, and reading them back.

In a Parquet output they are columns: ``emb_<member>``, a ``fixed_size_list<float32>[D]`` per member
(:func:`parquet_fields`), in the same rows as the scores. A CSV gets files of its own:

beside ``OUT`` (the CSV, a ``--shard`` part or a torchrun rank's part), in the CSV's row order:

* ``OUT.embeddings.ids.jsonl``: one JSON line ``[file, id]`` per vector (the cutout's path and id as the CSV
  has them; JSON, so that any file name reads back; ``pandas.read_json(path, lines=True)`` reads it too);
* ``OUT.embeddings.<k>.npy``: member ``k``'s vectors (k = 0, 1, ... in the ensemble's member order; the
  record ``OUT.meta.json`` lists each member's name, dimension and file under ``embeddings``), a plain
  float32 ``(n, D)`` ``.npy`` that ``numpy.load`` (``mmap_mode="r"`` for big ones) reads.

A member's vector is the input of its final linear classifier (``scoring.pooled_layer``: the globally
pooled features of a CNN, the class token of a ViT, timm's ``pre_logits``), averaged over its scales and, with
``--tta``, over the 8 rotations/flips. The ``.npy`` files are written in place, append-only: each batch's rows
go in first, then the header's row count (a fixed 128-byte header) and the ids, and the CSV's rows last, so an
interrupted run leaves vectors for at least every row of the CSV; resuming cuts them back to the CSV's rows
(:meth:`EmbeddingWriter.reconcile`) and appends in step with it. ``predict --merge`` copies them with the rows.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from typing import NamedTuple

import numpy as np

from .data.dataset import DataError

__all__ = ["EmbeddingError", "embedding_layout", "layout_of", "ids_path", "embedding_files", "EmbeddingWriter",
           "Embeddings", "read_embeddings", "NpyRows", "copy_embeddings", "parquet_fields", "column_of",
           "embedding_sink"]

HEADER = 128  # bytes: magic, version, length and the padded dict (numpy's format 1.0; a multiple of 64)


class EmbeddingError(DataError):
    """Embedding files that are damaged or do not match their predictions (the message names the file)."""


def ids_path(out: str) -> str:
    return out + ".embeddings.ids.jsonl"


def _id_lines(path: str):
    """``([file, id], end offset)`` for every complete line of an ids file (a line cut off ends it)."""
    pos = 0
    with open(path, "rb") as fh:
        for k, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                return
            pos += len(raw)
            try:
                item = json.loads(raw)
            except ValueError:
                item = None
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
                raise EmbeddingError(f"{path}, line {k}: not a [file, id] line (a damaged file; remove it and its "
                                     "predictions to score again)")
            yield item, pos


def _write_ids(fh, pairs) -> None:
    fh.write("".join(json.dumps([str(f), str(i)], ensure_ascii=False) + "\n" for f, i in pairs))


def embedding_files(out: str, layout: list[dict] | None) -> list[str]:
    """The embedding files of ``out`` (ids first), for ``layout``; none without one."""
    return [ids_path(out)] + [out + e["file"] for e in layout] if layout else []


def layout_of(record) -> list[dict] | None:
    """The embedding layout a predictions record (``OUT.meta.json``'s content) holds; None: scored without
    --embeddings, or not a valid layout."""
    layout = record.get("embeddings") if isinstance(record, dict) else None
    ok = isinstance(layout, list) and all(
        isinstance(e, dict) and isinstance(e.get("member"), str) and isinstance(e.get("dim"), int)
        and isinstance(e.get("file"), str) and re.fullmatch(r"\.embeddings\.\d+\.npy", e["file"]) for e in layout)
    return layout if ok and layout else None


def column_of(entry: dict) -> str:
    """A member's embedding column in a Parquet output: ``emb_<member>``."""
    return f"emb_{entry['member']}"


def parquet_fields(layout: list[dict]) -> list:
    """The Parquet output's embedding columns (pyarrow fields): ``emb_<member>``, fixed_size_list<float32>[D]."""
    import pyarrow as pa

    return [pa.field(column_of(e), pa.list_(pa.float32(), e["dim"])) for e in layout]


@contextlib.contextmanager
def embedding_sink(table, writer, layout: list[dict] | None):
    """Where a run's embeddings go, as ``sink(batch, {member: (B, D)})`` called before ``writer.add(batch)``:
    a Parquet ``table``'s columns (``batch.extra``), or a CSV writer's target's files (:class:`EmbeddingWriter`).
    None without a ``layout``."""
    if not layout:
        yield None
    elif table.format == "parquet":
        def put(batch, vectors):
            batch.extra.update({column_of(e): vectors[e["member"]] for e in layout})
        yield put
    else:
        with EmbeddingWriter(writer.target, layout) as emb:
            yield lambda batch, vectors: emb.append([(s.path, s.id) for s in batch.samples], vectors)


def embedding_layout(ens) -> list[dict]:
    """``[{"member", "dim", "file"}]`` for an ensemble's members (the ``embeddings`` entry of the record;
    ``file`` is the suffix after ``OUT``). ValueError for a model without a linear classifier."""
    from .scoring import pooled_layer

    return [{"member": m.name, "dim": int(pooled_layer(m.model).in_features), "file": f".embeddings.{k}.npy"}
            for k, m in enumerate(ens.members)]


class NpyRows:
    """A float32 ``(rows, dim)`` ``.npy`` file that grows in place: :meth:`append` writes the rows, then the
    header's row count (its fixed-size header is rewritten), so the file is a valid ``.npy`` after every
    call. An existing file is checked to be one (float32, ``dim`` columns); bytes after its last counted row
    (an interrupted append) are cut off."""

    def __init__(self, path: str, dim: int):
        self.path, self.dim = path, int(dim)
        self.rows = 0
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            self.rows = _npy_rows(path, self.dim, EmbeddingError)
        self.fh = open(path, "r+b" if os.path.isfile(path) else "w+b")
        end = HEADER + self.rows * self.dim * 4
        self.fh.truncate(end)
        if self.rows == 0:
            self._header()
        self.fh.seek(end)

    def _header(self) -> None:
        body = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({self.rows}, {self.dim}), }}"
        body = body.ljust(HEADER - 11) + "\n"
        self.fh.seek(0)
        self.fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1"))

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype="<f4").reshape(-1, self.dim)
        self.fh.seek(HEADER + self.rows * self.dim * 4)
        self.fh.write(arr.tobytes())
        self.fh.flush()
        self.rows += len(arr)
        self._header()
        self.fh.flush()

    def truncate(self, rows: int) -> None:
        self.rows = min(self.rows, int(rows))
        self.fh.truncate(HEADER + self.rows * self.dim * 4)
        self._header()
        self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            self.fh = None


def _npy_rows(path: str, dim: int | None, error) -> int:
    """The rows of the float32 2-D ``.npy`` at ``path`` (``dim`` columns when given); ``error(message)`` naming
    the file when it is not one, or holds fewer bytes than its header says."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version != (1, 0):
                raise ValueError(f"format version {version}")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            start = fh.tell()
    except (OSError, ValueError) as exc:
        raise error(f"{path}: not an embeddings .npy written by dali_lens.predict ({exc}); remove it (and the "
                    "predictions) to score again") from None
    if dtype != np.dtype("<f4") or fortran or len(shape) != 2 or (dim is not None and shape[1] != dim):
        raise error(f"{path}: holds {dtype} {shape}, not float32 (n, {dim or 'D'}) embeddings; remove it to score again")
    if os.path.getsize(path) < start + shape[0] * shape[1] * 4:
        raise error(f"{path}: shorter than its header says ({shape[0]} rows): a damaged file; remove it to score again")
    return int(shape[0])


class EmbeddingWriter:
    """The embedding files of one output ``out`` (its ``layout``: :func:`embedding_layout`), opened for
    appending in step with its CSV rows."""

    def __init__(self, out: str, layout: list[dict]):
        self.out, self.layout = out, layout
        self.vectors = [NpyRows(out + e["file"], e["dim"]) for e in layout]
        self.ids = open(ids_path(out), "a", encoding="utf-8", newline="")

    def reconcile(self, files: list[str]) -> int:
        """Cut the vectors and ids back to the CSV's rows (``files``: the scored files of its rows, in order);
        returns the rows cut. EmbeddingError when they hold fewer rows than the CSV or other files (written
        without --embeddings, or another run's)."""
        self.ids.flush()
        lines = list(_id_lines(ids_path(self.out)))
        have = min([len(lines)] + [v.rows for v in self.vectors])
        if have < len(files) or [item[0] for item, _ in lines[:len(files)]] != list(files):
            raise EmbeddingError(f"{self.out}: its embeddings ({ids_path(self.out)}: {have} rows) do not match its "
                                 f"{len(files)} rows (written without --embeddings?); choose another --out, or "
                                 "remove the output and its embedding files to score again")
        cut = len(lines) - len(files)
        if cut or any(v.rows != len(files) for v in self.vectors) or os.path.getsize(ids_path(self.out)) != (
                lines[len(files) - 1][1] if files else 0):
            self.ids.close()
            os.truncate(ids_path(self.out), lines[len(files) - 1][1] if files else 0)
            self.ids = open(ids_path(self.out), "a", encoding="utf-8", newline="")
            for v in self.vectors:
                v.truncate(len(files))
        return cut

    def append(self, pairs, vectors: dict[str, np.ndarray]) -> None:
        """One batch: ``pairs`` the (file, id) of its rows, the vectors ``{member: (B, D)}``. Call before
        writing the rows to the CSV."""
        for e, v in zip(self.layout, self.vectors):
            v.append(vectors[e["member"]])
        _write_ids(self.ids, pairs)
        self.ids.flush()

    def close(self) -> None:
        for v in self.vectors:
            v.close()
        if not self.ids.closed:
            self.ids.flush()
            os.fsync(self.ids.fileno())
            self.ids.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Embeddings(NamedTuple):
    """What :func:`read_embeddings` returns: the rows' files and ids, and each member's vectors (memory-mapped)."""

    files: list[str]
    ids: list[str]
    vectors: dict[str, np.ndarray]


def read_embeddings(out: str, layout: list[dict]) -> Embeddings:
    """The embeddings beside the predictions ``out`` (``layout``: its record's ``embeddings``, ``layout_of``);
    EmbeddingError naming the file when one is missing or damaged."""
    path = ids_path(out)
    if not os.path.isfile(path):
        raise EmbeddingError(f"{path}: not found (score with predict --embeddings)")
    rows = [item for item, _ in _id_lines(path)]
    vectors = {}
    for e in layout:
        vpath = out + e["file"]
        if not os.path.isfile(vpath):
            raise EmbeddingError(f"{vpath}: not found (member {e['member']!r}'s embeddings)")
        n = _npy_rows(vpath, e["dim"], EmbeddingError)
        if n < len(rows):
            raise EmbeddingError(f"{vpath}: {n} rows, but {path} lists {len(rows)}")
        vectors[e["member"]] = np.load(vpath, mmap_mode="r")[:len(rows)]
    return Embeddings([r[0] for r in rows], [r[1] for r in rows], vectors)


class copy_embeddings:
    """The embeddings of a merge (``predictions.copy_rows``): for each source the vectors of the rows kept, in
    order, into temporary files that :meth:`commit` renames to ``out``'s (:meth:`discard` removes them)."""

    def __init__(self, out: str, layout: list[dict]):
        self.out, self.layout = out, layout
        self.tmp = f"{os.path.join(os.path.dirname(out), '.' + os.path.basename(out))}.merging-{os.getpid()}"
        self.writer = EmbeddingWriter(self.tmp, layout)

    def source(self, src: str, files: list[str], kept) -> None:
        """Copy the vectors of ``src``'s rows at positions ``kept`` (``files``: its ids, checked against the
        rows it holds)."""
        if not files:  # no rows (e.g. a part file holding only its header): nothing to copy, nothing to read
            return
        emb = read_embeddings(src, self.layout)
        if emb.files[:len(files)] != files:
            raise EmbeddingError(f"{ids_path(src)}: its rows do not match {src}'s (damaged?); nothing was merged")
        kept = np.asarray(kept, dtype=np.int64)
        _write_ids(self.writer.ids, [(emb.files[j], emb.ids[j]) for j in kept])
        for e, v in zip(self.layout, self.writer.vectors):
            for lo in range(0, len(kept), 65536):
                v.append(emb.vectors[e["member"]][kept[lo:lo + 65536]])

    def commit(self) -> None:
        self.writer.close()
        for a, b in zip(embedding_files(self.tmp, self.layout), embedding_files(self.out, self.layout)):
            os.replace(a, b)

    def discard(self) -> None:
        self.writer.close()
        for a in embedding_files(self.tmp, self.layout):
            if os.path.exists(a):
                os.unlink(a)
