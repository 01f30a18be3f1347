"""Job-array parts of a predictions output: ``predict --shard I/N`` and the checks ``predict --merge`` makes.

A part is the I-th of N deterministic, disjoint pieces of the inputs (:func:`part_positions`), scored by an
independent process (a Slurm array task: no process group, no rendezvous) into its own file next to ``OUT``,
:func:`shard_path` (``OUT.shard-007-of-100.csv``). That file is an ordinary predictions output with its own
record (``.meta.json``, which also holds the part's place: ``shard``), lock and resume; ``predict --merge``
joins the N of them into ``OUT`` (``predictions.merge_only``) once :func:`check_shards` has found every one
present, complete, disjoint and written by the same model with the same options.

Loose files are cut into contiguous ranges of the input order (sizes differ by at most one cutout); packed
data (``python -m dali_lens.pack``) is cut at its tar shards: each part holds whole tars, contiguous in the
packed order, balanced by their cutout counts (a tar goes to the part its middle cutout falls in), so every
task reads its own tars and no tar is read twice.
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

__all__ = ["parse_shard", "part_positions", "shard_path", "find_shards", "check_shards", "write_empty"]


from .data.dataset import DataError


class ShardError(DataError):
    """A bad --shard, or part files that cannot be merged (the message names the file or option)."""


def parse_shard(value) -> tuple[int, int]:
    """``(I, N)`` from ``--shard I/N`` (text or a pair); ShardError naming the option when it is not one."""
    from .choices import SHARD

    try:
        return SHARD.parse(value)
    except ValueError as exc:
        raise ShardError(f"--shard must be {SHARD.describe}, got {value!r} ({exc})") from None


def _tar_groups(dataset) -> list[np.ndarray]:
    """The dataset positions of each tar shard of a packed dataset, tars in first-seen order."""
    from .data.shards import split_member_path

    fast = getattr(dataset.samples, "shard_numbers", None)  # a packed listing: its shard numbers, no path built
    if fast is not None:
        tar = fast()[1]
        order = np.argsort(tar, kind="stable")
        cuts = np.flatnonzero(np.diff(tar[order])) + 1
        return sorted(np.split(order, cuts), key=lambda g: int(g[0])) if len(order) else []
    groups: dict[str, list[int]] = {}
    for k, s in enumerate(dataset.samples):
        groups.setdefault(split_member_path(s.path)[0], []).append(k)
    return [np.asarray(g, dtype=np.int64) for g in groups.values()]


def part_positions(dataset, index: int, count: int) -> np.ndarray:
    """Positions in ``dataset`` of part ``index`` of ``count`` (sorted): contiguous ranges of the input order
    for loose files, whole tar shards balanced by cutouts for packed data. The same for every process that
    reads the same DATA, and the N parts cover every position exactly once."""
    n = len(dataset)
    if not dataset.data_kind.packed:
        from .pipelines.options import shard_bounds

        lo, hi = shard_bounds(n, index, count)
        return np.arange(lo, hi, dtype=np.int64)
    groups = _tar_groups(dataset)
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    middle = np.cumsum(sizes) - sizes / 2.0          # each tar's middle cutout in the whole order
    owner = np.minimum((middle * count / max(n, 1)).astype(np.int64), count - 1)
    mine = [g for g, o in zip(groups, owner) if o == index]
    return np.sort(np.concatenate(mine)) if mine else np.empty(0, dtype=np.int64)


def shard_path(out: str, index: int, count: int) -> str:
    """Part ``index`` of ``count``'s file: ``OUT.shard-<I>-of-<N><ext>`` (I zero-padded to N's digits, ext
    OUT's own, .csv by default), next to ``OUT``."""
    ext = os.path.splitext(out)[1] or ".csv"
    return f"{out}.shard-{index:0{len(str(count))}d}-of-{count}{ext}"


