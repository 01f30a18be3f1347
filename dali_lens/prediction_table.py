"""Where ``predict``'s rows go: one small interface, a CSV and a Parquet implementation.

:func:`open_table` picks the format by ``--out``'s extension (``.parquet``: Parquet; anything else: CSV, the
default). Both tables do the same few things for the run in ``predictions.py``:

- ``check(now) -> bool``: read-only. Refuses (PredictError) an existing output this run may not append to
  (not ours, other columns, another model or other options: ``now`` is ``predictions.provenance(...)``);
  returns whether a record must be written;
- ``prepare(now, record, say)``: rank 0 only: write the record, repair what an interruption left;
- ``done_files() -> set[str]``: the files already scored (resume: only the missing rows are appended);
- ``writer(rank, world, tag=None)``: a context manager whose ``add(ScoredBatch)`` appends rows; leaving it (also
  on an exception) makes what was added durable;
- ``pending_parts()`` / ``merge()``: per-rank part files still to merge (CSV under torchrun; Parquet has none);
- ``rows() -> int``: the rows the output holds.

CSV: ``OUT`` plus the record ``OUT.meta.json`` (``predictions.py``'s functions: header check, repair, parts).

Parquet: ``OUT`` is a folder of part files ``OUT/part-00000.parquet``, ``part-00001.parquet``, ... that
``pyarrow.dataset.dataset(OUT)`` and ``pandas.read_parquet(OUT)`` read as one table. A Parquet file cannot be
appended to, so rows are buffered and written as a new part every :data:`ROWS_PER_PART` rows (or
:data:`SECONDS_PER_PART` seconds, and when the run ends or is interrupted), each through a temporary file
renamed into place: a part is complete or absent. The record is in every part itself, in its schema metadata
under ``dali_lens`` (written_by, dali-lens version, the provenance: checkpoints' sha256, fusion, TTA, HDUs, DATA;
the part's rows and its score histogram), so there is no side file; a folder is ours when it holds nothing
but such parts (and our temporary files, which readers skip: their names start with a dot).

Columns: ``file, id, label, score`` (string, string, int64 with nulls for unlabelled, float64), with several
members ``score_<member>`` and ``member_std`` (float64), then every catalogue column of the data
(``Sample.meta``: extra manifest columns, ``classifications.csv``'s), typed by :func:`catalogue_columns`; a
catalogue column named like one of ours is written as ``cat_<name>`` (logged), never over ours.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ScoredBatch", "CatalogueColumn", "catalogue_columns", "open_table", "is_parquet", "CsvTable",
           "ParquetTable", "TopTable", "read_table", "HIST_BINS", "score_histogram", "histogram", "top_rows",
           "merge_top", "merge_output", "part_meta", "live_parts"]

#: rows buffered before a Parquet part is written (an interruption loses at most the rows not yet in a part;
#: Ctrl-C and SIGTERM write them first)
ROWS_PER_PART = 65536
#: ... or seconds since the last part, whichever comes first (slow models lose at most this much work)
SECONDS_PER_PART = 60.0
#: the score histogram's bins: HIST_BINS equal bins over [0, 1] (mergeable by summing the counts)
HIST_BINS = 1000
META_KEY = b"dali_lens"
PART_RE = re.compile(r"part-(\d{5,})(?:-([A-Za-z0-9]+))?\.parquet$")
CAT_PREFIX = "cat_"


def _error(msg: str):
    from .prediction_csv import PredictError

    return PredictError(msg)


@dataclass
class ScoredBatch:
    """One scored batch, as every table's writer takes it."""

    samples: list                       # data.dataset.Sample, one per row
    score: np.ndarray                   # (B,) the ensemble's lens probability
    members: dict = field(default_factory=dict)   # {member name: (B,) probability}, several members only
    spread: np.ndarray | None = None    # (B,) std of the member probabilities, several members only
    positions: np.ndarray | None = None  # (B,) the rows' positions in the run's dataset
    extra: dict = field(default_factory=dict)     # more columns {name: (B,) or (B, D) array} (Parquet)


def is_parquet(path: str) -> bool:
    """Whether ``--out`` names a Parquet output (by its extension, ``.parquet``)."""
    return str(path).rstrip("/\\").lower().endswith(".parquet")


# ---------------------------------------------------------------------------------------------------------
# catalogue columns


