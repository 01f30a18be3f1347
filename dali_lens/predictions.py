"""The predictions CSV a scoring run writes, and the run that writes it.

``predict_files`` is the typed core of ``python -m dali_lens.predict`` and of ``dali_lens.predict``: it scores
DATA with an ensemble of checkpoints into one CSV (``file,id,label,score[,score_<member>...,member_std]``),
batch by batch, resumable. The rest is the file's bookkeeping: its header (``header_for``), which existing
files it may append to (``check_own``), what wrote it (``OUT.meta.json``: ``provenance``/``check_provenance``),
resuming (``repair``, ``done_files``), per-rank part files and their merge (``part_path``, ``merge``). The
command's docstring (``dali_lens/predict.py``) says what a user sees.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import time

import numpy as np

from .cli import log
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



# ---------------------------------------------------------------------------------------------------------
# running


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def predict_files(checkpoint: list[str], data: list[str], out: str, *, split: str = "all", backend: str = "auto",
                  batch_size: int = 64, tta: bool = False, fusion: str | None = None, workers: int | None = None,
                  threads: int | None = None, hdus: str | None = None, skip_bad: bool = False,
                  limit: int | None = None, progress: bool = True, shard=None, embeddings: bool = False) -> int:
    """Score ``data`` with the ensemble of ``checkpoint`` into the CSV ``out`` (resumable; see
    ``python -m dali_lens.predict --help`` for every option). ``shard``: ``"I/N"`` (or ``(I, N)``) scores
    only part I of N of the inputs into its own file (``prediction_parts.shard_path``). Returns 0; raises
    DataError, PredictError, CheckpointError or BackendError on bad input."""
    from .pipelines import resolve_backend
    from .distributed import init as init_distributed

    if shard is not None:
        from .prediction_parts import parse_shard, shard_path

        shard = parse_shard(shard)  # before any work: a bad --shard is one line (a DataError)
    rank, world, _, device = init_distributed()
    main_rank = rank == 0
    say = log if main_rank else (lambda *a, **k: None)
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(out):
        raise PredictError(f"{out}: --out is a directory; give the CSV file to write")
    if shard is not None:
        out = shard_path(out, *shard)  # an output of its own: record, lock, resume
    resolve_backend(backend)  # a backend this machine lacks fails (BackendError) before anything is loaded
    with _lock_out(out, main_rank, world):
        return _predict_locked(checkpoint, data, out, split=split, backend=backend, batch_size=batch_size,
                               tta=tta, fusion=fusion, workers=workers, threads=threads, hdus=hdus,
                               skip_bad=skip_bad, limit=limit, progress=progress, rank=rank, world=world,
                               device=device, say=say, shard=shard, embeddings=embeddings)


def lock_path(out: str) -> str:
    """The lock a run holds on ``out`` (and its record and part files) for its whole duration."""
    return out + ".lock"


def _lock_out(out: str, main_rank: bool = True, world: int = 1):
    """Hold ``OUT.lock`` (rank 0, for every rank: the others stop alike) for the whole run: a second run onto
    the same ``--out`` stops at once, naming the first (pid, host)."""
    from .data.io import OutputLock, OutputLockedError

    lock = OutputLock(lock_path(out), lambda holder: (
        f"{out} is being written by another predict run ({holder}); wait for it to finish or stop it, or choose "
        "another --out"))
    failure: list = [None]
    if main_rank:
        try:
            lock.acquire()
        except OutputLockedError as exc:
            failure[0] = str(exc)
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise PredictError(failure[0])
    return lock


def _predict_locked(checkpoint, data, out, *, split, backend, batch_size, tta, fusion, workers, threads, hdus,
                    skip_bad, limit, progress, rank, world, device, say, shard=None, embeddings=False) -> int:
    from .score_inputs import load_scoring_inputs

    main_rank = rank == 0
    place: dict = {}
    ens, dataset, backend, _, hdus = load_scoring_inputs(checkpoint, data, split, backend=backend, threads=threads,
                                                         hdus=hdus, skip_bad=skip_bad, device=device, say=say,
                                                         select=_part_of(shard, place) if shard else None)
    fusion = fusion or ens.fusion
    header = header_for(ens.names)
    say(f"{ens.describe()}; fusion {fusion if len(ens.members) > 1 else 'n/a'}"
        + (", TTA x8" if tta else "") + f"; backend {backend} on {device}; {world} process(es)")
    now = provenance(ens, tta, data, split, hdus, fusion, header)
    if embeddings:
        from .embeddings import embedding_layout

        try:
            now["embeddings"] = embedding_layout(ens)
        except ValueError as exc:
            raise PredictError(f"--embeddings: {exc}") from None
    if shard:
        now["shard"] = dict(place, cutouts=len(dataset))
        say(f"--shard {shard[0]}/{shard[1]}: {len(dataset)} of the {place['of']} cutouts"
            + (f" ({place['tars']} tar shard(s))" if "tars" in place else "") + f", into {out}")
    _prepare_out(out, header, now, main_rank, world, say)
    if shard and main_rank and not os.path.isfile(out):  # an empty part too leaves its file for --merge
        from .data.io import atomic_write_csv

        atomic_write_csv(out, header, [])
    _barrier(world)
    remaining, total_left, already = _remaining(dataset, out, header, limit, world, say)
    if len(remaining) == 0:
        _nothing_to_score(out, header, total_left, len(dataset), main_rank, world, say)
        return 0
    say(f"{len(dataset)} cutouts, {already} already scored, {len(remaining)} to score now"
        + (f" (of {total_left} left)" if len(remaining) < total_left else ""))
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    t0 = time.perf_counter()
    written = _score_share(ens, dataset.subset(remaining), out, header, fusion, backend, rank, world,
                           dict(batch_size=batch_size, tta=tta, workers=workers), progress and main_rank,
                           now.get("embeddings"))
    _finish(out, header, written, time.perf_counter() - t0, total_left, main_rank, world, say)
    return 0


def _part_of(shard: tuple[int, int], place: dict):
    """The ``select`` of ``load_scoring_inputs`` for part ``shard`` = (I, N): the part's cutouts, its place
    (index, count, of = the cutouts of the whole DATA, tars) noted in ``place``."""
    def select(dataset):
        from .prediction_parts import part_positions

        pos = part_positions(dataset, *shard)
        place.update(index=shard[0], count=shard[1], of=len(dataset))
        if dataset.data_kind.packed:
            from .data.shards import split_member_path

            place["tars"] = len({split_member_path(dataset.samples[int(k)].path)[0] for k in pos})
        return dataset.subset(pos)
    return select


def _prepare_out(out: str, header: list[str], now: dict, main_rank: bool, world: int, say) -> None:
    """Check ``out`` and its parts (every rank, read-only: all stop alike), then repair them and write the
    record (rank 0 only); afterwards every rank reads the same state."""
    for p in [out] + find_parts(out):
        check_own(p, header)
    record = check_provenance(out, now, header)
    _barrier(world)
    if main_rank:
        from .data.io import atomic_write_json

        os.makedirs(os.path.dirname(out), exist_ok=True)
        if record:
            atomic_write_json(provenance_path(out), now)
        for p in [out] + find_parts(out):
            cut = repair(p)
            if cut:
                say(f"{p}: removed a truncated last line ({cut} bytes) left by an interruption")
            if now.get("embeddings") and os.path.isfile(p):
                from .embeddings import EmbeddingWriter

                with EmbeddingWriter(p, now["embeddings"]) as emb:
                    cut = emb.reconcile([f for f, _ in iter_rows(p, header)])
                if cut:
                    say(f"{p}: removed {cut} embedding row(s) of a batch an interruption left without scores")
    _barrier(world)


def _remaining(dataset, out: str, header: list[str], limit: int | None, world: int, say
               ) -> tuple[np.ndarray, int, int]:
    """``(positions still to score, at most limit of them; how many are left in all; how many are done)``."""
    done = done_files([out] + find_parts(out), header)
    _barrier(world)
    paths = {s.path for s in dataset.samples}
    extra, already = len(done - paths), len(done & paths)
    del paths
    # positions still to score, as one int64 array (a list of ints costs 36 bytes per cutout)
    remaining = np.fromiter((i for i, s in enumerate(dataset.samples) if s.path not in done), dtype=np.int64)
    del done
    total_left = len(remaining)
    if limit is not None:
        remaining = remaining[: max(0, limit)]
    if extra:
        say(f"note: {out} holds {extra} row(s) for files not in this DATA; they are kept")
    return remaining, total_left, already


def _nothing_to_score(out: str, header: list[str], total_left: int, n: int, main_rank: bool, world: int,
                      say) -> None:
    parts = find_parts(out)
    if main_rank and parts:
        n, k = merge(out, header)
        say(f"merged {k} part file(s) into {out}: {n} rows")
    elif total_left == 0:
        say(f"{out} is complete: all {n} cutouts are scored; nothing to do")
    else:
        say("--limit 0: nothing scored")
    _barrier(world)


def _score_share(ens, sub, out: str, header: list[str], fusion: str, backend: str, rank: int, world: int,
                 loader_kw: dict, show_progress: bool, embeddings: list[dict] | None = None) -> int:
    """Score this rank's share of ``sub`` into ``out`` (or its part file), flushed batch by batch, with the
    embeddings (``embeddings``: their layout) written just before each batch's rows; returns the rows
    written."""
    from .inference import loader_options, score_batches
    from .pipelines import build_loader
    from .pipelines.options import shard_bounds
    from .data.io import write_csv_rows

    target = out if world == 1 else part_path(out, rank, world)
    lo, hi = shard_bounds(len(sub), rank, world)
    if hi <= lo:
        return 0
    opts = loader_options(ens, loader_kw["batch_size"], loader_kw["tta"], shard_id=rank, num_shards=world,
                          workers=loader_kw["workers"])
    loader = build_loader(sub, backend=backend, options=opts)
    from tqdm import tqdm

    bar = tqdm(total=hi - lo, unit="img", desc="predict" if world == 1 else f"predict rank {rank}/{world}",
               disable=not show_progress, dynamic_ncols=True, smoothing=0.1)
    written = 0
    new = not os.path.isfile(target) or os.path.getsize(target) == 0
    from .embeddings import EmbeddingWriter

    emb = EmbeddingWriter(target, embeddings) if embeddings else None
    with open(target, "a", encoding="utf-8", newline="") as fh:
        if new:
            write_csv_rows(fh, [header])
            fh.flush()
        try:
            for idx, _, logits, *vectors in score_batches(ens, loader, embeddings=emb is not None):
                rows = _rows(ens, sub, idx, *ens.probabilities(logits, fusion))
                if emb is not None:
                    emb.append([(sub.samples[int(i)].path, sub.samples[int(i)].id) for i in idx], vectors[0])
                write_csv_rows(fh, rows)
                fh.flush()
                written += len(rows)
                bar.update(len(rows))
        finally:
            bar.close()
            fh.flush()
            os.fsync(fh.fileno())
            if emb is not None:
                emb.close()
    if written != hi - lo:
        raise RuntimeError(f"rank {rank}: the loader returned {written} of {hi - lo} cutouts")
    return written


def _rows(ens, sub, idx, score, probs, spread) -> list[list]:
    """The CSV rows of one scored batch (``idx``: positions in ``sub``)."""
    from .prediction_rows import prediction_row

    several = len(ens.members) > 1
    return [prediction_row(s.path, s.id, s.label, score[j], [probs[k][j] for k in ens.names] if several else (),
                           spread[j] if several else None)
            for j, s in ((j, sub.samples[int(i)]) for j, i in enumerate(idx))]


def _finish(out: str, header: list[str], written: int, seconds: float, total_left: int, main_rank: bool,
            world: int, say) -> None:
    """Every rank done: the counts gathered, the parts merged into ``out`` and the run summed up (rank 0)."""
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        counts = [None] * world
        dist.all_gather_object(counts, (written, seconds))
        written, seconds = sum(c[0] for c in counts), max(c[1] for c in counts)
    if main_rank:
        if find_parts(out):
            _, k = merge(out, header)
            say(f"merged {k} part file(s) into {out}")
        n = sum(1 for f, _ in iter_rows(out, header) if f)
        rate = written / max(seconds, 1e-9)
        left = total_left - written
        say(f"scored {written} cutouts in {seconds:.1f} s ({rate:.1f} img/s); {out} holds {n} rows"
            + (f"; {left} left (rerun to continue)" if left > 0 else ""))
    _barrier(world)


def merge_only(out: str) -> int:
    """Merge ``OUT.part-*-of-*.csv`` (torchrun ranks) or ``OUT.shard-I-of-N.csv`` (``--shard`` parts) into
    ``out`` (``--merge``)."""
    from .prediction_parts import find_shards

    out = os.path.abspath(os.path.expanduser(out))
    if find_shards(out):
        return _merge_shards(out)
    parts = find_parts(out)
    if not parts:
        if os.path.isfile(out):
            log(f"{out}: no part files to merge; left as it is")
            return 0
        raise PredictError(f"{out}: neither the file nor any {os.path.basename(out)}.part-*-of-*.csv or "
                           f"{os.path.basename(out)}.shard-*-of-* part exists")
    header = next((h for h in map(read_header, parts) if h is not None), None)
    if header is None:
        raise PredictError(f"{out}: nothing to merge (the part files hold no complete header)")
    with _lock_out(out):
        for p in [out] + parts:
            check_own(p, header)
        for p in [out] + parts:
            cut = repair(p)
            if cut:
                log(f"{p}: removed a truncated last row ({cut} bytes)")
        n, k = merge(out, header)
    log(f"merged {k} part file(s) into {out}: {n} rows")
    return 0


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
            or any(k not in saved for k in PROVENANCE_KEYS) or not isinstance(saved.get("checkpoints"), list) or not isinstance(saved.get("columns"), list)
            or not all(isinstance(c, dict) for c in saved["checkpoints"])):
        raise PredictError(f"{side}: not a record written by dali_lens.predict; nothing was merged")
    return saved


def _merge_shards(out: str) -> int:
    """``--merge`` of the ``--shard`` parts of ``out``: every part present, complete, disjoint and from the
    same model, options and DATA, else nothing changes; then ``out`` and its record are written atomically and
    the parts removed. Holds ``OUT.lock`` and each part's lock (a task still running stops the merge)."""
    from .prediction_parts import check_shards

    with _lock_out(out):
        count, paths, merged = check_shards(out, read_record, _differences)
        header = merged["columns"]
        locks = []
        try:
            for p in paths:
                locks.append(_lock_out(p))
                check_own(p, header)
            check_own(out, header)
            check_provenance(out, merged, header)  # OUT's rows (if any) from this model and these options
            if os.path.isfile(out) and os.path.getsize(out) > len(_header_line(header).encode()):
                if read_record(out).get("merged_shards") == count:
                    return _leftover_shards(out, header, paths)
                raise PredictError(f"{out}: already holds rows that are not a merge of these {count} parts; it is "
                                   "left untouched: choose another --out, or remove it and its .meta.json first")
            for p in paths:
                cut = repair(p)
                if cut:
                    log(f"{p}: removed a truncated last row ({cut} bytes)")

            def complete(src: str, n: int) -> None:
                place = read_record(src)["shard"]
                if n < int(place.get("cutouts", 0)):
                    raise PredictError(f"{src}: unfinished, {n} of its {place['cutouts']} rows (rerun its task, "
                                       f"--shard {place['index']}/{count}, to complete it); nothing was merged")

            from .data.io import atomic_write_json

            layout = merged.get("embeddings") or None
            counts = copy_rows(out, header, paths, disjoint=True, check=complete, embeddings=layout,
                               before_commit=lambda: atomic_write_json(provenance_path(out), merged))
            for p in paths:
                for f in [p, provenance_path(p)] + embedding_files(p, layout):
                    os.unlink(f)
        finally:
            for lock in locks:
                lock.release()
    log(f"merged {count} part file(s) into {out}: {sum(counts.values())} rows")
    return 0


def _leftover_shards(out: str, header: list[str], paths: list[str]) -> int:
    """Part files left behind by a merge that stopped after writing ``out``: removed when every row they hold
    is in ``out``."""
    done = done_files([out], header)
    for p in paths:
        if not done_files([p], header) <= done:
            raise PredictError(f"{out}: already the merge of {len(paths)} parts, but {p} holds rows that are not in "
                               "it; it is left untouched: choose another --out to merge these parts")
    layout = _recorded_layout(paths[0])
    for p in paths:
        for f in [p, provenance_path(p)] + embedding_files(p, layout):
            if os.path.exists(f):
                os.unlink(f)
    log(f"{out}: already merged; removed {len(paths)} part file(s) left behind by an interrupted merge")
    return 0
