"""Packed data sets: WebDataset tar shards with DALI index files, described by ``manifest.json``.

Layout written by ``python -m dali_lens.pack DATA OUT``::

    OUT/manifest.json                 format, settings, bands/shape/kind, every shard (count, bytes, sha256), totals
    OUT/<split>/shard-000000.tar      WebDataset shard: per sample <key>.png|jpg|npy, <key>.cls, <key>.idx, <key>.json
    OUT/<split>/shard-000000.idx      DALI index (wds2idx format v1.2: one line per sample, "ext offset size name"...)
    OUT/<split>/shard-000000.json     the shard's sample list (keys, ids, labels, catalogue columns), checksums

Members of one sample (in this order): the pixels (``png``/``jpg``: the original encoded bytes; ``npy``: float32
(bands, H, W), ``.npy`` format 1.0), ``cls`` (ASCII ``1``/``0``/``-1``), ``idx`` (the key's number as one
little-endian int64, so a reader can map a decoded sample back to its position) and ``json`` (original id,
source path, split, label, catalogue columns). ``__key__`` is the sample's number in the whole packed set,
zero-padded (unique across splits). Tar headers are fixed (mtime 0, uid/gid 0, mode 0644): packing the same
data again gives byte-identical shards.

A packed split is a :class:`~dali_lens.data.dataset.Dataset` of kind ``'shards'`` whose sample paths are
``"<shard .tar path>#<member name>"`` (e.g. ``/out/train/shard-000003.tar#000001234.png``); everything a loader
needs (shard, index file, member kind, key number) follows from that path, so subsets and concatenations of
packed datasets (``Dataset.subset``, ``--skip-bad``, resumed predictions) need no extra bookkeeping.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .dataset import NO_META, DataError, Dataset, Sample, dataset_cache
from .kinds.npy import NPY

MANIFEST = "manifest.json"
FORMAT = "dali-lens-shards"
VERSION = 1
INDEX_VERSION = "v1.2"
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)


# ============================================================================================ names

def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


#: a shard's files as a manifest names them: ``<split>/shard-NNNNNN.<tar|idx|json>``
SHARD_FILE = re.compile(r"shard-\d{6,}\.(tar|idx|json)")


def plain_split_name(name) -> bool:
    """Whether ``name`` (read from a manifest) names a folder directly inside the packed set: a non-empty
    string, no path separator, not ``.``/``..``, no NUL, no leading dot. Nothing read from a manifest may point
    outside its folder."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not name.startswith(".")
            and not any(c in name for c in ("/", "\\", "\0")) and os.path.basename(name) == name)


def member_path(tar_path: str, key: str, ext: str) -> str:
    """The sample path of a packed sample: ``<tar>#<key>.<ext>``."""
    return f"{tar_path}#{key}.{ext}"


def split_member_path(path: str) -> tuple[str, str]:
    """``<tar>#<member>`` -> (tar path, member name)."""
    tar, sep, member = path.rpartition("#")
    if not sep or not tar.endswith(".tar"):
        raise DataError(f"{path}: not a packed sample path (<shard>.tar#<member>)")
    return tar, member


def key_number(member: str) -> int:
    return int(member.split(".", 1)[0])