@dataclass(frozen=True)
class CatalogueColumn:
    """A catalogue column of the output: its ``name`` in the table, its ``key`` in ``Sample.meta`` and its
    Arrow ``type`` (``int64``, ``float64`` or ``string``)."""

    name: str
    key: str
    type: str


_INT64 = (-(2 ** 63), 2 ** 63 - 1)


def catalogue_columns(samples, taken, say=None) -> list[CatalogueColumn]:
    """The catalogue columns of ``samples`` (every key of their ``meta``, in first-seen order), each typed:
    ``int64`` when every value is an integer in range, ``float64`` when every value is a number, else
    ``string``. A key in ``taken`` (our own columns) or starting with ``score_`` is renamed ``cat_<key>`` (then
    ``cat_cat_<key>`` ...), told through ``say``."""
    kinds: dict[str, set] = {}
    has_meta = getattr(samples, "has_meta", None)  # a packed listing knows when none of its samples has any
    for s in (samples if has_meta is None or has_meta() else ()):
        meta = s.meta
        if not meta:
            continue
        for k, v in meta.items():
            got = kinds.get(k)
            if got is None:
                got = kinds[k] = set()
            if isinstance(v, bool) or isinstance(v, str):
                got.add(str)
            elif isinstance(v, int):
                got.add(int if _INT64[0] <= v <= _INT64[1] else str)
            else:
                got.add(float)
    used = set(taken)
    out = []
    for k, types in kinds.items():
        kind = "string" if str in types else "float64" if float in types else "int64"
        name = k
        while name in used or name.startswith("score_"):
            name = CAT_PREFIX + name
        if name != k and say is not None:
            say(f"note: catalogue column {k!r} is written as {name!r} (its name is one of predict's own columns)")
        used.add(name)
        out.append(CatalogueColumn(name, k, kind))
    return out


def score_histogram(score) -> np.ndarray:
    """Counts of ``score`` in :data:`HIST_BINS` equal bins over [0, 1] (the last bin includes 1)."""
    counts, _ = np.histogram(np.asarray(score, dtype=np.float64), bins=HIST_BINS, range=(0.0, 1.0))
    return counts.astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# CSV


class CsvTable:
    """The predictions CSV ``path`` (``predictions.py``'s header, record, repair and parts)."""

    format = "csv"

    def __init__(self, path: str, header: list[str]):
        self.path, self.header = path, header

    def check(self, now: dict) -> bool:
        from . import prediction_csv as P

        for p in [self.path] + P.find_parts(self.path):
            P.check_own(p, self.header)
        return P.check_provenance(self.path, now, self.header)

    def prepare(self, now: dict, record: bool, say) -> None:
        from . import prediction_csv as P
        from .data.io import atomic_write_json

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if record:
            atomic_write_json(P.provenance_path(self.path), now)
        for p in [self.path] + P.find_parts(self.path):
            cut = P.repair(p)
            if cut:
                say(f"{p}: removed a truncated last line ({cut} bytes) left by an interruption")

    def done_files(self) -> set[str]:
        from . import prediction_csv as P

        return P.done_files([self.path] + P.find_parts(self.path), self.header)

    def pending_parts(self) -> list[str]:
        from . import prediction_csv as P

        return P.find_parts(self.path)

    def merge(self) -> tuple[int, int]:
        from . import prediction_csv as P

        return P.merge(self.path, self.header)

    def rows(self) -> int:
        from . import prediction_csv as P

        return sum(1 for f, _ in P.iter_rows(self.path, self.header) if f) if os.path.isfile(self.path) else 0

    def writer(self, rank: int = 0, world: int = 1, tag: str | None = None) -> "_CsvWriter":
        from . import prediction_csv as P

        return _CsvWriter(self.path if world == 1 and tag is None else P.part_path(self.path, rank, world),
                          self.header)