def find_shards(out: str) -> dict[int, dict[int, str]]:
    """``{N: {I: path}}`` for every existing ``OUT.shard-I-of-N*`` file."""
    directory, name = os.path.split(os.path.abspath(out))
    ext = os.path.splitext(out)[1] or ".csv"
    pat = re.compile(re.escape(name) + r"\.shard-(\d+)-of-(\d+)" + re.escape(ext) + "$")
    found: dict[int, dict[int, str]] = {}
    if os.path.isdir(directory):
        for entry in sorted(os.listdir(directory)):
            m = pat.match(entry)
            if m:
                found.setdefault(int(m.group(2)), {})[int(m.group(1))] = os.path.join(directory, entry)
    return found


def _numbers(indices) -> str:
    indices = sorted(indices)
    return ", ".join(map(str, indices[:20])) + (" ..." if len(indices) > 20 else "")


def check_shards(out: str, records, differences) -> tuple[int, list[str], dict]:
    """The N part files to merge into ``out``, in order, and the record the merge gives ``out``.

    ``records(path)``: a part file's record (its ``.meta.json``, checked to be one); ``differences(a, b)``:
    what differs between two records' checkpoints and options (``predictions._differences``). Raises ShardError naming
    the files when parts of several --shard counts are present, one is missing, holds no record of its part or
    another part's, or was written by another model, with other options or from other DATA than part 0. (That
    each part is complete and that no cutout is in two parts, the merge checks as it copies the rows.)
    """
    found = find_shards(out)
    if len(found) > 1:
        raise ShardError(f"{out}: part files of several --shard counts ({', '.join(f'N={n}' for n in sorted(found))}"
                         "): merge one job array at a time (move the others away)")
    (count, parts), = found.items()
    missing = [i for i in range(count) if i not in parts]
    if missing:
        raise ShardError(f"{out}: part(s) {_numbers(missing)} of {count} are missing "
                         f"({os.path.basename(shard_path(out, missing[0], count))} ...): run those tasks "
                         f"(--shard {missing[0]}/{count} ...) first")
    paths = [parts[i] for i in range(count)]
    first = records(paths[0])
    for i, p in enumerate(paths):
        rec = records(p)
        place = rec.get("shard") or {}
        if place.get("index") != i or place.get("count") != count:
            raise ShardError(f"{p}: its record {os.path.basename(p)}.meta.json is not that of part {i}/{count}")
        diffs = differences(dict(first, shard=None), dict(rec, shard=None)) + [f"{k}: {first.get(k)!r} in part 0, {rec.get(k)!r} here"
                                            for k in ("data", "split", "columns", "embeddings", "top")
                                            if first.get(k) != rec.get(k)]
        if (first.get("shard") or {}).get("of") != place.get("of"):
            diffs.append(f"DATA held {first['shard'].get('of')} cutouts for part 0, {place.get('of')} for this part")
        if diffs:
            raise ShardError(f"{p}: written by another model, with other options or from other DATA than "
                             f"{os.path.basename(paths[0])} ({'; '.join(diffs)}); nothing was merged")
    merged = {k: v for k, v in first.items() if k != "shard"}
    merged.update(merged_shards=count, shard_of=(first.get("shard") or {}).get("of"))
    return count, paths, merged


def write_empty(table, header: list[str]) -> None:
    """Make sure a part's output exists with its record even before (or without: a part with no cutouts) its
    first rows, for ``--merge``: a CSV with its header, or an empty Parquet part file."""
    if table.format == "csv":
        if not os.path.isfile(table.path):
            from .data.io import atomic_write_csv

            atomic_write_csv(table.path, header, [])
        return
    if table.parts():
        return
    import pyarrow as pa

    extra = {"scored": 0, "covers": [], "covers_sum": 0, "replaces": []} if table.top else None
    table.write_part(pa.Table.from_batches([], table.schema), extra_meta=extra)


# ---------------------------------------------------------------------------------------------------------
# Parquet parts (each part is a folder of Parquet files; its record is in their schema metadata)


def parquet_record(path: str) -> dict:
    """A Parquet part's record: the provenance in its (first live) part file's metadata, with ``top``."""
    from .prediction_table import live_parts, part_meta

    files = live_parts(path)[0] if os.path.isdir(path) else []
    if not files:
        raise ShardError(f"{path}: holds no Parquet part files (its task has not written any yet: rerun it)")
    meta = part_meta(files[0])[0]
    rec = meta.get("provenance")
    if not isinstance(rec, dict) or not isinstance(rec.get("checkpoints"), list) or "columns" not in rec:
        raise ShardError(f"{files[0]}: its record holds no provenance of dali_lens.predict; nothing was merged")
    return dict(rec, top=meta.get("top"))


