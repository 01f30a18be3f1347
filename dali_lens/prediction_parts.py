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
                                            for k in ("data", "split", "columns", "embeddings")
                                            if first.get(k) != rec.get(k)]
        if (first.get("shard") or {}).get("of") != place.get("of"):
            diffs.append(f"DATA held {first['shard'].get('of')} cutouts for part 0, {place.get('of')} for this part")
        if diffs:
            raise ShardError(f"{p}: written by another model, with other options or from other DATA than "
                             f"{os.path.basename(paths[0])} ({'; '.join(diffs)}); nothing was merged")
    merged = {k: v for k, v in first.items() if k != "shard"}
    merged["merged_shards"] = count
    return count, paths, merged


def write_empty(table, header: list[str]) -> None:
    """Leave the output of a part with no cutouts (and its record) for ``--merge``: a CSV with its header, or an
    empty Parquet part (``prediction_table``)."""
    if table.format == "csv":
        if not os.path.isfile(table.path):
            from .data.io import atomic_write_csv

            atomic_write_csv(table.path, header, [])
        return
    import pyarrow as pa

    table.write_part(pa.Table.from_batches([], table.schema))