class _CsvWriter:
    def __init__(self, target: str, header: list[str]):
        self.target, self.header, self.written = target, header, 0

    def __enter__(self):
        from .data.io import write_csv_rows

        new = not os.path.isfile(self.target) or os.path.getsize(self.target) == 0
        self.fh = open(self.target, "a", encoding="utf-8", newline="")
        if new:
            write_csv_rows(self.fh, [self.header])
            self.fh.flush()
        return self

    def add(self, batch: ScoredBatch) -> None:
        from .data.io import write_csv_rows
        from .prediction_rows import prediction_row

        names = list(batch.members)
        rows = [prediction_row(s.path, s.id, s.label, batch.score[j], [batch.members[k][j] for k in names],
                               batch.spread[j] if names else None)
                for j, s in enumerate(batch.samples)]
        write_csv_rows(self.fh, rows)
        self.fh.flush()
        self.written += len(rows)

    def __exit__(self, *exc) -> None:
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
        finally:
            self.fh.close()


# ---------------------------------------------------------------------------------------------------------
# Parquet


def _pa():
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa, pq


class ParquetTable:
    """The Parquet output folder ``path`` (see the module docstring)."""

    format = "parquet"

    def __init__(self, path: str, header: list[str], catalogue: list[CatalogueColumn] = (),
                 extra_fields: list = ()):
        pa, _ = _pa()
        self.path, self.header, self.catalogue = path, header, list(catalogue)
        fields = []
        for c in header:
            kind = pa.string() if c in ("file", "id") else pa.int64() if c == "label" else pa.float64()
            fields.append(pa.field(c, kind))
        fields += [pa.field(c.name, getattr(pa, c.type)()) for c in self.catalogue]
        fields += list(extra_fields)
        self.schema = pa.schema(fields)
        self.now: dict | None = None
        pa.array([0])  # pyarrow imports pandas (when installed) on its first array: at start-up, not mid-run
        self.top: int | None = None  # TopTable: K

    # -- the parts

    def parts(self) -> list[str]:
        """The complete part files of the output, in name order."""
        if not os.path.isdir(self.path):
            return []
        return [os.path.join(self.path, n) for n in sorted(os.listdir(self.path)) if PART_RE.match(n)]

    def _meta(self, part: str) -> tuple[dict, object]:
        return part_meta(part)

    def check(self, now: dict) -> bool:
        from .prediction_csv import _differences

        self.now = now
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            raise _error(f"{self.path}: exists and is not a folder of Parquet parts written by dali_lens.predict "
                         "(predict writes OUT.parquet as a folder of part files); it is left untouched: choose "
                         "another --out")
        if not os.path.isdir(self.path):
            return True
        for name in sorted(os.listdir(self.path)):
            if not (PART_RE.match(name) or (name.startswith(".part-") and name.endswith(".tmp"))):
                raise _error(f"{self.path}: holds {name!r}, which dali_lens.predict did not write (it writes only "
                             "part-*.parquet there); it is left untouched: choose another --out")
        for part in self.parts():
            meta, schema = self._meta(part)
            if meta.get("top") != self.top:
                def what(k):
                    return f"--top {k}" if k else "every row (no --top)"

                raise _error(f"{part}: holds {what(meta.get('top'))}, this run asks for {what(self.top)}; it is "
                             "left untouched: choose another --out")
            diffs = _differences(meta.get("provenance") or {}, now)
            if diffs:
                raise _error(f"{self.path}: its rows were written by another model or with other options ("
                             + "; ".join(diffs) + f"); nothing was changed: choose another --out, or remove "
                             f"{self.path} to score again")
            if not schema.remove_metadata().equals(self.schema):
                raise _error(f"{part}: its columns {schema.names} differ from this run's {self.schema.names} "
                             "(other checkpoints, or other catalogue columns in DATA?); it is left untouched: "
                             "choose another --out")
        return False

    def prepare(self, now: dict, record: bool, say) -> None:
        self.now = now
        os.makedirs(self.path, exist_ok=True)

    def done_files(self) -> set[str]:
        _, pq = _pa()
        done: set[str] = set()
        for part in self.parts():
            done.update(f for f in pq.read_table(part, columns=["file"]).column(0).to_pylist() if f)
        return done

    def pending_parts(self) -> list[str]:
        return []

    def merge(self) -> tuple[int, int]:
        return self.rows(), 0

    def rows(self) -> int:
        _, pq = _pa()
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts())

    def histogram(self) -> np.ndarray:
        """The score histogram of every row scored into the output (the parts' counts summed)."""
        return histogram(self.path)

    def writer(self, rank: int = 0, world: int = 1, tag: str | None = None) -> "_ParquetWriter":
        return _ParquetWriter(self, _tag(rank, world, tag))

    # -- writing a part

    def write_part(self, table, tag: str | None = None, extra_meta: dict | None = None) -> str:
        """Write ``table`` (this schema) as the next part file, atomically; returns its path."""
        _, pq = _pa()
        from ._version import __version__
        from .data.io import atomic_open

        nums = [int(m.group(1)) for m in map(PART_RE.match, os.listdir(self.path)) if m]
        name = f"part-{max(nums, default=-1) + 1:05d}" + (f"-{tag}" if tag else "") + ".parquet"
        meta = {"written_by": "dali_lens.predict", "version": __version__, "provenance": self.now,
                "top": self.top, "rows": table.num_rows,
                "histogram": score_histogram(table.column("score").to_numpy(zero_copy_only=False)).tolist()}
        meta.update(extra_meta or {})
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, separators=(",", ":")).encode()})
        path = os.path.join(self.path, name)  # unique: each rank (or shard) writes names with its own tag
        with atomic_open(path, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
        return path


class _Utf8:
    """A string column's rows laid out as Arrow lays them out: int32 offsets and UTF-8 bytes, in buffers allocated
    once (the bytes grown, by doubling, when a batch's do not fit)."""

    def __init__(self, size: int):
        self.offsets = np.zeros(size + 1, dtype=np.int32)
        self.data = np.empty(64 * max(size, 1), dtype=np.uint8)

    def put(self, at: int, strings: list[str]) -> None:
        """Set rows ``at``.. to ``strings`` (UnicodeEncodeError for a lone surrogate, as ``pyarrow.array``)."""
        enc = [v.encode("utf-8") for v in strings]
        start = int(self.offsets[at])
        ends = start + np.cumsum(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)))
        end = int(ends[-1]) if len(enc) else start
        if end >= 2 ** 31:
            raise ValueError(f"a Parquet part's strings exceed 2 GiB at row {at + len(enc)}")
        if end > len(self.data):
            grown = np.empty(max(2 * len(self.data), end), dtype=np.uint8)
            grown[:start] = self.data[:start]
            self.data = grown
        self.data[start:end] = np.frombuffer(b"".join(enc), dtype=np.uint8)
        self.offsets[at + 1:at + 1 + len(enc)] = ends

    def array(self, n: int):
        """Rows ``:n`` as a ``pyarrow`` string array, in buffers of its own."""
        pa, _ = _pa()
        end = int(self.offsets[n])
        return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(self.offsets[:n + 1].copy()),
                                                      pa.py_buffer(self.data[:end].copy())])


