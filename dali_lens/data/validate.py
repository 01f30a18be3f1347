"""The one home of data scans and checks: what ``check`` reports, what ``pack`` and ``--skip-bad`` leave out,
and what the loaders refuse before a decoder sees the data.

* :func:`quick_problem` / :func:`quick_scan`: header-level checks without decoding (file present and not
  empty, image header, size, band count, end-of-image marker; ``.npy`` header and length).
* :func:`image_problem`: a strict check of one PNG/JPEG file's bytes: every PNG chunk's CRC, a full decode
  (Pillow, which raises instead of crashing on a corrupt data stream), and for JPEG the warnings libjpeg
  prints for corrupt entropy-coded data ("Corrupt JPEG data: bad Huffman code"), which every decoder
  (Pillow, torchvision, DALI) otherwise decodes silently into wrong pixels.
* :func:`scan` / :func:`find_problems` / :func:`drop_bad`: every sample read and checked (band count, size,
  NaN/inf), images strictly.
* :func:`validate`: what a loader runs once per dataset object (the result is cached, not redone per
  epoch or per loader): the strict scan for images, the header scan for ``.npy``.
* :func:`duplicates`: the same file listed twice, and files with identical content, within and across splits.
"""
from __future__ import annotations

import hashlib
import os
import threading
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .dataset import DataError, Dataset, Sample
from .readers import check_array, decode_image, npy_header, read_sample

_PIL_BANDS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "F": 1, "P": 3, "RGB": 3, "YCbCr": 3, "LA": 2, "RGBA": 4, "CMYK": 4}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"

# per-dataset results (problems, digests), keyed by the object's id and dropped with it: kept off the object so
# that they are not pickled into loader worker processes
_CACHE: dict[int, dict] = {}


def _cache(dataset: Dataset) -> dict:
    key = id(dataset)
    entry = _CACHE.get(key)
    if entry is None or entry["n"] != len(dataset):
        entry = _CACHE[key] = {"n": len(dataset)}
        weakref.finalize(dataset, _CACHE.pop, key, None)
    return entry


def _workers(workers: int | None) -> int:
    return workers or min(8, (os.cpu_count() or 1) * 2)


# ============================================================================================ header level

def quick_problem(dataset: Dataset, i: int) -> str | None:
    """Header-level check of one sample, without decoding it.

    Images: readable header, size, channel count, and the end-of-stream marker. ``.npy``: header shape and the
    file's full length. Every file of the sample must exist and not be empty.
    """
    s = dataset.samples[i]
    for f in s.files:
        try:
            if os.path.getsize(f) == 0:
                return f"{f}: empty file (0 bytes)"
        except OSError:
            return f"{f}: file not found"
    path = s.path
    size = os.path.getsize(path)
    if dataset.kind == "image":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                fmt, mode, (w, h) = im.format, im.mode, im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            return f"{path}: cannot decode image ({exc})"
        with open(path, "rb") as fh:
            fh.seek(max(0, size - 64))
            tail = fh.read()
        if fmt == "PNG" and not tail.endswith(_PNG_END):
            return f"{path}: truncated PNG (no end-of-image chunk)"
        if fmt == "JPEG" and b"\xff\xd9" not in tail[-32:]:
            return f"{path}: truncated JPEG (no end-of-image marker)"
        bands = _PIL_BANDS.get(mode)
        if bands != dataset.bands:
            return f"{path}: has {bands or mode} band(s), the dataset has {dataset.bands}"
        if dataset.shape is not None and (h, w) != tuple(dataset.shape):
            return (f"{path}: is {h}x{w} px, the dataset's images are {dataset.shape[0]}x{dataset.shape[1]} "
                    "(mixed sizes)")
    elif dataset.kind == "npy":
        try:  # the header only, then the file's length against what the header promises
            shape, dtype, _, offset = npy_header(path)
        except Exception as exc:
            return f"{path}: cannot read .npy (corrupt header: {exc})"
        need = offset + int(np.prod(shape)) * dtype.itemsize
        if size < need:
            return f"{path}: truncated .npy ({size} bytes, the header promises {need})"
        want = (dataset.bands, *dataset.shape) if dataset.shape else None
        if len(shape) == 2 and dataset.bands == 1:
            shape = (1, *shape)
        if want and tuple(shape) != want:
            return f"{path}: array shape {tuple(shape)}, the dataset's samples are {want}"
    return None