def index_path_of(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".idx"


def samples_path_of(tar_path: str) -> str:
    return tar_path[: -len(".tar")] + ".json"


# ============================================================================================ writing

_HDR_MODE_IDS = b"0000644\0" + b"0000000\0" * 2
_HDR_MTIME = b"00000000000\0"
_HDR_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 247
_HDR_SUM = sum(_HDR_MODE_IDS) + sum(_HDR_MTIME) + sum(b" " * 8) + sum(_HDR_TAIL)


def tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file (mode 0644, uid/gid 0, mtime 0): fixed, so shards are reproducible."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name too long for a tar header: {name!r}")
    size_field = b"%011o\0" % size
    checksum = _HDR_SUM + sum(raw) + sum(size_field)
    return b"".join((raw, b"\0" * (100 - len(raw)), _HDR_MODE_IDS, size_field, _HDR_MTIME,
                     b"%06o\0 " % checksum, _HDR_TAIL))


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def sample_tar_bytes(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members of one sample take in a tar (headers + data padded to 512-byte blocks)."""
    return sum(BLOCK + _padded(len(d)) for _, d in members)


class ShardWriter:
    """Writes one shard: the tar (streamed, hashed on the fly) and, on ``finish``, its DALI index lines."""

    def __init__(self, path: str):
        self.path = path
        self._fh = open(path, "wb", buffering=1 << 20)
        self._sha = hashlib.sha256()
        self.pos = 0
        self.lines: list[str] = []

    @property
    def count(self) -> int:
        return len(self.lines)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        parts, line = [], []
        for ext, data in members:
            name = f"{key}.{ext}"
            parts.append(tar_header(name, len(data)))
            self.pos += BLOCK
            line.append(f"{ext} {self.pos} {len(data)} {name}")
            parts.append(data)
            pad = _padded(len(data)) - len(data)
            if pad:
                parts.append(b"\0" * pad)
            self.pos += len(data) + pad
        blob = b"".join(parts)
        self._fh.write(blob)
        self._sha.update(blob)
        self.lines.append(" ".join(line))

    def finish(self, fsync: bool = True) -> tuple[int, str]:
        """Close the archive; returns (size in bytes, sha256 hex)."""
        self._fh.write(END_OF_ARCHIVE)
        self._sha.update(END_OF_ARCHIVE)
        self.pos += len(END_OF_ARCHIVE)
        self._fh.flush()
        if fsync:
            os.fsync(self._fh.fileno())
        self._fh.close()
        return self.pos, self._sha.hexdigest()

    def abort(self) -> None:
        try:
            self._fh.close()
        finally:
            try:
                os.unlink(self.path)
            except OSError:
                pass

    def index_text(self) -> str:
        return format_index(self.lines)


def format_index(lines: list[str]) -> str:
    """DALI's webdataset index (the format ``wds2idx`` writes): a version line, then one line per sample."""
    return f"{INDEX_VERSION} {len(lines)}\n" + "".join(line + "\n" for line in lines)


def label_bytes(label: int | None) -> bytes:
    return b"-1" if label is None else str(int(label)).encode()


def key_bytes(number: int) -> bytes:
    return struct.pack("<q", number)


# ============================================================================================ reading

def is_packed(root: str) -> bool:
    """True when ``root`` is a folder holding a packed set's ``manifest.json``."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError:
        return False
    try:
        data = json.loads(text)
    except ValueError:  # unreadable JSON: packed if it says so, so that read_manifest names the problem
        return f'"{FORMAT}"' in text
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the packed set's manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{path}: not a dali-lens packed set (format {got!r})")
    bad = _manifest_problem(manifest)
    if bad:
        raise DataError(f"{path}: malformed manifest ({bad}); pack the data again or restore the file")
    if int(manifest.get("version", 0)) > VERSION:
        raise DataError(f"{path}: packed with a newer dali-lens (format version {manifest['version']}); upgrade")
    return manifest


_ENTRY_FIELDS = {"split": str, "path": str, "index": str, "samples": str, "count": int, "bytes": int, "sha256": str}


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the structure of a manifest (None when every field the readers use has its type)."""
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(m.get("version", 0)):
        return "'version' is not an integer"
    if not is_int(m.get("bands")) or m["bands"] < 1:
        return "'bands' is not a positive integer"
    shape = m.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 2 and all(map(is_int, shape))):
        return "'shape' is not a list of two integers"
    if not isinstance(m.get("splits"), dict) or not all(isinstance(v, dict) for v in m["splits"].values()):
        return "'splits' is not an object of per-split objects"
    for split in m["splits"]:
        if not plain_split_name(split):
            return f"split name {split!r} is not a plain folder name inside the packed set"
    if not isinstance(m.get("shards"), list):
        return "'shards' is not a list"
    for k, e in enumerate(m["shards"]):
        if not isinstance(e, dict):
            return f"shards[{k}] is not an object"
        for name, typ in _ENTRY_FIELDS.items():
            if not (is_int(e.get(name)) if typ is int else isinstance(e.get(name), typ)):
                return f"shards[{k}].{name} is missing or not a{'n integer' if typ is int else ' string'}"
        if e["split"] not in m["splits"]:
            return f"shards[{k}] belongs to split {e['split']!r}, which 'splits' does not list"
        stem = e["path"][:-len(".tar")]
        for name, ext in (("path", "tar"), ("index", "idx"), ("samples", "json")):
            folder, _, base = e[name].partition("/")
            if (folder != e["split"] or not SHARD_FILE.fullmatch(base) or e[name] != f"{stem}.{ext}"):
                return (f"shards[{k}].{name} {e[name]!r} is not {e['split']}/shard-NNNNNN.{ext} (a shard file "
                        "inside its split's folder)")
    return None


