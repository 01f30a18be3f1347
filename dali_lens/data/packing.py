"""Packing a dataset into WebDataset shards: the typed core of ``python -m dali_lens.pack``.

:func:`pack` writes every split of DATA as ``OUT/<split>/shard-NNNNNN.tar`` with its DALI index (``.idx``) and
sample list (``.json``), and ``OUT/manifest.json``; atomic and resumable. The format is ``data/shards.py``'s;
the command's docstring (``dali_lens/pack.py``) says what a user sees.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .dataset import DataError, Dataset
from .inputs import ordered_splits
from .io import atomic_write_json, atomic_write_text, fsync_dir
from .shards import (FORMAT, MANIFEST, SHARD_FILE, VERSION, ShardWriter, file_sha256, is_packed, key_bytes,
                     label_bytes, plain_split_name, read_manifest, sample_tar_bytes, shard_name)

DEFAULT_SHARD_SIZE = 256 * 1024 * 1024
_CHUNK = 64


class PackError(ValueError):
    """Bad options, or an OUT folder that holds something else."""


def parse_size(text: str | int) -> int:
    """``256MB``, ``64M``, ``1.5G``, ``4096`` (bytes) -> bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", str(text).lower())
    if not m:
        raise PackError(f"cannot read the size {text!r} (use e.g. 256MB, 1G or a number of bytes)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2)]
    return int(float(m.group(1)) * mult)


# ============================================================================================ one sample

def _prepare(dataset: Dataset, i: int, allow_nonfinite: bool):
    """(ext, pixel bytes) of sample i as its kind packs it, or the DataError describing why it cannot be packed."""
    try:
        return dataset.data_kind.pack_member(dataset, i, allow_nonfinite)
    except DataError as exc:
        return exc


def _prepared(dataset: Dataset, order: np.ndarray, start: int, allow_nonfinite: bool, workers: int):
    """``(position, result)`` for positions ``start..n-1`` of ``order``, in order, read ahead by a few threads."""
    n = len(order)
    if workers <= 1:
        for p in range(start, n):
            yield p, _prepare(dataset, int(order[p]), allow_nonfinite)
        return

    def chunk(lo: int) -> list:
        return [_prepare(dataset, int(order[p]), allow_nonfinite) for p in range(lo, min(lo + _CHUNK, n))]

    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        nxt = start
        while nxt < n and len(pending) < 2 * workers:
            pending.append((nxt, pool.submit(chunk, nxt)))
            nxt += _CHUNK
        while pending:
            lo, fut = pending.popleft()
            results = fut.result()
            if nxt < n:
                pending.append((nxt, pool.submit(chunk, nxt)))
                nxt += _CHUNK
            for j, r in enumerate(results):
                yield lo + j, r


# ============================================================================================ output folder

def _entry(split: str, info: dict, folder: str) -> dict:
    name = shard_name(info["shard"])
    return {"split": split, "path": f"{split}/{name}.tar", "index": f"{split}/{name}.idx",
            "samples": f"{split}/{name}.json", "count": info["count"], "bytes": info["bytes"],
            "sha256": info["sha256"], "index_sha256": info["index_sha256"],
            "samples_sha256": file_sha256(os.path.join(folder, name + ".json")),  # labels and ids covered too
            "first_key": info["keys"][0] if info["keys"] else None,
            "last_key": info["keys"][-1] if info["keys"] else None}


def _summary(info: dict) -> dict:
    labels = info["labels"]
    return {"count": info["count"], "bytes": info["bytes"], "lens": labels.count(1), "nonlens": labels.count(0),
            "unlabelled": labels.count(-1), "skipped": info.get("skipped", []),
            "exts": sorted(set(info.get("exts") or [info["ext"]])), "npy_header": info.get("npy_header")}


def _resume_split(folder: str, split: str, log) -> tuple[list[dict], list[dict], int]:
    """(manifest entries, summaries, next source position) of the complete shards already in ``folder``.

    Removes temporary files and any file of an incomplete shard (a shard is complete once its .tar exists:
    the index and the sample list are renamed into place before it)."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.startswith(".shard-") and name.endswith(".tmp"):
            os.unlink(os.path.join(folder, name))
    entries, summaries, pos, k = [], [], 0, 0
    while os.path.isfile(os.path.join(folder, shard_name(k) + ".tar")):
        side = os.path.join(folder, shard_name(k) + ".json")
        try:
            with open(side, encoding="utf-8") as fh:
                info = json.load(fh)
            if info.get("shard") != k or info.get("split") != split or not os.path.isfile(
                    os.path.join(folder, shard_name(k) + ".idx")):
                raise ValueError("does not match its shard")
        except (OSError, ValueError) as exc:
            log(f"note: {os.path.join(folder, shard_name(k))}.tar: incomplete ({exc}); writing it again")
            break
        entries.append(_entry(split, info, folder))
        summaries.append(_summary(info))
        pos = int(info["source_end"])
        k += 1
    pat = re.compile(r"shard-(\d+)\.(tar|idx|json)$")
    for name in os.listdir(folder):
        m = pat.match(name)
        if m and int(m.group(1)) >= k:
            os.unlink(os.path.join(folder, name))
    return entries, summaries, pos


def _remove_pack(out: str, manifest: dict) -> None:
    """--overwrite: remove what a previous pack wrote by its manifest's record, and nothing outside OUT: in each
    split folder the manifest lists (a plain name, a real folder directly inside OUT, as ``read_manifest``
    checked), pack's shard files (``shard-NNNNNN.tar/.idx/.json``, complete or not) and temporary files; the
    folder if that empties it; then the manifest. Other files are left alone."""
    pat = re.compile(rf"{SHARD_FILE.pattern}|\.shard-\d{{6,}}\.(tar|idx|json)\.\d+(\.\d+)?\.tmp")
    real_out = os.path.realpath(out)
    for split in manifest.get("splits", {}):
        folder = os.path.join(out, split)
        if not plain_split_name(split) or os.path.islink(folder) or \
                os.path.dirname(os.path.realpath(folder)) != real_out:
            raise PackError(f"{out}/{MANIFEST}: split {split!r} is not a folder inside {out}; nothing was removed")
    for split in manifest.get("splits", {}):
        folder = os.path.join(out, split)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if pat.fullmatch(name) and not os.path.islink(os.path.join(folder, name)):
                    os.unlink(os.path.join(folder, name))
            if not os.listdir(folder):
                os.rmdir(folder)
    os.unlink(os.path.join(out, MANIFEST))


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


# ============================================================================================ packing

def _ready_out(out: str, settings: dict, overwrite: bool, log) -> dict | None:
    """Make OUT ready for this pack: refuse a folder that holds something else or a pack of other data or
    options, remove an earlier pack with ``overwrite``. Returns the manifest of a complete earlier pack made
    with these settings (nothing left to do), else None."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PackError(f"{out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not is_packed(out):
            raise PackError(f"{out}: not empty and not a packed set; choose another OUT")
        old = read_manifest(out)
        if overwrite:
            _remove_pack(out, old)
        elif old.get("settings") != settings:
            raise PackError(f"{out}: holds a pack made from other data or options "
                            f"({_settings_diff(old.get('settings') or {}, settings)}); rerun with the same ones to "
                            "resume, choose another OUT, or pass --overwrite")
        elif old.get("complete"):
            log(f"{out} is complete ({old['total_samples']} samples in {len(old['shards'])} shards); nothing to do")
            return old
    os.makedirs(out, exist_ok=True)
    return None


class _Manifest:
    """The manifest being written: its header, every complete shard and the per-split summaries so far."""

    def __init__(self, out: str, header: dict, names: list[str], splits: dict, member, fsync: bool):
        self.out, self.header, self.names, self.splits, self.member, self.fsync = out, header, names, splits, member, fsync
        self.entries: list[dict] = []
        self.summaries: dict[str, list[dict]] = {s: [] for s in names}
        self.tail_skipped: dict[str, list[dict]] = {s: [] for s in names}

    def resume(self, log) -> dict[str, int]:
        """Keep the complete shards already in OUT; returns each split's next source position."""
        starts = {}
        for s in self.names:
            got, sm, pos = _resume_split(os.path.join(self.out, s), s, log)
            self.entries.extend(got)
            self.summaries[s] = sm
            starts[s] = pos
        return starts

    def write(self, complete: bool) -> dict:
        m = dict(self.header, complete=complete)
        split_info, skipped, exts, npy_header = {}, [], set(), None
        for s in self.names:
            sm = self.summaries[s]
            sk = [dict(k, split=s) for x in sm for k in x["skipped"]] + [dict(k, split=s) for k in self.tail_skipped[s]]
            skipped.extend(sk)
            for x in sm:
                exts.update(x["exts"])
                npy_header = npy_header or x.get("npy_header")
            split_info[s] = {"samples": sum(x["count"] for x in sm), "shards": len(sm),
                             "bytes": sum(x["bytes"] for x in sm), "lens": sum(x["lens"] for x in sm),
                             "nonlens": sum(x["nonlens"] for x in sm),
                             "unlabelled": sum(x["unlabelled"] for x in sm), "skipped": len(sk),
                             "source_samples": len(self.splits[s])}
        m["image_ext"] = sorted(exts) if self.member.eight_bit else []
        if not self.member.eight_bit:
            m["npy_header_bytes"] = npy_header
        ordered = sorted(self.entries, key=lambda e: (self.names.index(e["split"]), e["path"]))
        m.update(splits=split_info, shards=ordered, skipped=skipped,
                 total_samples=sum(v["samples"] for v in split_info.values()),
                 total_bytes=sum(v["bytes"] for v in split_info.values()))
        atomic_write_json(os.path.join(self.out, MANIFEST), m, fsync=self.fsync)
        return m


class _SplitShards:
    """Writes one split's shards: opens a shard for the first sample that needs one, closes it (its .idx, .json,
    then the .tar, and the manifest) before a sample that would take it past ``shard_size``."""

    def __init__(self, manifest: _Manifest, split: str, start: int, shard_size: int, npy_values: int):
        self.manifest, self.split, self.shard_size, self.npy_values = manifest, split, shard_size, npy_values
        self.folder = os.path.join(manifest.out, split)
        self.k = len(manifest.summaries[split])
        self.shard_start = start
        self.writer: ShardWriter | None = None
        self.cur: dict | None = None
        self.pending_skipped: list[dict] = []
        self.bytes_written = 0

    def skip(self, sample, problem: DataError) -> None:
        self.pending_skipped.append({"file": sample.path, "problem": str(problem)})

    def add(self, p: int, number: int, key: str, sample, ext: str, members: list[tuple[str, bytes]]) -> None:
        need = sample_tar_bytes(members)
        if self.writer is not None and self.writer.count and self.writer.pos + need + 1024 > self.shard_size:
            self.finish(p)
            self.shard_start = p
        if self.writer is None:
            self.writer = ShardWriter(os.path.join(self.folder, f".{shard_name(self.k)}.tar.{os.getpid()}.tmp"))
            self.cur = {"split": self.split, "shard": self.k, "source_start": self.shard_start, "keys": [], "ids": [],
                        "labels": [], "exts": [], "meta": [], "skipped": self.pending_skipped}
            if not self.manifest.member.eight_bit:
                self.cur["npy_header"] = len(members[0][1]) - 4 * self.npy_values
            self.pending_skipped = []
        self.writer.add(key, members)
        self.cur["keys"].append(number)
        self.cur["ids"].append(sample.id)
        self.cur["labels"].append(-1 if sample.label is None else int(sample.label))
        self.cur["exts"].append(ext)
        self.cur["meta"].append(dict(sample.meta) if sample.meta else None)

    def finish(self, end: int) -> None:
        writer, cur, fsync = self.writer, self.cur, self.manifest.fsync
        size, sha = writer.finish(fsync=fsync)
        final = os.path.join(self.folder, shard_name(self.k))
        index_text = writer.index_text()
        cur.update(count=writer.count, source_end=end, bytes=size, sha256=sha,
                   index_sha256=hashlib.sha256(index_text.encode()).hexdigest())
        exts = cur.pop("exts")
        if len(set(exts)) == 1:
            cur["ext"] = exts[0]
        else:
            cur["ext"], cur["exts"] = exts[0], exts
        if not cur["meta"] or not any(cur["meta"]):
            cur.pop("meta")
        atomic_write_text(final + ".idx", index_text, fsync=fsync)
        atomic_write_json(final + ".json", cur, indent=None, fsync=fsync)
        os.replace(writer.path, final + ".tar")  # the .tar last: its presence marks the shard complete
        if fsync:
            fsync_dir(self.folder)
        self.manifest.entries.append(_entry(self.split, cur, self.folder))
        self.manifest.summaries[self.split].append(_summary(cur))
        self.bytes_written += size
        self.manifest.write(False)
        self.writer, self.cur = None, None
        self.k += 1

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()


class _Run:
    """What this run packed (samples, bytes) and its speed on the progress bar."""

    def __init__(self, bar, progress: bool):
        self.bar, self.progress = bar, progress
        self.samples, self.bytes, self.t0, self.posted = 0, 0, time.perf_counter(), 0.0

    def added(self, sink: "_SplitShards") -> None:
        self.samples += 1
        now = time.perf_counter()
        if self.progress and now - self.posted > 0.5:
            mb = (self.bytes + sink.bytes_written + sink.writer.pos) / 2 ** 20 / max(now - self.t0, 1e-9)
            self.bar.set_postfix_str(f"{mb:.1f} MB/s", refresh=False)
            self.posted = now

    def stats(self, seconds: float) -> dict:
        packing = time.perf_counter() - self.t0
        return {"seconds": seconds, "packing_seconds": packing, "samples_packed_now": self.samples,
                "bytes_written_now": self.bytes,
                "samples_per_s": self.samples / packing if packing > 0 else float("inf"),
                "mb_per_s": self.bytes / 2 ** 20 / packing if packing > 0 else float("inf")}


def _members(sample, split: str, number: int, ext: str, pixels: bytes, rel) -> list[tuple[str, bytes]]:
    """The tar members of one sample: its pixels, label, key number and description (id, source, columns)."""
    info = {"id": sample.id, "label": sample.label, "split": split, "source": rel(sample.path)}
    if sample.band_paths:
        info["band_files"] = [rel(b) for b in sample.band_paths]
    if sample.meta:
        info["meta"] = dict(sample.meta)
    return [(ext, pixels), ("cls", label_bytes(sample.label)), ("idx", key_bytes(number)),
            ("json", json.dumps(info, sort_keys=True, separators=(",", ":")).encode())]


def pack(data: str, out: str, shard_size: int | str = DEFAULT_SHARD_SIZE, skip_bad: bool = False,
         hdus: tuple[int | str, ...] | None = None, val_fraction: float = 0.15, seed: int = 0,
         allow_nonfinite: bool = False, overwrite: bool = False, workers: int | None = None,
         progress: bool = False, fsync: bool = True, log=print) -> dict:
    """Pack the dataset at ``data`` into shards under ``out``; returns the manifest (plus run statistics
    under ``"run"``). Raises DataError naming a bad input file (unless ``skip_bad``), PackError for options or
    an ``out`` that holds something else."""
    from .sources import discover
    from .._version import __version__

    t0 = time.perf_counter()
    data = os.path.abspath(os.path.expanduser(data))
    out = os.path.abspath(os.path.expanduser(out))
    shard_size = parse_size(shard_size)
    if shard_size < 4096:
        raise PackError(f"--shard-size {shard_size} bytes is too small (at least 4 KiB)")
    if not os.path.exists(data):  # a missing DATA is no bad file: no "fix the file / --skip-bad" hint
        raise PackError(f"{data}: no such file or directory")
    if out == data:
        raise PackError(f"{out}: OUT must differ from DATA")
    if os.path.isdir(data) and is_packed(data):
        raise PackError(f"{data}: already a packed set (it holds {MANIFEST})")
    splits = discover(data, hdus=hdus, val_fraction=val_fraction, seed=seed)
    names = ordered_splits(splits)
    ref = splits[names[0]]
    member = ref.data_kind.packed_as()  # the kind the pixels are stored as: PNG/JPEG bytes, or float32 .npy
    settings = {"source": data, "shard_size": shard_size, "seed": int(seed), "val_fraction": float(val_fraction),
                "hdus": list(hdus) if hdus else None, "allow_nonfinite": bool(allow_nonfinite),
                "source_counts": {s: len(splits[s]) for s in names}}
    done = _ready_out(out, settings, overwrite, log)
    if done is not None:
        return done

    total = sum(len(splits[s]) for s in names)
    width = max(9, len(str(max(total - 1, 0))))
    bases = dict(zip(names, np.cumsum([0] + [len(splits[s]) for s in names])[:-1].tolist()))
    header = {"format": FORMAT, "version": VERSION, "packed_with": f"dali_lens {__version__}",
              "settings": settings, "kind": member.name, "source_kind": ref.kind, "bands": ref.bands,
              "shape": list(ref.shape) if ref.shape else None, "dtype": "uint8" if member.eight_bit else "float32",
              "key_width": width, "members": [member.manifest_member, "cls", "idx", "json"]}
    manifest = _Manifest(out, header, names, splits, member, fsync)
    starts = manifest.resume(log)  # what is already there (a resumed run)
    done_before = sum(starts.values())
    if done_before:
        log(f"resuming: {sum(len(v) for v in manifest.summaries.values())} complete shard(s) kept, "
            f"{done_before} of {total} samples already packed")
    manifest.write(False)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=done_before, unit="img", desc="pack", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    n_workers = 1 if workers is None else int(workers)  # one read-ahead thread: more only add GIL contention
    prefix = data + os.sep

    def rel(path: str) -> str:  # the source path relative to DATA (absolute when outside it)
        return path[len(prefix):] if path.startswith(prefix) else path

    run = _Run(bar, progress)
    npy_values = int(np.prod([ref.bands, *(ref.shape or (0, 0))]))
    sink = None
    try:
        for s in names:
            ds = splits[s]
            order = (np.random.default_rng([int(seed), 0x9ac]).permutation(len(ds)) if s == "train"
                     else np.arange(len(ds)))
            sink = _SplitShards(manifest, s, starts[s], shard_size, npy_values)
            for p, result in _prepared(ds, order, starts[s], allow_nonfinite, n_workers):
                sample = ds.samples[int(order[p])]
                bar.update(1)
                if isinstance(result, DataError):
                    if not skip_bad:
                        raise result
                    sink.skip(sample, result)
                    log(f"skipping bad input: {result}")
                    continue
                ext, pixels = result
                number = bases[s] + p
                sink.add(p, number, f"{number:0{width}d}", sample, ext, _members(sample, s, number, ext, pixels, rel))
                run.added(sink)
            if sink.writer is not None:
                sink.finish(len(ds))
            run.bytes += sink.bytes_written
            manifest.tail_skipped[s] = sink.pending_skipped
            sink = None
            if not manifest.summaries[s]:
                raise DataError(f"{data}: every sample of the {s} split is bad; nothing to pack")
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    finally:
        bar.close()
    result = manifest.write(True)
    result["run"] = run.stats(time.perf_counter() - t0)
    return result