def quick_scan(dataset: Dataset, workers: int | None = None) -> dict[int, str]:
    """``{index: problem}`` from header-level checks of every sample (fast: no decoding)."""
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) * 4) if workers is None else workers) as pool:
        results = pool.map(lambda j: quick_problem(dataset, j), range(len(dataset)), chunksize=64)
        return {i: msg for i, msg in enumerate(results) if msg}


# ============================================================================================ strict image check

def png_chunk_problem(data: bytes) -> str | None:
    """The first structural problem of a PNG byte string: a chunk running past the end, a CRC mismatch, no
    IHDR first or no IEND last. Pillow does not check the CRCs of image data; libpng (DALI) does."""
    if not data.startswith(_PNG_SIG):
        return "not a PNG file"
    pos, n, first = len(_PNG_SIG), len(data), True
    while pos + 12 <= n:
        length = int.from_bytes(data[pos:pos + 4], "big")
        ctype = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > n:
            return f"truncated PNG ({ctype.decode('latin-1')} chunk runs past the end of the file)"
        crc = int.from_bytes(data[end - 4:end], "big")
        if zlib.crc32(data[pos + 4:end - 4]) != crc:
            return f"corrupt PNG ({ctype.decode('latin-1')} chunk at byte {pos}: CRC mismatch)"
        if first and ctype != b"IHDR":
            return "corrupt PNG (no IHDR chunk first)"
        first = False
        if ctype == b"IEND":
            return None
        pos = end
    return "truncated PNG (no end-of-image chunk)"


_STDERR_LOCK = threading.Lock()


class _LibjpegWarnings:
    """Collects what native code writes to file descriptor 2 while active (libjpeg prints its warnings about
    corrupt data there and carries on). One user at a time; text that is not a libjpeg warning is passed on."""

    def __enter__(self):
        import sys

        _STDERR_LOCK.acquire()
        try:
            sys.stderr.flush()
        except (AttributeError, OSError, ValueError):
            pass
        self._r, w = os.pipe()
        os.set_blocking(self._r, False)
        self._saved = os.dup(2)
        os.dup2(w, 2)
        os.close(w)
        self.text = ""
        return self

    def __exit__(self, *exc):
        try:
            os.dup2(self._saved, 2)
            chunks = []
            while True:
                try:
                    chunk = os.read(self._r, 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            text = b"".join(chunks).decode("utf-8", "replace")
            keep = [line for line in text.splitlines() if not _is_libjpeg_warning(line)]
            self.text = "; ".join(line.strip() for line in text.splitlines() if _is_libjpeg_warning(line))
            if keep:
                os.write(self._saved, ("\n".join(keep) + "\n").encode())
        finally:
            os.close(self._r)
            os.close(self._saved)
            _STDERR_LOCK.release()
        return False


def _is_libjpeg_warning(line: str) -> bool:
    return any(k in line for k in ("Corrupt JPEG data", "Premature end of JPEG", "Invalid JPEG", "Bogus ",
                                   "Warning: unknown JFIF", "Inconsistent progression", "Huffman"))


def image_problem(data: bytes, where: str, bands: int | None = None, shape=None) -> str | None:
    """A strict check of one encoded PNG/JPEG, decoded once: PNG chunk CRCs then a Pillow decode; JPEG through
    torchvision's libjpeg decoder with its corrupt-data warnings caught. Then the band count and size when
    given. None when the image is sound."""
    if not data:
        return f"{where}: empty file (0 bytes)"
    if data[:2] == b"\xff\xd8":
        if b"\xff\xd9" not in data[-32:]:
            return f"{where}: truncated JPEG (no end-of-image marker)"
        bad, size = _jpeg_decode(data)
        if bad:
            return f"{where}: corrupt JPEG data ({bad})"
    else:
        if data.startswith(_PNG_SIG):
            bad = png_chunk_problem(data)
            if bad:
                return f"{where}: {bad}"
        try:
            size = decode_image(data, where).shape
        except DataError as exc:
            return str(exc)
    if bands is not None and size[0] != bands:
        return f"{where}: has {size[0]} band(s), the dataset has {bands}"
    if shape is not None and tuple(size[1:]) != tuple(shape):
        return f"{where}: is {size[1]}x{size[2]} px, the dataset's images are {shape[0]}x{shape[1]} (mixed sizes)"
    return None


def _jpeg_decode(data: bytes) -> tuple[str, tuple[int, int, int] | None]:
    """(what is wrong with ``data`` as libjpeg decodes it: its error, or the warnings it prints about corrupt data
    and then decodes through, empty when sound; (bands, H, W) as ``readers.decode_image`` gives them)."""
    import torch
    import torchvision.io as tvio

    with _LibjpegWarnings() as cap:
        try:
            shape = tuple(tvio.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8)).shape)
        except (RuntimeError, ValueError) as exc:
            return str(exc).splitlines()[0].split(", ")[-1], None
    return cap.text, (3 if shape[0] == 4 else shape[0], *shape[1:])  # CMYK is read as RGB