class _Rows:
    """A buffer of up to ``size`` rows of ``table``'s columns, allocated once, filled batch by batch (:meth:`add`)
    and read out as one Arrow record batch (:meth:`batch`, then :meth:`clear`): numpy arrays for the numbers and
    the embeddings, Arrow's own layout for ``file`` and ``id`` (:class:`_Utf8`), lists of the values for the
    catalogue columns.

    The rows used to wait as one small record batch per scored batch: those Arrow objects (C++ objects from the
    process heap, a few per column and batch) lived for a whole part among the model's and the loader's
    short-lived buffers and held the heap up (1 M packed cutouts, one run each: peak RSS 1,249 MB with them,
    1,147 MB with this buffer; ``benchmarks/bench_predict_parquet.py``, README "Parquet")."""

    def __init__(self, table: "ParquetTable", size: int):
        self.table, self.size, self.n = table, int(size), 0
        self.cols: dict[str, object] = {}
        catalogue = {c.name for c in table.catalogue}
        for f in table.schema:
            if f.name in ("file", "id"):
                self.cols[f.name] = _Utf8(self.size)
            elif f.name in catalogue:
                self.cols[f.name] = [None] * self.size
            elif f.name == "label":
                self.cols[f.name] = np.zeros(self.size, dtype=np.int64)
            elif f.name in table.header:
                self.cols[f.name] = np.zeros(self.size, dtype=np.float64)
            else:
                self.cols[f.name] = None  # an extra column (embeddings): allocated by its first batch
        self.labelled = np.zeros(self.size, dtype=bool)

    def room(self) -> int:
        return self.size - self.n

    def add(self, b: ScoredBatch, start: int = 0, stop: int | None = None) -> None:
        """Append rows ``start:stop`` of ``b`` (at most :meth:`room`)."""
        stop = len(b.samples) if stop is None else stop
        a, z = self.n, self.n + (stop - start)
        if z > self.size:
            raise ValueError(f"{z - a} rows do not fit the {self.room()} left")
        samples = b.samples[start:stop]
        c = self.cols
        c["file"].put(a, [x.path for x in samples])
        c["id"].put(a, [x.id for x in samples])
        labels = np.array([-1 if x.label is None else int(x.label) for x in samples], dtype=np.int64)
        c["label"][a:z] = labels
        self.labelled[a:z] = labels >= 0
        c["score"][a:z] = np.asarray(b.score, dtype=np.float64)[start:stop]
        if b.members:
            for name, v in b.members.items():
                c[f"score_{name}"][a:z] = np.asarray(v, dtype=np.float64)[start:stop]
            c["member_std"][a:z] = np.asarray(b.spread, dtype=np.float64)[start:stop]
        for col in self.table.catalogue:
            vals = [x.meta.get(col.key) if x.meta else None for x in samples]
            if col.type == "string":
                vals = [v if v is None or isinstance(v, str) else str(v) for v in vals]
            c[col.name][a:z] = vals
        for name, v in b.extra.items():
            v = np.asarray(v)
            if c[name] is None:
                f = self.table.schema.field(name)
                kind = f.type.value_type if hasattr(f.type, "value_type") else f.type
                c[name] = np.zeros((self.size,) + v.shape[1:], dtype=kind.to_pandas_dtype())
            c[name][a:z] = v[start:stop]
        self.n = z

    def batch(self):
        """The rows as an Arrow record batch of the table's schema, in buffers of its own (the buffer may be
        refilled while it lives: a ``--top`` writer keeps its best rows)."""
        pa, _ = _pa()
        n, out = self.n, []
        for f in self.table.schema:
            v = self.cols[f.name]
            if isinstance(v, _Utf8):
                arr = v.array(n)
            elif isinstance(v, list):
                arr = pa.array(v[:n], type=f.type)
            elif v is None:
                arr = pa.nulls(n, type=f.type)
            elif f.name == "label":
                arr = pa.array(v[:n].copy(), type=f.type, mask=~self.labelled[:n])
            elif v.ndim == 2:
                arr = pa.FixedSizeListArray.from_arrays(pa.array(v[:n].reshape(-1).copy(), type=f.type.value_type),
                                                        v.shape[1])
            else:
                arr = pa.array(v[:n].copy(), type=f.type)
            out.append(arr)
        return pa.record_batch(out, schema=self.table.schema)

    def as_table(self):
        """The rows as a ``pyarrow.Table`` (:meth:`batch`)."""
        pa, _ = _pa()
        return pa.Table.from_batches([self.batch()], self.table.schema)

    def clear(self) -> None:
        """Empty the buffer (its catalogue values go now, not when overwritten)."""
        for v in self.cols.values():
            if isinstance(v, list):
                v[:self.n] = [None] * self.n
        self.n = 0


