"""The predictions CSV's bookkeeping (``predict``'s CSV output, ``prediction_table.CsvTable``): its header
(``header_for``), which existing files it may append to (``check_own``), what wrote it (``OUT.meta.json``:
``provenance``/``check_provenance``), resuming (``repair``, ``done_files``), per-rank part files and their merge
(``part_path``, ``merge``). Moved here from ``predictions.py`` unchanged, so that the table module and the run
both import it and neither imports the other.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re

from .embeddings import embedding_files, layout_of

class PredictError(ValueError):
    """Bad arguments or an output file that does not match this run."""


# ---------------------------------------------------------------------------------------------------------
# the output file(s)


def header_for(names: list[str]) -> list[str]:
    from .prediction_rows import prediction_header

    return prediction_header(names)


def _header_line(header: list[str]) -> str:
    from .data.io import write_csv_rows

    buf = io.StringIO(newline="")
    write_csv_rows(buf, [header])
    return buf.getvalue()


def check_own(path: str, header: list[str]) -> None:
    """Refuse, without touching it, an existing ``path`` that is not a predictions CSV with exactly ``header``.

    Only an empty file or one whose first line is this header may be repaired and appended to: anything else
    (a notes file, an image, another command's CSV, predictions with other columns) raises PredictError.
    """
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    want = _header_line(header).encode()
    with open(path, "rb") as fh:
        head = fh.read(max(len(want), 1 << 16))
    if head.startswith(want):
        return
    first = head.split(b"\n", 1)[0]
    try:
        found = _parse(first.decode("utf-8")) if first else []
    except (UnicodeDecodeError, csv.Error):
        found = None
    if found and found[:2] == ["file", "id"] and b"\n" in head:
        raise PredictError(f"{path}: its columns {found} differ from this run's {header} (written with other "
                           "checkpoints, or by an older dali-lens?); it is left untouched: choose another --out or "
                           "remove the file")
    raise PredictError(f"{path}: exists and is not a predictions CSV written by dali_lens.predict (its first line "
                       f"is not the header {','.join(header)}); it is left untouched: choose another --out")


PROVENANCE_KEYS = ("checkpoints", "fusion", "tta", "hdus")


def provenance_path(out: str) -> str:
    """The record of what wrote ``out`` (next to it)."""
    return out + ".meta.json"


def provenance(ens, tta: bool, data: list[str], split: str, hdus, fusion: str, header: list[str]) -> dict:
    """What determines the scores in ``out``: the checkpoints' contents and the scoring options (and, for
    information, the DATA and --split given; rows are keyed by file, so other DATA may be added)."""
    from .data.shards import file_sha256

    return {"written_by": "dali_lens.predict", "columns": header,
            "checkpoints": [{"sha256": file_sha256(p), "path": p} for p in ens.checkpoints],
            "fusion": fusion, "tta": bool(tta), "hdus": list(hdus) if hdus else None,
            "data": [os.path.abspath(os.path.expanduser(d)) for d in data], "split": split}


def _differences(saved: dict, now: dict) -> list[str]:
    diffs = []
    old_ck, new_ck = saved.get("checkpoints") or [], now["checkpoints"]
    if [c.get("sha256") for c in old_ck] != [c["sha256"] for c in new_ck]:
        def show(cks):
            return ", ".join(f"{c.get('path')} (sha256 {str(c.get('sha256'))[:12]})" for c in cks) or "none"

        diffs.append(f"checkpoints: {show(old_ck)} then, {show(new_ck)} now")
    for key in PROVENANCE_KEYS[1:]:
        if saved.get(key) != now[key]:
            diffs.append(f"--{key}: {saved.get(key)!r} then, {now[key]!r} now")
    if bool(saved.get("embeddings")) != bool(now.get("embeddings")):
        diffs.append(f"--embeddings: {bool(saved.get('embeddings'))} then, {bool(now.get('embeddings'))} now")
    elif saved.get("embeddings") != now.get("embeddings"):
        diffs.append(f"embeddings: {saved.get('embeddings')} then, {now.get('embeddings')} now")
    if (saved.get("shard") or None) != (now.get("shard") or None):  # a --shard part: the same part of the same DATA
        diffs.append(f"--shard part: {saved.get('shard')} then, {now.get('shard')} now (other DATA?)")
    return diffs


def check_provenance(out: str, now: dict, header: list[str]) -> bool:
    """Whether ``out``'s record must be written. Raises PredictError when ``out`` (or its part files) hold
    rows that another model or other options produced, or rows with no record, or when the record's name is
    taken by a file that is not one."""
    side = provenance_path(out)
    files = [p for p in [out] + find_parts(out) if os.path.isfile(p)]
    has_rows = any(os.path.getsize(p) > len(_header_line(header).encode()) for p in files)
    if os.path.exists(side):
        try:
            with open(side, encoding="utf-8") as fh:
                saved = json.load(fh)
        except (OSError, ValueError) as exc:
            raise PredictError(f"{side}: not a readable record of dali_lens.predict ({exc}); it is left "
                               "untouched: choose another --out") from None
        if not isinstance(saved, dict) or saved.get("written_by") != "dali_lens.predict":
            raise PredictError(f"{side}: exists and was not written by dali_lens.predict; it is left untouched: "
                               "choose another --out")
        if not has_rows:
            return saved != now
        diffs = _differences(saved, now)
        if diffs:
            raise PredictError(f"{out}: its rows were written by another model or with other options ("
                               + "; ".join(diffs) + "); nothing was changed: choose another --out, or remove "
                               f"{out} and {os.path.basename(side)} to score again")
        return False
    if has_rows:
        raise PredictError(f"{out}: holds rows but no record {os.path.basename(side)} of the checkpoints and "
                           "options that wrote them (an older dali-lens?), so they cannot be checked against this "
                           "run; it is left untouched: choose another --out, or remove the file to score again")
    return True


def part_path(out: str, rank: int, world: int) -> str:
    return f"{out}.part-{rank}-of-{world}.csv"


def find_parts(out: str) -> list[str]:
    """Existing part files of ``out`` (any world size), ordered by (world size, rank)."""
    directory, name = os.path.split(os.path.abspath(out))
    pat = re.compile(re.escape(name) + r"\.part-(\d+)-of-(\d+)\.csv$")
    found = []
    if os.path.isdir(directory):
        for entry in os.listdir(directory):
            m = pat.match(entry)
            if m:
                found.append((int(m.group(2)), int(m.group(1)), os.path.join(directory, entry)))
    return [p for _, _, p in sorted(found)]


def _records(path: str):
    """``(row, end offset)`` for every complete CSV record of ``path``, the header first; a record cut off by an
    interruption (no final newline, or inside a quoted cell) ends the file. Records may span lines (a newline
    inside a quoted cell), so the file is read with the csv module, never line by line. Raises PredictError for
    a damaged file."""
    state = {"pos": 0, "nl": True, "eof": False, "line": 0}
    with open(path, "rb") as fh:
        def lines():
            for raw in fh:
                state["pos"] += len(raw)
                state["nl"] = raw.endswith(b"\n")
                state["line"] += 1
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise PredictError(f"{path}, line {state['line']}: not UTF-8 text (a damaged file; remove it "
                                       "to start again)") from None
            state["eof"] = True

        reader = csv.reader(lines(), strict=True)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if state["eof"]:
                    return  # cut off inside a quoted cell
                raise PredictError(f"{path}, line {state['line']}: {exc} (a damaged file; remove it to start "
                                   "again)") from None
            if not state["nl"]:
                return  # cut off mid-line
            yield row, state["pos"]


def complete_length(path: str) -> int:
    """Bytes up to the end of the last complete record (what survives of a file cut off mid-row)."""
    end = 0
    for _, end in _records(path):
        pass
    return end


def repair(path: str) -> int:
    """Cut a truncated last row off ``path``; returns the number of bytes removed."""
    if not os.path.isfile(path):
        return 0
    size, keep = os.path.getsize(path), complete_length(path)
    if keep < size:
        os.truncate(path, keep)
    return size - keep


def _parse(line: str) -> list[str]:
    return next(csv.reader([line]))


def read_header(path: str) -> list[str] | None:
    """The header of a predictions CSV (None when it holds no complete one)."""
    return next((row for row, _ in _records(path)), None)


def iter_rows(path: str, header: list[str] | None):
    """``(file, row)`` for every complete row of a predictions CSV (a truncated last row is ignored); ``file``
    is the cell as written before ``to_cell`` (the scored file's path).

    Checks the header against ``header`` (when given) and that every row has the header's columns.
    """
    from .data.io import from_cell

    records = _records(path)
    first = next(records, None)
    if first is None:
        return  # empty, or only a truncated header
    found = first[0]
    if header is not None and found != header:
        raise PredictError(f"{path}: its columns {found} differ from this run's {header} (written with other "
                           "checkpoints?); choose another --out or remove the file")
    for k, (row, _) in enumerate(records, start=1):
        if len(row) != len(found):
            raise PredictError(f"{path}, row {k}: {len(row)} columns instead of {len(found)} "
                               "(a damaged file; remove it to start again)")
        yield from_cell(row[0]), row


def done_files(paths: list[str], header: list[str] | None) -> set[str]:
    done: set[str] = set()
    for p in paths:
        if os.path.isfile(p):
            done.update(f for f, _ in iter_rows(p, header) if f)
    return done


def copy_rows(out: str, header: list[str], sources: list[str], *, disjoint: bool = False, check=None,
              before_commit=None, embeddings: list[dict] | None = None) -> dict[str, int]:
    """Write ``out`` atomically: ``header``, then the rows of each of ``sources`` in turn, each file once.

    Returns the rows copied from each source. ``disjoint``: a file in two sources raises PredictError naming
    both (else the later row is dropped). ``check(source, rows)`` runs after each source and may raise;
    ``before_commit()`` just before ``out`` replaces its old self. ``embeddings`` (the record's layout): the
    sources' embedding files are copied alike, in the same row order. On any error ``out`` is left as it was.
    """
    from .data.io import atomic_open
    from .data.io import write_csv_rows

    seen: dict[str, int] = {}
    counts: dict[str, int] = {}
    emb = None
    if embeddings:
        from .embeddings import copy_embeddings

        emb = copy_embeddings(out, embeddings)
    try:
        with atomic_open(out, "w", newline="") as dst:
            write_csv_rows(dst, [header])
            for k, src in enumerate(sources):
                files, kept = [], []
                for j, (f, row) in enumerate(iter_rows(src, header)):
                    files.append(f)
                    if not f:
                        continue
                    if f in seen:
                        if disjoint:
                            raise PredictError(f"{src}: {f!r} is also in {sources[seen[f]]} (overlapping parts: "
                                               "scored from other DATA?); nothing was merged")
                        continue
                    seen[f] = k
                    kept.append(j)
                    write_csv_rows(dst, [row])
                counts[src] = len(kept)
                if emb is not None:
                    emb.source(src, files, kept)
                if check is not None:
                    check(src, len(kept))
            if emb is not None:
                emb.commit()
                emb = None
            if before_commit is not None:
                before_commit()
    finally:
        if emb is not None:
            emb.discard()
    return counts


def _recorded_layout(out: str) -> list[dict] | None:
    """The embedding layout in ``out``'s record (None: none, or no readable record)."""
    try:
        with open(provenance_path(out), encoding="utf-8") as fh:
            return layout_of(json.load(fh))
    except (OSError, ValueError):
        return None


def merge(out: str, header: list[str]) -> tuple[int, int]:
    """Merge ``out`` and its part files into ``out`` atomically (each file once); removes the parts.

    Returns (rows in ``out`` afterwards, part files merged). Rows are copied as they are: rows already in
    ``out`` first, then the parts by (world size, rank).
    """
    parts = find_parts(out)
    if not parts:
        n = sum(1 for f, _ in iter_rows(out, header) if f) if os.path.isfile(out) else 0
        return n, 0
    layout = _recorded_layout(out)
    counts = copy_rows(out, header, ([out] if os.path.isfile(out) else []) + parts, embeddings=layout)
    for p in parts:
        for f in [p] + embedding_files(p, layout):
            os.unlink(f)
    return sum(counts.values()), len(parts)


def read_record(path: str) -> dict:
    """The record (``.meta.json``) that ``predict`` wrote for the output ``path``; PredictError naming it when
    it is missing or is not one."""
    side = provenance_path(path)
    try:
        with open(side, encoding="utf-8") as fh:
            saved = json.load(fh)
    except (OSError, ValueError) as exc:
        raise PredictError(f"{side}: the record of {os.path.basename(path)} is missing or unreadable ({exc}); "
                           "rerun its task to write it") from None
    if (not isinstance(saved, dict) or saved.get("written_by") != "dali_lens.predict"
            or any(k not in saved for k in PROVENANCE_KEYS) or not isinstance(saved.get("checkpoints"), list)
            or not isinstance(saved.get("columns"), list) or not all(isinstance(c, dict) for c in saved["checkpoints"])):
        raise PredictError(f"{side}: not a record written by dali_lens.predict; nothing was merged")
    return saved
