"""``python -m dali_lens.pack DATA OUT``: pack a dataset into WebDataset shards that DALI streams.

DATA is anything ``discover`` reads (split/class folders, CSV manifests, the challenge layout, loose files);
every split it finds (train/val/test, or one ``predict`` split of unlabelled files) becomes
``OUT/<split>/shard-000000.tar, shard-000001.tar, ...`` of about --shard-size bytes each, with the DALI index
(``.idx``, wds2idx format) and the sample list (``.json``) of every shard, and ``OUT/manifest.json`` (shards,
sample counts, bands, shape, kind, image extension, sha256 per shard, per-split totals). See
``dali_lens/data/shards.py`` for the format. Train with ``--data-root OUT``, score with
``python -m dali_lens.predict ... OUT``, verify with ``python -m dali_lens.check OUT``.

* PNG/JPEG stay encoded: the original bytes are copied (member ``png``/``jpg``), after a strict check of those
  bytes (``data/validate.py``: PNG chunk checksums, a full decode, libjpeg's corrupt-data warnings, size, band
  count), so that no decoder is later handed a corrupt file. ``.npy``, FITS and per-band FITS
  are read (numpy/astropy), checked (bands, size, NaN/inf unless --allow-nonfinite) and stored as float32
  (bands, H, W) ``.npy`` members.
* Each sample keeps its label (``cls``: 1, 0, -1 if unlabelled) and its original id, path and catalogue
  columns (``json``); its key is its number in the packed set.
* The training split is shuffled once (seeded by --seed) so that shards stream in a mixed order; the other
  splits keep their order.
* Atomic and resumable: every shard (and its index and sample list) is written under a temporary name and
  renamed when complete; the assignment of samples to shards is deterministic, so rerunning the same command
  after an interruption keeps the complete shards and writes the same remaining ones (byte for byte).
* A bad input file stops the run with its name (complete shards are kept: fix the file and rerun);
  --skip-bad skips bad files and lists them (also in the manifest).

Examples:
  python -m dali_lens.pack /data/lenses /data/lenses-packed
  python -m dali_lens.pack survey_tile.csv /scratch/tile-packed --shard-size 1G --skip-bad
Exit status: 0 done, 2 bad input or options (the message names the file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .cli import log, run_command
from .data.dataset import DataError, Dataset, parse_hdus
from .data.inputs import SPLIT_ORDER
from .data.io import atomic_write_json, atomic_write_text, _fsync_dir
from .data.shards import (FORMAT, MANIFEST, VERSION, ShardWriter, file_sha256, is_packed, key_bytes, label_bytes,
                          npy_bytes, read_manifest, sample_tar_bytes, shard_name)

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

def _image_bytes(dataset: Dataset, i: int) -> tuple[str, bytes]:
    from .data.validate import image_problem

    path = dataset.samples[i].path
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    # the bytes that are packed, fully decoded and checked (PNG CRCs, libjpeg's corrupt-data warnings, bands, size)
    problem = image_problem(data, path, dataset.bands, dataset.shape)
    if problem:
        raise DataError(problem)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", data
    if data[:2] == b"\xff\xd8":
        return "jpg", data
    raise DataError(f"{path}: not a PNG or JPEG file (other image formats cannot be packed)")


def _array_bytes(dataset: Dataset, i: int, allow_nonfinite: bool) -> tuple[str, bytes]:
    from .data.readers import check_array, read_sample

    sample = dataset.samples[i]
    arr = read_sample(sample, dataset, check=False)
    check_array(arr, sample, dataset, allow_nonfinite=allow_nonfinite)
    return "npy", npy_bytes(arr)


def _prepare(dataset: Dataset, i: int, allow_nonfinite: bool):
    """(ext, pixel bytes) of sample i, or the DataError describing why it cannot be packed."""
    try:
        if dataset.kind == "image":
            return _image_bytes(dataset, i)
        return _array_bytes(dataset, i, allow_nonfinite)
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
    """--overwrite: remove what a previous pack wrote (its split folders' shard files and the manifest)."""
    pat = re.compile(r"(shard-\d+\.(tar|idx|json)|\.shard-.*\.tmp)$")
    for split in manifest.get("splits", {}):
        folder = os.path.join(out, split)
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if pat.match(name):
                    os.unlink(os.path.join(folder, name))
            if not os.listdir(folder):
                os.rmdir(folder)
    os.unlink(os.path.join(out, MANIFEST))


def _settings_diff(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k))