class _ParquetWriter:
    def __init__(self, table: ParquetTable, tag: str | None):
        self.table, self.tag, self.written = table, tag, 0
        self.rows: _Rows | None = None
        self.last = time.monotonic()

    def buffer_rows(self) -> int:
        """The rows the buffer holds (a part)."""
        return ROWS_PER_PART

    def __enter__(self):
        os.makedirs(self.table.path, exist_ok=True)
        self.rows = _Rows(self.table, self.buffer_rows())
        return self

    def _put(self, batch: ScoredBatch, full) -> None:
        """Every row of ``batch`` into the buffer, ``full()`` called each time the buffer is full (it empties it)."""
        n, at = len(batch.samples), 0
        while at < n:
            k = min(self.rows.room(), n - at)
            self.rows.add(batch, at, at + k)
            at += k
            if not self.rows.room():
                full()

    def add(self, batch: ScoredBatch) -> None:
        self._put(batch, self.flush)
        self.written += len(batch.samples)
        if time.monotonic() - self.last >= SECONDS_PER_PART:
            self.flush()

    def flush(self) -> None:
        if not self.rows.n:
            return
        self.table.write_part(self.rows.as_table(), self.tag)
        self.rows.clear()
        self.last = time.monotonic()

    def __exit__(self, *exc) -> None:
        self.flush()  # on Ctrl-C/SIGTERM too: the rows scored so far become a part