def merge_parquet(out: str, count: int, paths: list[str], merged: dict, log) -> int:
    """Join the Parquet parts ``paths`` (checked by :func:`check_shards`) into the folder ``out``: written as a
    temporary folder renamed to ``out``, then the parts removed. Each part must hold all its cutouts
    (``--top`` parts: have scored them all) and no file twice across parts; ``--top`` parts are reduced to the
    K best of them all (``prediction_table.merge_top``). ``out`` must not exist, unless it is this merge
    already done (then left-over parts whose rows it holds are removed)."""
    import shutil

    import pyarrow.parquet as pq

    from .prediction_table import ParquetTable, live_parts, merge_top, part_meta

    if os.path.lexists(out):
        return _parquet_leftovers(out, count, paths, log)
    seen: dict[str, int] = {}
    top = merged.get("top")
    for i, p in enumerate(paths):
        files = live_parts(p)[0]
        metas = [part_meta(f)[0] for f in files]
        rows = sum(int(m.get("scored") if top else m.get("rows") or 0) for m in metas)
        if rows < int(merged_place(p).get("cutouts", 0)):
            raise ShardError(f"{p}: unfinished, {rows} of its {merged_place(p)['cutouts']} "
                             f"{'cutouts scored' if top else 'rows'} (rerun its task, --shard {i}/{count}, to "
                             "complete it); nothing was merged")
        for f in files:
            for name in pq.read_table(f, columns=["file"]).column(0).to_pylist():
                if name in seen:
                    raise ShardError(f"{p}: {name!r} is also in {paths[seen[name]]} (overlapping parts: scored from "
                                     "other DATA?); nothing was merged")
                seen[name] = i
    tmp = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.merging-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        dest = ParquetTable(tmp, merged["columns"])
        dest.now, dest.top = {k: v for k, v in merged.items() if k != "top"}, top
        if top:  # the K best of all; covering the whole DATA when no part dropped bad files
            best = merge_top(paths, top)
            meta = json.loads(best.schema.metadata[b"dali_lens"])
            whole = (merged.get("shard_of") is not None
                     and sum(int(merged_place(p).get("cutouts", 0)) for p in paths) == merged["shard_of"])
            dest.write_part(best.replace_schema_metadata(None), extra_meta={
                "scored": meta["scored"], "histogram": meta["histogram"], "replaces": [],
                "covers": [[0, merged["shard_of"]]] if whole else [], "covers_sum": meta["covers_sum"] if whole else 0})
        else:
            for p in paths:
                for f in live_parts(p)[0]:
                    dest.write_part(pq.read_table(f).replace_schema_metadata(None))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for p in paths:
        shutil.rmtree(p)
    log(f"merged {count} part(s) into {out}: " + (f"the {top} best rows" if top else f"{len(seen)} rows"))
    return 0


def merged_place(path: str) -> dict:
    return parquet_record(path).get("shard") or {}


def _parquet_leftovers(out: str, count: int, paths: list[str], log) -> int:
    import shutil

    from .prediction_table import live_parts, part_meta, read_table

    files = live_parts(out)[0] if os.path.isdir(out) else []
    if not files or (part_meta(files[0])[0].get("provenance") or {}).get("merged_shards") != count:
        raise ShardError(f"{out}: already exists and is not a merge of these {count} parts; it is left untouched: "
                         "choose another --out, or remove it first")
    done = set(read_table(out, ["file"]).column(0).to_pylist())
    for p in paths:
        if not set(read_table(p, ["file"]).column(0).to_pylist()) <= done:
            raise ShardError(f"{out}: already the merge of {count} parts, but {p} holds rows that are not in it; it "
                             "is left untouched: choose another --out to merge these parts")
    for p in paths:
        shutil.rmtree(p)
    log(f"{out}: already merged; removed {len(paths)} part(s) left behind by an interrupted merge")
    return 0