# ============================================================================================ packing

def pack(data: str, out: str, shard_size: int | str = DEFAULT_SHARD_SIZE, skip_bad: bool = False,
         hdus: tuple[int | str, ...] | None = None, val_fraction: float = 0.15, seed: int = 0,
         allow_nonfinite: bool = False, overwrite: bool = False, workers: int | None = None,
         progress: bool = False, fsync: bool = True, log=print) -> dict:
    """Pack the dataset at ``data`` into shards under ``out``; returns the manifest (plus run statistics
    under ``"run"``). Raises DataError naming a bad input file (unless ``skip_bad``), PackError for options or
    an ``out`` that holds something else."""
    from .data.sources import discover
    from ._version import __version__

    t0 = time.perf_counter()
    data = os.path.abspath(os.path.expanduser(data))
    out = os.path.abspath(os.path.expanduser(out))
    shard_size = parse_size(shard_size)
    if shard_size < 4096:
        raise PackError(f"--shard-size {shard_size} bytes is too small (at least 4 KiB)")
    if out == data:
        raise PackError(f"{out}: OUT must differ from DATA")
    if os.path.isdir(data) and is_packed(data):
        raise PackError(f"{data}: already a packed set (it holds {MANIFEST})")
    splits = discover(data, hdus=hdus, val_fraction=val_fraction, seed=seed)
    names = [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]
    ref = splits[names[0]]
    kind = "image" if ref.kind == "image" else "npy"
    settings = {"source": data, "shard_size": shard_size, "seed": int(seed), "val_fraction": float(val_fraction),
                "hdus": list(hdus) if hdus else None, "allow_nonfinite": bool(allow_nonfinite),
                "source_counts": {s: len(splits[s]) for s in names}}
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

    total = sum(len(splits[s]) for s in names)
    width = max(9, len(str(max(total - 1, 0))))
    bases = dict(zip(names, np.cumsum([0] + [len(splits[s]) for s in names])[:-1].tolist()))
    header = {"format": FORMAT, "version": VERSION, "packed_with": f"dali_lens {__version__}",
              "settings": settings, "kind": kind, "source_kind": ref.kind, "bands": ref.bands,
              "shape": list(ref.shape) if ref.shape else None, "dtype": "uint8" if kind == "image" else "float32",
              "key_width": width,
              "members": ["png|jpg" if kind == "image" else "npy", "cls", "idx", "json"]}
    entries: list[dict] = []
    summaries: dict[str, list[dict]] = {s: [] for s in names}
    tail_skipped: dict[str, list[dict]] = {s: [] for s in names}

    def write_manifest(complete: bool) -> dict:
        m = dict(header, complete=complete)
        split_info, skipped, exts, npy_header = {}, [], set(), None
        for s in names:
            sm = summaries[s]
            sk = [dict(k, split=s) for x in sm for k in x["skipped"]] + [dict(k, split=s) for k in tail_skipped[s]]
            skipped.extend(sk)
            for x in sm:
                exts.update(x["exts"])
                npy_header = npy_header or x.get("npy_header")
            split_info[s] = {"samples": sum(x["count"] for x in sm), "shards": len(sm),
                             "bytes": sum(x["bytes"] for x in sm), "lens": sum(x["lens"] for x in sm),
                             "nonlens": sum(x["nonlens"] for x in sm),
                             "unlabelled": sum(x["unlabelled"] for x in sm), "skipped": len(sk),
                             "source_samples": len(splits[s])}
        m["image_ext"] = sorted(exts) if kind == "image" else []
        if kind == "npy":
            m["npy_header_bytes"] = npy_header
        ordered = sorted(entries, key=lambda e: (names.index(e["split"]), e["path"]))
        m.update(splits=split_info, shards=ordered, skipped=skipped,
                 total_samples=sum(v["samples"] for v in split_info.values()),
                 total_bytes=sum(v["bytes"] for v in split_info.values()))
        atomic_write_json(os.path.join(out, MANIFEST), m, fsync=fsync)
        return m

    # what is already there (a resumed run)
    starts = {}
    for s in names:
        got, sm, pos = _resume_split(os.path.join(out, s), s, log)
        entries.extend(got)
        summaries[s] = sm
        starts[s] = pos
    done_before = sum(starts.values())
    if done_before:
        log(f"resuming: {sum(len(v) for v in summaries.values())} complete shard(s) kept, "
            f"{done_before} of {total} samples already packed")
    write_manifest(False)

    from tqdm import tqdm

    bar = tqdm(total=total, initial=done_before, unit="img", desc="pack", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    n_workers = 1 if workers is None else int(workers)  # one read-ahead thread: more only add GIL contention
    prefix = data + os.sep

    def rel(path: str) -> str:  # the source path relative to DATA (absolute when outside it)
        return path[len(prefix):] if path.startswith(prefix) else path

    new_samples, new_bytes, t_run = 0, 0, time.perf_counter()
    last_post = 0.0
    writer = None
    try:
        for s in names:
            ds = splits[s]
            folder = os.path.join(out, s)
            order = (np.random.default_rng([int(seed), 0x9ac]).permutation(len(ds)) if s == "train"
                     else np.arange(len(ds)))
            k = len(summaries[s])
            writer, cur = None, None
            pending_skipped: list[dict] = []
            shard_start = starts[s]

            def finish(end: int) -> None:
                nonlocal writer, cur, k, new_bytes
                size, sha = writer.finish(fsync=fsync)
                final = os.path.join(folder, shard_name(k))
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
                    _fsync_dir(folder)
                entries.append(_entry(s, cur, folder))
                summaries[s].append(_summary(cur))
                new_bytes += size
                write_manifest(False)
                writer, cur = None, None
                k += 1

            for p, result in _prepared(ds, order, starts[s], allow_nonfinite, n_workers):
                i = int(order[p])
                sample = ds.samples[i]
                if isinstance(result, DataError):
                    if not skip_bad:
                        raise result
                    pending_skipped.append({"file": sample.path, "problem": str(result)})
                    log(f"skipping bad input: {result}")
                    bar.update(1)
                    continue
                ext, pixels = result
                number = bases[s] + p
                key = f"{number:0{width}d}"
                label = sample.label
                info = {"id": sample.id, "label": label, "split": s, "source": rel(sample.path)}
                if sample.band_paths:
                    info["band_files"] = [rel(b) for b in sample.band_paths]
                if sample.meta:
                    info["meta"] = dict(sample.meta)
                members = [(ext, pixels), ("cls", label_bytes(label)), ("idx", key_bytes(number)),
                           ("json", json.dumps(info, sort_keys=True, separators=(",", ":")).encode())]
                need = sample_tar_bytes(members)
                if writer is not None and writer.count and writer.pos + need + 1024 > shard_size:
                    finish(p)
                    shard_start = p
                if writer is None:
                    writer = ShardWriter(os.path.join(folder, f".{shard_name(k)}.tar.{os.getpid()}.tmp"))
                    cur = {"split": s, "shard": k, "source_start": shard_start, "keys": [], "ids": [],
                           "labels": [], "exts": [], "meta": [], "skipped": pending_skipped}
                    if kind == "npy":
                        cur["npy_header"] = len(pixels) - 4 * int(np.prod([ref.bands, *(ref.shape or (0, 0))]))
                    pending_skipped = []
                writer.add(key, members)
                cur["keys"].append(number)
                cur["ids"].append(sample.id)
                cur["labels"].append(-1 if label is None else int(label))
                cur["exts"].append(ext)
                cur["meta"].append(dict(sample.meta) if sample.meta else None)
                new_samples += 1
                bar.update(1)
                now = time.perf_counter()
                if progress and now - last_post > 0.5:
                    mb = (new_bytes + writer.pos) / 2 ** 20 / max(now - t_run, 1e-9)
                    bar.set_postfix_str(f"{mb:.1f} MB/s", refresh=False)
                    last_post = now
            if writer is not None:
                finish(len(ds))
            tail_skipped[s] = pending_skipped
            if not summaries[s]:
                raise DataError(f"{data}: every sample of the {s} split is bad; nothing to pack")
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        bar.close()
    manifest = write_manifest(True)
    seconds = time.perf_counter() - t0
    packing = time.perf_counter() - t_run
    manifest["run"] = {"seconds": seconds, "packing_seconds": packing, "samples_packed_now": new_samples,
                       "bytes_written_now": new_bytes,
                       "samples_per_s": new_samples / packing if packing > 0 else float("inf"),
                       "mb_per_s": new_bytes / 2 ** 20 / packing if packing > 0 else float("inf")}
    return manifest


# ============================================================================================ CLI

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dali_lens.pack", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", metavar="DATA", help="dataset root, CSV manifest or folder of cutouts")
    ap.add_argument("out", metavar="OUT", help="folder to write the shards and manifest.json to")
    ap.add_argument("--shard-size", default="256MB", help="target shard size, e.g. 256MB (default), 1G, 64M")
    ap.add_argument("--skip-bad", action="store_true", help="skip bad input files (listed) instead of stopping")
    ap.add_argument("--hdus", default=None, help="FITS: comma-separated HDU indices or EXTNAMEs, one per band")
    ap.add_argument("--val-fraction", type=float, default=0.15,
                    help="without a val split, this fraction of train becomes val (as in training; default 0.15)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the val split and of the train shuffle")
    ap.add_argument("--allow-nonfinite", action="store_true",
                    help="float data: keep NaN/inf pixels (masked data) instead of treating them as bad input")
    ap.add_argument("--workers", type=int, default=None,
                    help="read-ahead threads (default 1; 0 = none; more help only on slow network file systems)")
    ap.add_argument("--overwrite", action="store_true", help="replace a previous pack in OUT (its files only)")
    ap.add_argument("--no-fsync", dest="fsync", action="store_false",
                    help="do not fsync each shard (faster; an OS crash may then lose the last shards)")
    ap.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    hdus = parse_hdus(args.hdus)

    def run():
        _report(pack(args.data, args.out, shard_size=args.shard_size, skip_bad=args.skip_bad, hdus=hdus,
                     val_fraction=args.val_fraction, seed=args.seed, allow_nonfinite=args.allow_nonfinite,
                     overwrite=args.overwrite, workers=args.workers, progress=args.progress, fsync=args.fsync,
                     log=log), args.out)

    def hint(exc):
        if isinstance(exc, DataError) and not args.skip_bad:
            return "(fix or remove the file and rerun to resume, or pass --skip-bad to skip bad files)"
        return None

    return run_command(run, (DataError, PackError, FileNotFoundError, PermissionError),
                       f"interrupted: the complete shards in {args.out} are kept; rerun the same command to resume",
                       hint)


def _report(m: dict, out: str) -> None:
    for name, info in m["splits"].items():
        log(f"{name}: {info['samples']} samples in {info['shards']} shard(s), {info['bytes'] / 2 ** 20:.1f} MB"
            + (f", {info['skipped']} bad file(s) skipped" if info["skipped"] else ""))
    if m["skipped"]:
        log("skipped:")
        for k in m["skipped"]:
            log(f"  {k['problem']}")
    run = m.get("run")
    if run and run["samples_packed_now"]:
        log(f"packed {run['samples_packed_now']} samples in {run['packing_seconds']:.1f} s "
            f"({run['samples_per_s']:.0f} samples/s, {run['mb_per_s']:.1f} MB/s) into {os.path.abspath(out)}")


if __name__ == "__main__":
    sys.exit(main())