def _tag(rank: int, world: int, tag: str | None) -> str | None:
    return tag if tag is not None else (f"{rank}of{world}" if world > 1 else None)


# ---------------------------------------------------------------------------------------------------------
# --top K


#: a --top run writes its part (the K best rows so far, replacing its previous part) every this many rows
TOP_ROWS_PER_PART = 1 << 20


def top_rows(table, k: int):
    """The ``k`` best rows of ``table`` by score (highest first; ties by file name), as a table."""
    import pyarrow.compute as pc

    if table.num_rows <= k:
        order = pc.sort_indices(table, sort_keys=[("score", "descending"), ("file", "ascending")])
        return table.take(order)
    keep = pc.select_k_unstable(table, k, sort_keys=[("score", "descending"), ("file", "ascending")])
    sub = table.take(keep)
    return sub.take(pc.sort_indices(sub, sort_keys=[("score", "descending"), ("file", "ascending")]))


def _path_hash(path: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(path.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _ranges(positions) -> list[list[int]]:
    """``positions`` as ``[start, stop)`` runs (in the order given)."""
    p = np.asarray(positions, dtype=np.int64)
    if p.size == 0:
        return []
    return [[int(r[0]), int(r[-1]) + 1] for r in np.split(p, np.flatnonzero(np.diff(p) != 1) + 1)]


def _add_ranges(into: list[list[int]], new: list[list[int]]) -> None:
    for a, b in new:
        if into and into[-1][1] == a:
            into[-1][1] = b
        else:
            into.append([a, b])


class TopTable(ParquetTable):
    """A ``--top K`` Parquet output: the folder holds the ``K`` best rows of every cutout scored into it.

    Each writer keeps a bounded heap (at most ``K`` rows plus one buffer) and writes it as a part every
    :data:`TOP_ROWS_PER_PART` rows (or :data:`SECONDS_PER_PART` s), the new part replacing its previous one (its
    metadata names it under ``replaces``); when the run ends, the live parts (one per rank, or one from an
    earlier run) are merged into one (:func:`merge_top`). A part's metadata also records how many cutouts it
    stands for (``scored``), their score histogram, and which cutouts they are for resuming: their positions in
    the run's DATA as ``[start, stop)`` runs (``covers``) and a checksum of their file names (``covers_sum``),
    checked against DATA on resume (another DATA is refused).
    """

    def __init__(self, path: str, header: list[str], catalogue, k: int, samples, extra_fields: list = ()):
        super().__init__(path, header, catalogue, extra_fields)
        self.top, self.samples = int(k), samples

    def _live(self) -> tuple[list[str], list[str]]:
        return live_parts(self.path)

    def parts(self) -> list[str]:
        return self._live()[0]

    def prepare(self, now: dict, record: bool, say) -> None:
        super().prepare(now, record, say)
        for p in self._live()[1]:  # written and replaced by this command (their successor's record says so)
            os.unlink(p)

    def done_files(self) -> set[str]:
        done: set[str] = set()
        n = len(self.samples)
        for part in self.parts():
            meta = self._meta(part)[0]
            total, paths = 0, []
            for a, b in meta.get("covers") or ():
                if not (0 <= a < b <= n):
                    paths = None
                    break
                paths.extend(self.samples[i].path for i in range(a, b))
            if paths is not None:
                total = sum(map(_path_hash, paths)) % (1 << 64)
            if paths is None or total != meta.get("covers_sum"):
                raise _error(f"{part}: its record of the cutouts it stands for does not match this DATA (the top "
                             f"{self.top} were scored over other data); it is left untouched: choose another --out")
            done.update(paths)
        return done

    def pending_parts(self) -> list[str]:
        live = self.parts()
        return live if len(live) > 1 else []

    def merge(self) -> tuple[int, int]:
        """Merge the live parts into one part (the K best of them all); returns (rows, parts merged)."""
        live = self.parts()
        if len(live) < 2:
            return self.rows(), 0
        table = merge_top(live, self.top)
        meta = json.loads(table.schema.metadata[META_KEY])
        meta["replaces"] = [os.path.basename(p) for p in live]
        self.write_part(table.replace_schema_metadata(None), extra_meta={
            k: meta[k] for k in ("provenance", "scored", "histogram", "covers", "covers_sum", "replaces")})
        for p in live:
            os.unlink(p)
        return table.num_rows, len(live)

    def writer(self, rank: int = 0, world: int = 1, tag: str | None = None) -> "_TopWriter":
        return _TopWriter(self, _tag(rank, world, tag))


class _TopWriter(_ParquetWriter):
    def __init__(self, table: TopTable, tag: str | None):
        super().__init__(table, tag)
        self.best = None
        self.hist = np.zeros(HIST_BINS, dtype=np.int64)
        self.covers: list[list[int]] = []
        self.covers_sum, self.since, self.prev = 0, 0, None

    def buffer_rows(self) -> int:
        """K rows and more between prunes (each sorts K + the buffer), never more than DATA holds."""
        return max(1, min(max(self.table.top, ROWS_PER_PART), len(self.table.samples)))

    def add(self, batch: ScoredBatch) -> None:
        if batch.positions is None:
            raise ValueError("a --top table needs the rows' positions in the run's DATA")
        hist, runs = score_histogram(batch.score), _ranges(batch.positions)
        total = (self.covers_sum + sum(_path_hash(s.path) for s in batch.samples)) % (1 << 64)
        # the rows first, then what they stand for (an interruption between: rescored, not lost)
        self._put(batch, self._prune)
        self.hist += hist
        _add_ranges(self.covers, runs)
        self.covers_sum = total
        self.written += len(batch.samples)
        self.since += len(batch.samples)
        if self.since >= TOP_ROWS_PER_PART or time.monotonic() - self.last >= SECONDS_PER_PART:
            self.flush()

    def _prune(self) -> None:
        """The best rows so far: the K best of the previous ones and the buffer's (emptied once they are kept)."""
        pa, _ = _pa()
        parts = ([self.best] if self.best is not None else []) + [self.rows.as_table()]
        self.best = top_rows(pa.concat_tables(parts), self.table.top)
        self.rows.clear()

    def flush(self) -> None:
        if not self.since:
            return
        self._prune()
        path = self.table.write_part(self.best, self.tag, extra_meta={
            "scored": int(self.hist.sum()), "histogram": self.hist.tolist(), "covers": self.covers,
            "covers_sum": self.covers_sum, "replaces": [os.path.basename(self.prev)] if self.prev else []})
        if self.prev:
            os.unlink(self.prev)
        self.prev, self.since, self.last = path, 0, time.monotonic()


def merge_top(sources: list[str], k: int | None = None):
    """The ``k`` best rows of several ``--top`` outputs or their parts (folders or files; e.g. the per-part
    outputs of a job array) as one ``pyarrow.Table`` sorted by score, whose schema metadata (``dali_lens``)
    holds ``top`` (``k``, default: the largest of theirs), ``scored`` and ``histogram`` summed, and ``covers``
    and ``covers_sum`` joined (meaningful when they were scored over the same DATA, as a run's own parts are).
    A file in several sources is kept once (its best row); ``scored`` and the histogram then count it twice.
    Raises PredictError for a source that is not a ``--top`` output of dali_lens.predict or whose columns differ."""
    pa, pq = _pa()
    tables, metas = [], []
    for src in sources:
        for f in [src] if os.path.isfile(src) else live_parts(src)[0]:
            meta, schema = part_meta(f)
            if not meta.get("top"):
                raise _error(f"{f}: not a --top output of dali_lens.predict (its record has no 'top')")
            if tables and not schema.remove_metadata().equals(tables[0].schema.remove_metadata()):
                raise _error(f"{f}: its columns {schema.names} differ from {tables[0].schema.names}")
            tables.append(pq.read_table(f))
            metas.append(meta)
    if not tables:
        raise _error(f"{', '.join(sources)}: no --top parts to merge")
    k = int(k or max(m["top"] for m in metas))
    import pyarrow.compute as pc

    rows = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    rows = rows.take(pc.sort_indices(rows, sort_keys=[("score", "descending"), ("file", "ascending")]))
    keep, seen = [], set()
    for i, f in enumerate(rows.column("file").to_pylist()):  # a file in several sources: its best row, once
        if f not in seen:
            seen.add(f)
            keep.append(i)
            if len(keep) == k:
                break
    best = rows.take(keep)
    covers: list[list[int]] = []
    for m in metas:
        covers += m.get("covers") or []
    out = dict(metas[0], top=k, rows=best.num_rows, scored=sum(int(m.get("scored") or 0) for m in metas),
               histogram=np.sum([np.asarray(m["histogram"], dtype=np.int64) for m in metas], axis=0).tolist(),
               covers=covers, covers_sum=sum(int(m.get("covers_sum") or 0) for m in metas) % (1 << 64))
    out.pop("replaces", None)
    return best.replace_schema_metadata({META_KEY: json.dumps(out, separators=(",", ":")).encode()})


def part_meta(part: str) -> tuple[dict, object]:
    """``(the dali_lens record, the schema)`` of a Parquet part written by predict; PredictError otherwise."""
    _, pq = _pa()
    try:
        schema = pq.read_schema(part)
    except (OSError, ValueError) as exc:
        raise _error(f"{part}: not a readable Parquet file ({str(exc).splitlines()[0]}); it is left untouched: "
                     "choose another --out") from None
    try:
        meta = json.loads((schema.metadata or {}).get(META_KEY, b"null"))
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or meta.get("written_by") != "dali_lens.predict":
        raise _error(f"{part}: a Parquet file not written by dali_lens.predict (no dali_lens record in its schema "
                     "metadata); it is left untouched: choose another --out")
    return meta, schema


def live_parts(path: str) -> tuple[list[str], list[str]]:
    """``(live parts, superseded parts)`` of the Parquet output folder ``path``: a part named in another's
    ``replaces`` record (a ``--top`` writer's earlier heap) is superseded."""
    if not os.path.isdir(path):
        return [], []
    parts = [os.path.join(path, n) for n in sorted(os.listdir(path)) if PART_RE.match(n)]
    gone: set[str] = set()
    for p in parts:
        gone.update(part_meta(p)[0].get("replaces") or ())
    return [p for p in parts if os.path.basename(p) not in gone], [p for p in parts if os.path.basename(p) in gone]


def merge_output(path: str) -> tuple[int, int]:
    """``predict --merge`` for a Parquet output: a ``--top`` folder's live parts merged into one (a plain folder
    of parts is one table already); returns (rows, parts merged). PredictError when ``path`` holds no parts."""
    live = live_parts(path)[0] if os.path.isdir(path) else []
    if not live:
        raise _error(f"{path}: no Parquet parts written by dali_lens.predict to merge")
    tops = {part_meta(p)[0].get("top") for p in live}
    if tops == {None}:
        _, pq = _pa()
        return sum(pq.ParquetFile(p).metadata.num_rows for p in live), 0
    table = TopTable.__new__(TopTable)
    table.path, table.top, table.now = path, max(k for k in tops if k), None
    return table.merge()


def histogram(path: str) -> np.ndarray:
    """The score histogram (:data:`HIST_BINS` counts over [0, 1]) of every cutout scored into the Parquet
    output ``path`` (a folder of parts or one file; a ``--top`` output's counts include the rows not kept)."""
    total = np.zeros(HIST_BINS, dtype=np.int64)
    for f in [path] if os.path.isfile(path) else live_parts(path)[0]:
        total += np.asarray(part_meta(f)[0].get("histogram") or 0, dtype=np.int64)
    return total


def open_table(path: str, header: list[str], samples=(), say=None, extra_fields: list = (), top: int | None = None):
    """The output table for ``--out path``: Parquet (with the catalogue columns of ``samples``) for a
    ``.parquet`` path (a :class:`TopTable` with ``top``), else CSV (``top`` needs Parquet: PredictError)."""
    if is_parquet(path):
        cat = catalogue_columns(samples, list(header) + [f.name for f in extra_fields], say)
        if top:
            return TopTable(path, header, cat, top, samples, extra_fields)
        return ParquetTable(path, header, cat, extra_fields)
    if top:
        raise _error(f"--top {top}: needs a Parquet --out (OUT.parquet), got {path}")
    return CsvTable(path, header)


def read_table(path: str, columns: list[str] | None = None):
    """A Parquet predictions output (a folder of parts, or one file) as one ``pyarrow.Table``."""
    import pyarrow.dataset as ds

    return ds.dataset(path, format="parquet").to_table(columns=columns)