def read_shard_samples(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read the shard's sample list ({exc})") from None


@dataclass
class _Listing:
    """Every sample of one packed set as arrays (:class:`PackedSamples` views it): per sample its shard
    (``tar``: a position in ``tars``), key number, member extension (a position in ``exts``), label (-1: none),
    id (UTF-8 in ``ids``, ``id_at[j]:id_at[j + 1]``) and catalogue columns (``metas``: None when no sample has
    any)."""

    tars: list[str]
    tar: np.ndarray
    key: np.ndarray
    exts: list[str]
    ext: np.ndarray
    label: np.ndarray
    ids: bytes
    id_at: np.ndarray
    metas: list | None
    width: int

    def sample(self, j: int) -> Sample:
        meta = self.metas[j] if self.metas is not None else None
        return Sample(member_path(self.tars[self.tar[j]], f"{int(self.key[j]):0{self.width}d}", self.exts[self.ext[j]]),
                      None if self.label[j] < 0 else int(self.label[j]),
                      self.ids[self.id_at[j]:self.id_at[j + 1]].decode("utf-8", "surrogatepass"), meta=meta or NO_META)


class PackedSamples(Sequence):
    """The samples of a packed set (or a subset of them, in any order) as a read-only sequence of
    :class:`~dali_lens.data.dataset.Sample`, built on access from a compact :class:`_Listing`: about 30 bytes
    per sample plus its id, where a list of ``Sample`` objects costs ~320, so a scoring run's listing of a
    survey of millions of cutouts stays small (and a forked loader worker does not copy it page by page as it
    touches reference counts). Indexing with an int gives a ``Sample``; with a slice or an array of positions
    (:meth:`take`, used by ``Dataset.subset``) another view of the same listing. It compares equal to any
    sequence of the same samples."""

    __slots__ = ("listing", "sel")

    def __init__(self, listing: _Listing, sel: np.ndarray):
        self.listing, self.sel = listing, np.asarray(sel, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.sel)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return PackedSamples(self.listing, self.sel[i])
        if isinstance(i, (int, np.integer)):
            return self.listing.sample(int(self.sel[i]))
        return self.take(i)

    def take(self, indices) -> "PackedSamples":
        """The samples at ``indices`` (positions in this view), as a view of the same listing."""
        return PackedSamples(self.listing, self.sel[np.asarray(indices, dtype=np.int64).reshape(-1)])

    def __iter__(self):
        sample = self.listing.sample
        for j in self.sel.tolist():
            yield sample(j)

    def __eq__(self, other):
        if isinstance(other, PackedSamples) and other.listing is self.listing:
            return bool(np.array_equal(self.sel, other.sel))
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None

    def __add__(self, other):
        return list(self) + list(other)

    def __radd__(self, other):
        return list(other) + list(self)

    def __repr__(self) -> str:
        return f"PackedSamples({len(self)} samples of {len(self.listing.tars)} shard(s))"

    @classmethod
    def concat(cls, parts: list["PackedSamples"]) -> tuple["PackedSamples", int]:
        """One view of ``parts`` (views of one listing) in order, each sample once: (view, duplicates left out)."""
        if len(parts) == 1:
            return parts[0], 0
        sel = np.concatenate([p.sel for p in parts])
        _, first = np.unique(sel, return_index=True)
        keep = np.sort(first)
        return cls(parts[0].listing, sel[keep]), len(sel) - len(keep)

    def labels(self) -> list[int]:
        """Each sample's label, -1 for an unlabelled one (``Dataset.labels``)."""
        return self.listing.label[self.sel].astype(np.int64).tolist()

    def shard_numbers(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(shard paths, each sample's shard as a position in them, each sample's key number), no Sample built."""
        return self.listing.tars, self.listing.tar[self.sel], self.listing.key[self.sel]

    def shard_runs(self) -> list[tuple[int, int]]:
        """``[start, stop)`` of each run of consecutive samples (positions in this view) in one shard, in order."""
        tar = self.listing.tar[self.sel]
        if not len(tar):
            return []
        cuts = (np.flatnonzero(np.diff(tar)) + 1).tolist()
        return list(zip([0] + cuts, cuts + [len(tar)]))

    def has_meta(self) -> bool:
        return self.listing.metas is not None


def _read_listing(root: str, manifest: dict) -> tuple[_Listing, dict[str, tuple[int, int]]]:
    """The :class:`_Listing` of every shard of ``manifest`` (read from their sample lists) and each split's
    ``[start, stop)`` in it (a split's shards are listed together)."""
    width = int(manifest.get("key_width", 9))
    tars, exts, ext_code = [], [], {}
    tar_c, key_c, ext_c, label_c, id_lens, blobs, metas = [], [], [], [], [], [], []
    any_meta, spans, n = False, {}, 0
    for split in manifest["splits"]:
        start = n
        for entry in (e for e in manifest["shards"] if e["split"] == split):
            tar, listed = os.path.join(root, entry["path"]), os.path.join(root, entry["samples"])
            info = read_shard_samples(listed)
            keys, ids, labels = info["keys"], info["ids"], info["labels"]
            if not len(keys) == len(ids) == len(labels) == entry["count"]:
                raise DataError(f"{tar}: its sample list holds {len(keys)} samples, the manifest says {entry['count']}")
            shard_exts = info.get("exts") or [info["ext"]] * len(keys)
            for e in dict.fromkeys(shard_exts):
                if e not in ext_code:
                    ext_code[e] = len(exts)
                    exts.append(e)
            m = info.get("meta")
            if m and (not isinstance(m, list) or len(m) != len(keys)
                      or not all(x is None or isinstance(x, dict) for x in m)):
                raise DataError(f"{listed}: malformed sample list (its catalogue "
                                "columns are not one mapping per sample)")
            if m and any(m) and not any_meta:  # the first catalogue columns: the samples before have none
                any_meta, metas = True, [None] * n
            if any_meta:
                metas.extend(m or [None] * len(keys))
            try:
                key_arr, label_arr = np.asarray(keys, dtype=np.int64), np.asarray(labels, dtype=np.int64)
            except (TypeError, ValueError, OverflowError):
                key_arr = label_arr = None
            if (key_arr is None or key_arr.ndim != 1 or label_arr.ndim != 1 or (key_arr < 0).any()
                    or not np.isin(label_arr, (-1, 0, 1)).all()):
                raise DataError(f"{listed}: malformed sample list (keys must be "
                                "integers >= 0, labels 1, 0 or -1)")
            tar_c.append(np.full(len(keys), len(tars), dtype=np.int32))
            tars.append(tar)
            key_c.append(key_arr)
            ext_c.append(np.fromiter((ext_code[e] for e in shard_exts), dtype=np.int16, count=len(keys)))
            label_c.append(label_arr.astype(np.int8))
            try:  # (a lone surrogate is not UTF-8: no output, reader or file name could hold it)
                enc = [str(i).encode("utf-8") for i in ids]
                tar.encode("utf-8")
                for e in dict.fromkeys(shard_exts):
                    str(e).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{listed}: malformed sample list (ids, extensions and shard paths must be "
                                "UTF-8 text)") from None
            id_lens.append(np.fromiter(map(len, enc), dtype=np.int64, count=len(enc)))
            blobs.append(b"".join(enc))
            n += len(keys)
        if n > start:
            spans[split] = (start, n)

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    id_at = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(cat(id_lens, np.int64), out=id_at[1:])
    return _Listing(tars, cat(tar_c, np.int32), cat(key_c, np.int64), exts, cat(ext_c, np.int16),
                    cat(label_c, np.int8), b"".join(blobs), id_at, metas if any_meta else None, width), spans


def load_packed(root: str) -> dict[str, Dataset]:
    """``{split: Dataset(kind='shards')}`` for the packed set at ``root``; the samples are :class:`PackedSamples`
    views of one listing."""
    root = os.path.abspath(root)
    manifest = read_manifest(root)
    if not manifest.get("complete"):
        done = sum(s["count"] for s in manifest.get("shards", []))
        raise DataError(f"{root}: packing is incomplete ({done} samples in {len(manifest.get('shards', []))} "
                        "shard(s) so far); rerun `python -m dali_lens.pack` with the same arguments to finish it")
    bands = int(manifest["bands"])
    shape = tuple(int(v) for v in manifest["shape"]) if manifest.get("shape") else None
    listing, spans = _read_listing(root, manifest)
    out = {split: Dataset(PackedSamples(listing, np.arange(a, b, dtype=np.int64)), bands, "shards", root, split,
                          None, shape) for split, (a, b) in spans.items()}
    if not out:
        raise DataError(f"{root}: the packed set holds no samples")
    return out


@functools.lru_cache(maxsize=32)
def _index(idx_path: str, mtime_ns: int, size: int) -> dict[str, dict[str, tuple[int, int]]]:
    """``{key: {ext: (offset, size)}}`` from a DALI index file (cached while the file is unchanged)."""
    del mtime_ns, size
    return {k: comps for k, comps, _ in parse_index(idx_path)}


def parse_index(idx_path: str) -> list[tuple[str, dict[str, tuple[int, int]], str]]:
    """``[(key, {ext: (offset, size)}, line)]`` in file order; DataError naming the file when malformed."""
    try:
        with open(idx_path, encoding="utf-8") as fh:
            head = fh.readline().split()
            lines = fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{idx_path}: cannot read the shard index ({exc})") from None
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines):
        raise DataError(f"{idx_path}: not a DALI webdataset index (expected '{INDEX_VERSION} <n>' and n lines)")
    out = []
    for lineno, line in enumerate(lines, start=2):
        f = line.split()
        if not f or len(f) % 4:
            raise DataError(f"{idx_path}, line {lineno}: malformed index line")
        comps = {}
        try:
            for j in range(0, len(f), 4):
                comps[f[j]] = (int(f[j + 1]), int(f[j + 2]))
        except ValueError:
            raise DataError(f"{idx_path}, line {lineno}: malformed index line") from None
        out.append((f[3].split(".", 1)[0], comps, line))
    return out


def shard_index(tar_path: str) -> dict[str, dict[str, tuple[int, int]]]:
    idx = index_path_of(tar_path)
    try:
        st = os.stat(idx)
    except OSError:
        raise DataError(f"{idx}: shard index not found") from None
    return _index(idx, st.st_mtime_ns, st.st_size)


def read_member_bytes(path: str) -> bytes:
    """The bytes of the member a packed sample path names (random access through the shard's index)."""
    tar, member = split_member_path(path)
    key, _, ext = member.partition(".")
    comps = shard_index(tar).get(key)
    if comps is None or ext not in comps:
        raise DataError(f"{path}: no such member in the shard index")
    offset, size = comps[ext]
    try:
        with open(tar, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
    except OSError as exc:
        raise DataError(f"{tar}: cannot read ({exc})") from None
    if len(data) != size:
        raise DataError(f"{path}: truncated shard ({len(data)} of {size} bytes)")
    return data


def member_kind(ext: str):
    """The kind a pixels member is stored as, by its extension: the registered kind whose ``member_exts`` hold
    it (IMAGE for png/jpg, NPY for npy, any kind registered as a member format), or None (not pixels)."""
    from .dataset import KINDS

    ext = ext.lower()
    return next((k for k in KINDS.values() if ext in k.member_exts), None)


def decode_member(data: bytes, member: str, where: str) -> np.ndarray:
    """Pixels of one packed member as (bands, H, W): uint8 for PNG/JPEG, float32 for ``.npy``."""
    ext = member.rsplit(".", 1)[-1]
    kind = member_kind(ext)
    if kind is None:
        raise DataError(f"{where}: unsupported member type {ext.lower()!r}")
    return kind.decode(data, where)


def read_packed(sample: Sample) -> np.ndarray:
    """Read one packed sample (used by ``readers.read_sample``, statistics, ``check`` and ``--skip-bad``)."""
    _, member = split_member_path(sample.path)
    return decode_member(read_member_bytes(sample.path), member, sample.path)


# ============================================================================================ loader plans

@dataclass
class Group:
    """Consecutive samples of a dataset that live in the same shard (positions in dataset order)."""

    tar: str
    positions: np.ndarray
    keys: list[str]
    full: bool = False   # exactly the whole shard, in tar order (its own index file can be used)


@dataclass
class ShardPlan:
    """How a packed dataset maps onto shards: groups, the key-number -> position table, the member kind."""

    groups: list[Group]
    lookup: np.ndarray            # key number -> position in dataset.samples (-1: not in this dataset)
    member: object                # the kind the pixels are stored as: a registered member format (IMAGE, NPY, ...)
    _tmpdir: str | None = field(default=None, repr=False)
    _dali: tuple[list[str], list[str]] | None = field(default=None, repr=False)

    def positions(self, numbers) -> np.ndarray:
        """Dataset positions of key numbers (DataError for one that is not in this dataset)."""
        numbers = np.asarray(numbers, dtype=np.int64).reshape(-1)
        ok = (numbers >= 0) & (numbers < len(self.lookup))
        pos = np.full(len(numbers), -1, dtype=np.int64)
        pos[ok] = self.lookup[numbers[ok]]
        if (pos < 0).any():
            bad = int(numbers[int(np.flatnonzero(pos < 0)[0])])
            raise DataError(f"the shards returned sample {bad}, which is not in this dataset (stale index files?)")
        return pos

    def dali_files(self) -> tuple[list[str], list[str]]:
        """(tar paths, index paths) for ``fn.readers.webdataset``: a shard's own index when the dataset holds
        the whole shard in order, else an index listing just this dataset's samples (written to a temporary
        folder removed with the plan)."""
        if self._dali is None:
            paths, idx = [], []
            for k, g in enumerate(self.groups):
                paths.append(g.tar)
                if g.full:
                    idx.append(index_path_of(g.tar))
                    continue
                if self._tmpdir is None:
                    self._tmpdir = tempfile.mkdtemp(prefix="dali-lens-wds-")
                    weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
                lines = {key: line for key, _, line in parse_index(index_path_of(g.tar))}
                missing = [key for key in g.keys if key not in lines]
                if missing:
                    raise DataError(f"{g.tar}: sample {missing[0]} is not in the shard's index")
                path = os.path.join(self._tmpdir, f"{k:06d}.idx")
                with open(path, "w", encoding="utf-8") as fh:
                    fh.write(format_index([lines[key] for key in g.keys]))
                idx.append(path)
            self._dali = (paths, idx)
        return self._dali


def _index_count(tar: str) -> int:
    idx = index_path_of(tar)
    try:
        with open(idx, encoding="utf-8") as fh:
            head = fh.readline().split()
        return int(head[1])
    except (OSError, IndexError, ValueError):
        raise DataError(f"{idx}: shard index missing or unreadable") from None


def _path_groups(samples) -> tuple[list[Group], np.ndarray, set]:
    """(runs of consecutive samples in one shard, key numbers, member kinds) read from the sample paths."""
    groups: list[Group] = []
    numbers = np.empty(len(samples), dtype=np.int64)
    cur_tar, cur_pos, cur_keys = None, [], []
    member_kinds = set()

    def close():
        if cur_tar is not None:
            groups.append(Group(cur_tar, np.asarray(cur_pos, dtype=np.int64), cur_keys))

    for i, s in enumerate(samples):
        tar, member = split_member_path(s.path)
        key, _, ext = member.partition(".")
        member_kinds.add(member_kind(ext) or NPY)
        numbers[i] = int(key)
        if tar != cur_tar:
            close()
            cur_tar, cur_pos, cur_keys = tar, [], []
        cur_pos.append(i)
        cur_keys.append(key)
    close()
    return groups, numbers, member_kinds


def _listing_groups(samples: "PackedSamples") -> tuple[list[Group], np.ndarray, set]:
    """What :func:`_path_groups` reads from the paths, from a packed listing's arrays (no path built)."""
    listing = samples.listing
    tars, tar, numbers = samples.shard_numbers()
    w = listing.width
    groups = [Group(tars[int(tar[a])], np.arange(a, b, dtype=np.int64), [f"{k:0{w}d}" for k in numbers[a:b].tolist()])
              for a, b in samples.shard_runs()]
    kinds = {member_kind(listing.exts[c]) or NPY for c in np.unique(listing.ext[samples.sel]).tolist()}
    return groups, numbers, kinds


def shard_plan(dataset: Dataset) -> ShardPlan:
    """The :class:`ShardPlan` of a ``'shards'`` dataset (computed once per dataset object)."""
    cache = dataset_cache(dataset, __name__)
    if "plan" in cache:
        return cache["plan"]
    if not dataset.data_kind.packed:
        raise ValueError(f"not a packed dataset (kind {dataset.kind!r})")
    if isinstance(dataset.samples, PackedSamples):
        groups, numbers, member_kinds = _listing_groups(dataset.samples)
    else:
        groups, numbers, member_kinds = _path_groups(dataset.samples)
    if len(member_kinds) > 1:
        raise DataError(f"{dataset.root}: packed images and float arrays mixed in one dataset")
    counts: dict[str, int] = {}
    for g in groups:
        nums = numbers[g.positions]
        increasing = len(nums) < 2 or bool((np.diff(nums) > 0).all())
        if increasing:
            if g.tar not in counts:
                counts[g.tar] = _index_count(g.tar)
            g.full = counts[g.tar] == len(nums)
    lookup = np.full(int(numbers.max()) + 1 if len(numbers) else 0, -1, dtype=np.int64)
    if len(np.unique(numbers)) != len(numbers):
        raise DataError(f"{dataset.root}: the same packed sample is listed twice in {dataset.split}")
    lookup[numbers] = np.arange(len(numbers))
    plan = cache["plan"] = ShardPlan(groups, lookup, member_kinds.pop() if member_kinds else NPY)
    return plan


# ============================================================================================ verification

def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_shard(root: str, entry: dict, manifest: dict, allow_nonfinite: bool = False,
                 max_problems: int = 20) -> list[str]:
    """Problems of one shard: missing files, size/checksum mismatch, index/sample list mismatch, and every
    member that cannot be read or decoded (or has the wrong band count/size, NaN/inf)."""
    tar = os.path.join(root, entry["path"])
    if not os.path.isfile(tar):
        return [f"{tar}: shard missing"]
    problems = _tar_file_problems(tar, entry)
    idx_path = os.path.join(root, entry["index"])
    try:
        index = parse_index(idx_path)
    except DataError as exc:
        return problems + [str(exc)]
    if len(index) != entry["count"]:
        problems.append(f"{idx_path}: indexes {len(index)} samples, the manifest says {entry['count']}")
    try:
        listing = _ShardListing(root, entry, manifest, index, problems)
    except DataError as exc:
        return problems + [str(exc)]
    by_key = {k: comps for k, comps, _ in index}
    seen = _member_problems(tar, by_key, listing, manifest, allow_nonfinite, max_problems, problems)
    missing = [f"{k}.{e}" for k, comps in by_key.items() for e in comps if (k, e) not in seen]
    if missing and len(problems) < max_problems:
        problems.append(f"{tar}: {len(missing)} indexed member(s) missing from the archive (first: {missing[0]})")
    return problems


def _tar_file_problems(tar: str, entry: dict) -> list[str]:
    """The shard's size and sha256 against its manifest entry."""
    problems = []
    size = os.path.getsize(tar)
    if size != entry["bytes"]:
        problems.append(f"{tar}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced shard)")
    digest = file_sha256(tar)
    if digest != entry["sha256"]:
        problems.append(f"{tar}: checksum mismatch (sha256 {digest[:16]}..., the manifest says "
                        f"{entry['sha256'][:16]}...): the shard is corrupt")
    return problems


class _ShardListing:
    """A shard's sample list (``.json``: the keys, labels and ids the loaders use), checked against its checksum
    and the shard's index; appends what is wrong to ``problems``, DataError when it cannot be used at all."""

    def __init__(self, root: str, entry: dict, manifest: dict, index: list, problems: list[str]):
        info = read_shard_samples(os.path.join(root, entry["samples"]))
        self.path = os.path.join(root, entry["samples"])
        if entry.get("samples_sha256") and file_sha256(self.path) != entry["samples_sha256"]:
            problems.append(f"{self.path}: checksum mismatch (the manifest's samples_sha256): the shard's sample "
                            "list (labels, ids) was changed after packing")
        width = int(manifest.get("key_width", 9))
        try:
            listed = [f"{int(k):0{width}d}" for k in info.get("keys", [])]
            self.labels = {key: int(v) for key, v in zip(listed, info.get("labels", []))}
            self.ids = {key: str(v) for key, v in zip(listed, info.get("ids", []))}
        except (TypeError, ValueError):
            raise DataError(f"{self.path}: malformed sample list (keys and labels must be integers)") from None
        if listed != [k for k, _, _ in index]:
            problems.append(f"{self.path}: its keys differ from the shard index")


def _member_problems(tar: str, by_key: dict, listing: _ShardListing, manifest: dict, allow_nonfinite: bool,
                     max_problems: int, problems: list[str]) -> set[tuple[str, str]]:
    """Read the tar as a stream, checking every member against the index, its content and the sample list;
    appends problems (up to ``max_problems``) and returns the (key, ext) of the members seen."""
    import tarfile

    bands, shape = int(manifest["bands"]), manifest.get("shape")
    seen = set()
    try:
        with tarfile.open(tar, mode="r|") as tf:  # streamed: members are not accumulated in memory
            for ti in tf:
                tf.members = []
                if len(problems) >= max_problems:
                    break
                if not ti.isreg():
                    continue
                where = f"{tar}#{ti.name}"
                key, _, ext = ti.name.partition(".")
                comps = by_key.get(key)
                if comps is None or ext not in comps:
                    problems.append(f"{where}: member not in the shard index")
                    continue
                if comps[ext] != (ti.offset_data, ti.size):
                    problems.append(f"{where}: the index points at offset {comps[ext][0]}, the member is at "
                                    f"{ti.offset_data}")
                    continue
                data = tf.extractfile(ti).read()
                seen.add((key, ext))
                try:
                    _check_member(data, ti.name, ext, key, where, bands, shape, allow_nonfinite)
                    _check_listed(data, ext, key, where, listing.labels, listing.ids, listing.path)
                except DataError as exc:
                    problems.append(str(exc))
    except (tarfile.TarError, OSError) as exc:
        problems.append(f"{tar}: unreadable tar ({exc})")
    return seen


def _check_listed(data: bytes, ext: str, key: str, where: str, labels: dict, ids: dict, samples_path: str) -> None:
    """The shard's sample list (what the loaders use) must agree with the label and id stored in the tar."""
    if ext == "cls" and key in labels and int(data.decode("ascii")) != labels[key]:
        raise DataError(f"{samples_path}: sample {key} is listed with label {labels[key]}, the shard holds "
                        f"{data.decode('ascii')} ({where}): the sample list was edited")
    if ext == "json" and key in ids:
        stored = json.loads(data.decode("utf-8")).get("id")
        if stored is not None and str(stored) != ids[key]:
            raise DataError(f"{samples_path}: sample {key} is listed as id {ids[key]!r}, the shard holds "
                            f"{stored!r} ({where})")


def _check_member(data: bytes, name: str, ext: str, key: str, where: str, bands: int, shape,
                  allow_nonfinite: bool) -> None:
    if member_kind(ext) is not None:
        arr = decode_member(data, name, where)
        if arr.shape[0] != bands:
            raise DataError(f"{where}: has {arr.shape[0]} band(s), the packed set has {bands}")
        if shape and tuple(arr.shape[1:]) != tuple(shape):
            raise DataError(f"{where}: is {arr.shape[1]}x{arr.shape[2]} px, the packed set's samples are "
                            f"{shape[0]}x{shape[1]}")
        if not allow_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise DataError(f"{where}: contains {int((~np.isfinite(arr)).sum())} NaN/inf value(s)")
    elif ext == "cls":
        try:
            if int(data.decode("ascii")) not in (-1, 0, 1):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise DataError(f"{where}: label is not 1, 0 or -1 ({data[:20]!r})") from None
    elif ext == "idx":
        if len(data) != 8 or struct.unpack("<q", data)[0] != int(key):
            raise DataError(f"{where}: sample number does not match its key")
    elif ext == "json":
        try:
            json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DataError(f"{where}: unreadable JSON ({exc})") from None


def _orphans(root: str, entries: list[dict]) -> list[str]:
    """Shard files (.tar/.idx/.json) in the split folders that no manifest entry names: their samples are not
    part of the set (a shard dropped from manifest.json)."""
    named = {os.path.normpath(os.path.join(root, e[k])) for e in entries for k in ("path", "index", "samples")}
    out = []
    for folder in sorted(os.listdir(root)):
        full = os.path.join(root, folder)
        if not os.path.isdir(full):
            continue
        for name in sorted(os.listdir(full)):
            path = os.path.normpath(os.path.join(full, name))
            if SHARD_FILE.fullmatch(name) and path not in named:
                what = "its samples are not part of the set" if name.endswith(".tar") else "not used"
                out.append(f"{path}: orphan shard file, not listed in {MANIFEST} ({what})")
    return out


def verify(root: str, allow_nonfinite: bool | None = None, workers: int | None = None, log=print) -> list[str]:
    """Check a packed set against its manifest: every shard's checksum, index, sample list and members, and the
    per-split sample counts. Returns the problems (an empty list when the set is sound)."""
    from concurrent.futures import ThreadPoolExecutor

    root = os.path.abspath(root)
    try:
        manifest = read_manifest(root)
    except DataError as exc:
        return [str(exc)]
    problems: list[str] = []
    if not manifest.get("complete"):
        problems.append(f"{root}: packing is incomplete; rerun `python -m dali_lens.pack` to finish it")
    if allow_nonfinite is None:
        allow_nonfinite = bool(manifest.get("settings", {}).get("allow_nonfinite", False))
    entries = manifest.get("shards", [])
    for split, info in manifest.get("splits", {}).items():
        counted = sum(e["count"] for e in entries if e["split"] == split)
        shards = sum(1 for e in entries if e["split"] == split)
        log(f"{split}: {info.get('samples')} packed {manifest.get('kind')} samples in {shards} shard(s), "
            f"{manifest.get('bands')} band(s), {'x'.join(map(str, manifest.get('shape') or ['?']))} px")
        if counted != info.get("samples"):
            problems.append(f"{root}: split {split} lists {info.get('samples')} samples, its shards hold {counted}")
        source, skipped = info.get("source_samples"), info.get("skipped")
        if isinstance(source, int) and isinstance(skipped, int) and manifest.get("complete") \
                and info.get("samples", 0) + skipped != source:
            problems.append(f"{root}: split {split} holds {info.get('samples')} packed + {skipped} skipped samples, but "
                            f"{source} were packed from the source: {source - info.get('samples', 0) - skipped} "
                            "sample(s) missing from the manifest")
    problems.extend(_orphans(root, entries))
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(lambda e: verify_shard(root, e, manifest, allow_nonfinite), entries):
            problems.extend(found)
    return problems