# ============================================================================================ full scans

def _read_bytes(path: str) -> bytes | str:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return f"{path}: file not found"
    except OSError as exc:
        return f"{path}: cannot read ({exc})"


def _digest(parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _file_digest(sample: Sample) -> str | None:
    parts = []
    for f in sample.files:
        data = _read_bytes(f)
        if isinstance(data, str):
            return None
        parts.append(data)
    return _digest(parts)


def sample_problem(dataset: Dataset, i: int, allow_nonfinite: bool = False) -> tuple[str | None, str | None]:
    """(problem or None, content digest or None) of sample ``i``: read, strictly checked (images), checked for
    band count, size and NaN/inf."""
    s = dataset.samples[i]
    if dataset.kind == "image":
        data = _read_bytes(s.path)
        if isinstance(data, str):
            return data, None
        return image_problem(data, s.path, dataset.bands, dataset.shape), _digest([data])
    try:
        arr = read_sample(s, dataset, check=False)
        check_array(arr, s, dataset, allow_nonfinite=allow_nonfinite)
    except DataError as exc:
        return str(exc), None
    return None, None


def _run(dataset: Dataset, fn, workers: int | None, max_problems: int | None = None) -> dict[int, tuple]:
    out: dict[int, tuple] = {}
    found, chunk = 0, 256
    with ThreadPoolExecutor(_workers(workers)) as pool:
        for start in range(0, len(dataset), chunk):
            idx = range(start, min(start + chunk, len(dataset)))
            for i, r in zip(idx, pool.map(fn, idx)):
                out[i] = r
                found += bool(r[0])
            if max_problems and found >= max_problems:
                break
    return out


def scan(dataset: Dataset, allow_nonfinite: bool = False, workers: int | None = None,
         max_problems: int | None = None) -> dict[int, str]:
    """``{sample index: problem}`` for every bad sample (stops early after ``max_problems``). Images are checked
    strictly (see :func:`image_problem`); the result for images is cached with the dataset."""
    if dataset.kind == "image":
        return dict(_image_results(dataset, workers)[0])
    res = _run(dataset, lambda j: sample_problem(dataset, j, allow_nonfinite), workers, max_problems)
    return {i: r[0] for i, r in res.items() if r[0]}


def _image_results(dataset: Dataset, workers: int | None = None) -> tuple[dict[int, str], list]:
    """(problems, digests) of an image dataset: one strict pass over every file, cached per dataset object."""
    entry = _cache(dataset)
    if "image" not in entry:
        res = _run(dataset, lambda j: sample_problem(dataset, j), workers)
        entry["image"] = ({i: r[0] for i, r in res.items() if r[0]}, [res[i][1] for i in range(len(dataset))])
    return entry["image"]


def find_problems(dataset: Dataset, max_problems: int | None = None, allow_nonfinite: bool = False) -> list[str]:
    return list(scan(dataset, allow_nonfinite, max_problems=max_problems).values())


def drop_bad(dataset: Dataset, allow_nonfinite: bool = False, log=print) -> Dataset:
    """The dataset without its bad samples (unreadable, missing, corrupt, wrong bands/size, NaN/inf); reports
    how many and which were skipped. The kept subset counts as validated."""
    bad = scan(dataset, allow_nonfinite)
    if not bad:
        _cache(dataset)["valid"] = True
        return dataset
    log(f"skipping {len(bad)} bad sample(s) in {dataset.split}:")
    for msg in bad.values():
        log(f"  {msg}")
    keep = [i for i in range(len(dataset)) if i not in bad]
    if not keep:
        raise DataError(f"{dataset.root} ({dataset.split}): every sample is bad; nothing left to use")
    sub = dataset.subset(keep)
    entry = _cache(sub)
    entry["valid"] = True
    if "image" in _cache(dataset):
        digests = _cache(dataset)["image"][1]
        entry["image"] = ({}, [digests[i] for i in keep])
    return sub


def validate(dataset: Dataset) -> None:
    """Refuse data that decoders may crash on, decode silently into wrong pixels, or hang on, naming the files:
    images checked strictly (decoded once), ``.npy`` at header level, FITS for missing or empty files (astropy
    names a corrupt one when it reads it). Done once per dataset object."""
    entry = _cache(dataset)
    if entry.get("valid") or dataset.kind == "shards":  # packed: checked by pack, checksums by `check`
        return
    problems = _image_results(dataset)[0] if dataset.kind == "image" else quick_scan(dataset)
    if problems:
        listed = "; ".join(list(problems.values())[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DataError(f"bad input in {dataset.split} data: {listed}{more}. Run `python -m dali_lens.check` "
                        "for the full list, or skip bad samples (--skip-bad)")
    entry["valid"] = True


# ============================================================================================ duplicates

def digests(dataset: Dataset, workers: int | None = None) -> list[str | None]:
    """A content digest per sample (all of its files' bytes; None when unreadable), cached per dataset object.
    For images it comes from the strict scan, which is then cached too."""
    if dataset.kind == "image":
        return _image_results(dataset, workers)[1]
    entry = _cache(dataset)
    if "digests" not in entry:
        with ThreadPoolExecutor(_workers(workers)) as pool:
            entry["digests"] = list(pool.map(_file_digest, dataset.samples, chunksize=64))
    return entry["digests"]


def duplicates(splits: dict[str, Dataset], content: bool = True) -> list[str]:
    """Messages for samples listed twice (the same file) and, with ``content``, different files with identical
    bytes, within a split and across splits (a test file that is also a training file inflates test metrics)."""
    out: list[str] = []
    by_path: dict[tuple, list[str]] = {}
    for name, ds in splits.items():
        if ds.kind == "shards":
            continue
        for s in ds.samples:
            by_path.setdefault(s.files, []).append(name)
    for files, names in by_path.items():
        if len(names) > 1:
            where = f"{names.count(names[0])} times in {names[0]}" if len(set(names)) == 1 else \
                "in " + " and ".join(sorted(set(names)))
            out.append(f"{files[0]}: listed {len(names)} times ({where}): duplicate path")
    if not content:
        return out
    by_digest: dict[str, list[tuple[str, str]]] = {}
    for name, ds in splits.items():
        if ds.kind == "shards":
            continue
        seen = set()
        for s, d in zip(ds.samples, digests(ds)):
            if d is None or s.files in seen:
                continue
            seen.add(s.files)
            by_digest.setdefault(d, []).append((name, s.files[0]))
    for group in by_digest.values():
        paths = {p for _, p in group}
        if len(paths) > 1:
            names = sorted({n for n, _ in group})
            scope = f"within {names[0]}" if len(names) == 1 else "across " + " and ".join(names)
            listed = ", ".join(f"{p} ({n})" for n, p in sorted(group, key=lambda t: t[1])[:4])
            out.append(f"identical content {scope}: {listed}" + (" ..." if len(group) > 4 else ""))
    return out


def report_duplicates(splits: dict[str, Dataset], log=print) -> list[str]:
    """What ``train`` says about duplicates: one warning line each (at most 10), then a hint; returns them."""
    found = duplicates(splits)
    for msg in found[:10]:
        log(f"warning: {msg}")
    if found:
        more = f" ({len(found) - 10} more)" if len(found) > 10 else ""
        log(f"warning: {len(found)} duplicate(s) in the data{more}; duplicates across splits inflate validation "
            "and test metrics. `python -m dali_lens.check DATA` lists them all")
    return found
