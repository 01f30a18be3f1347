"""The one home of data scans and checks: what ``check`` reports, what ``pack`` and ``--skip-bad`` leave out,
and what the loaders refuse before a decoder sees the data.

* :func:`quick_problem` / :func:`quick_scan`: header-level checks without decoding (file present and not
  empty, image header, size, band count, end-of-image marker; ``.npy`` header and length).
* the checks themselves belong to the data kinds (``data/kinds/``): ``Kind.quick_problem`` (header level) and
  ``Kind.sample_problem`` (in full; images: ``kinds.image.image_problem``, every PNG chunk's CRC, a full
  decode, libjpeg's warnings about corrupt data that decoders otherwise decode silently into wrong pixels).
* :func:`scan` / :func:`find_problems` / :func:`drop_bad`: every sample read and checked (band count, size,
  NaN/inf), images strictly.
* :func:`validate`: what a loader runs once per dataset object (the result is cached, not redone per
  epoch or per loader): the strict scan for images, the header scan for ``.npy``.
* :func:`duplicates`: the same file listed twice, and files with identical content, within and across splits.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

from .dataset import DataError, Dataset, Sample, dataset_cache


def _cache(dataset: Dataset) -> dict:
    """Per-dataset results (problems, digests, validated), kept off the object (``dataset_cache``)."""
    return dataset_cache(dataset, __name__)


def _workers(workers: int | None) -> int:
    return workers or min(8, (os.cpu_count() or 1) * 2)


# ============================================================================================ header level

def quick_problem(dataset: Dataset, i: int) -> str | None:
    """Header-level check of one sample, without decoding it: every file of the sample must exist and not be
    empty, then its kind's ``quick_problem`` (images: readable header, size, channel count, end-of-stream
    marker; ``.npy``: header shape and the file's full length)."""
    s = dataset.samples[i]
    for f in s.files:
        try:
            if os.path.getsize(f) == 0:
                return f"{f}: empty file (0 bytes)"
        except OSError:
            return f"{f}: file not found"
    return dataset.data_kind.quick_problem(dataset, i, s.path, os.path.getsize(s.path))


def quick_scan(dataset: Dataset, workers: int | None = None) -> dict[int, str]:
    """``{index: problem}`` from header-level checks of every sample (fast: no decoding)."""
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) * 4) if workers is None else workers) as pool:
        results = pool.map(lambda j: quick_problem(dataset, j), range(len(dataset)), chunksize=64)
        return {i: msg for i, msg in enumerate(results) if msg}


# ============================================================================================ full scans

def _read_bytes(path: str) -> bytes | str:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return f"{path}: file not found"
    except OSError as exc:
        return f"{path}: cannot read ({exc})"


def content_digest(parts) -> str:
    """A digest of byte strings (a sample's files), for finding identical content."""
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
    return content_digest(parts)


def sample_problem(dataset: Dataset, i: int, allow_nonfinite: bool = False) -> tuple[str | None, str | None]:
    """(problem or None, content digest or None) of sample ``i``: read and checked by its kind (images strictly),
    for band count, size and NaN/inf."""
    return dataset.data_kind.sample_problem(dataset, i, allow_nonfinite)


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
    strictly (``kinds.image.image_problem``; kinds with ``strict_check``); that result is cached with the dataset."""
    if dataset.data_kind.strict_check:
        return dict(_strict_results(dataset, workers)[0])
    res = _run(dataset, lambda j: sample_problem(dataset, j, allow_nonfinite), workers, max_problems)
    return {i: r[0] for i, r in res.items() if r[0]}


def _strict_results(dataset: Dataset, workers: int | None = None) -> tuple[dict[int, str], list]:
    """(problems, digests) of a dataset whose kind has ``strict_check`` (images): one strict pass over every
    file, cached per dataset object."""
    entry = _cache(dataset)
    if "strict" not in entry:
        res = _run(dataset, lambda j: sample_problem(dataset, j), workers)
        entry["strict"] = ({i: r[0] for i, r in res.items() if r[0]}, [res[i][1] for i in range(len(dataset))])
    return entry["strict"]


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
    if "strict" in _cache(dataset):
        digests = _cache(dataset)["strict"][1]
        entry["strict"] = ({}, [digests[i] for i in keep])
    return sub


def validate(dataset: Dataset) -> None:
    """Refuse data that decoders may crash on, decode silently into wrong pixels, or hang on, naming the files:
    images checked strictly (decoded once), ``.npy`` at header level, FITS for missing or empty files (astropy
    names a corrupt one when it reads it). Done once per dataset object."""
    entry = _cache(dataset)
    if entry.get("valid") or dataset.data_kind.packed:  # packed: checked by pack, checksums by `check`
        return
    problems = _strict_results(dataset)[0] if dataset.data_kind.strict_check else quick_scan(dataset)
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
    if dataset.data_kind.strict_check:
        return _strict_results(dataset, workers)[1]
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
        if ds.data_kind.packed:
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
        if ds.data_kind.packed:
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
