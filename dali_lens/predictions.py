"""The predictions CSV a scoring run writes, and the run that writes it.

``predict_files`` is the typed core of ``python -m dali_lens.predict`` and of ``dali_lens.predict``: it scores
DATA with an ensemble of checkpoints into one CSV (``file,id,label,score[,score_<member>...,member_std]``) or
Parquet output, batch by batch, resumable, through ``prediction_table`` (the output formats). The CSV's
bookkeeping (header, own-file check, ``OUT.meta.json``, repair, parts, merge) is in ``prediction_csv`` and its
names are re-exported here. The command's docstring (``dali_lens/predict.py``) says what a user sees.
"""
from __future__ import annotations

import gc
import os
import time

import numpy as np

from .cli import log
from .embeddings import embedding_files
from .prediction_csv import (PROVENANCE_KEYS, PredictError, _differences, _header_line,  # noqa: F401
                             _recorded_layout, check_own, check_provenance, complete_length, copy_rows, done_files,
                             find_parts, header_for, iter_rows, merge, part_path, provenance, provenance_path,
                             read_header, read_record, repair)


# ---------------------------------------------------------------------------------------------------------
# running


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def predict_files(checkpoint: list[str], data: list[str], out: str, *, split: str = "all", backend: str = "auto",
                  batch_size: int = 64, tta: bool = False, fusion: str | None = None, workers: int | None = None,
                  threads: int | None = None, hdus: str | None = None, skip_bad: bool = False,
                  limit: int | None = None, progress: bool = True, top: int | None = None, shard=None,
                  embeddings: bool = False) -> int:
    """Score ``data`` with the ensemble of ``checkpoint`` into ``out``, a CSV or (``.parquet``) a folder of Parquet
    parts (resumable; ``top``: keep only the K best rows; see ``python -m dali_lens.predict --help`` for every
    option). ``shard``: ``"I/N"`` (or ``(I, N)``) scores only part I of N of the inputs into its own output
    (``prediction_parts.shard_path``); ``embeddings``: also each member's pooled features (``embeddings.py``).
    Returns 0; raises DataError, PredictError, CheckpointError or BackendError on bad input."""
    from .pipelines import resolve_backend
    from .distributed import init as init_distributed

    if shard is not None:
        from .prediction_parts import parse_shard, shard_path

        shard = parse_shard(shard)  # before any work: a bad --shard is one line (a DataError)
    rank, world, _, device = init_distributed()
    main_rank = rank == 0
    say = log if main_rank else (lambda *a, **k: None)
    out = os.path.abspath(os.path.expanduser(out))
    from .choices import COUNT
    from .prediction_table import is_parquet

    if os.path.isdir(out) and not is_parquet(out):
        raise PredictError(f"{out}: --out is a directory; give the CSV (or .parquet) file to write")
    COUNT.check("--top", top)
    if top and not is_parquet(out):
        raise PredictError(f"--top {top}: needs a Parquet --out (OUT.parquet), got {out}")
    if shard is not None:
        out = shard_path(out, *shard)  # an output of its own: record, lock, resume
    resolve_backend(backend)  # a backend this machine lacks fails (BackendError) before anything is loaded
    with _lock_out(out, main_rank, world):
        return _predict_locked(checkpoint, data, out, split=split, backend=backend, batch_size=batch_size,
                               tta=tta, fusion=fusion, workers=workers, threads=threads, hdus=hdus,
                               skip_bad=skip_bad, limit=limit, progress=progress, rank=rank, world=world,
                               device=device, say=say, top=top, shard=shard, embeddings=embeddings)


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
                    skip_bad, limit, progress, rank, world, device, say, top=None, shard=None,
                    embeddings=False) -> int:
    from .prediction_table import open_table
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
        from .embeddings import embedding_layout, parquet_fields

        try:
            now["embeddings"] = embedding_layout(ens)
        except ValueError as exc:
            raise PredictError(f"--embeddings: {exc}") from None
    if shard:
        now["shard"] = dict(place, cutouts=len(dataset))
        say(f"--shard {shard[0]}/{shard[1]}: {len(dataset)} of the {place['of']} cutouts"
            + (f" ({place['tars']} tar shard(s))" if "tars" in place else "") + f", into {out}")
    table = open_table(out, header, dataset.samples, say, top=top,
                       extra_fields=parquet_fields(now["embeddings"]) if embeddings else ())
    _prepare_out(table, now, main_rank, world, say)
    if shard and main_rank:  # an empty part too leaves its output (and record) for --merge
        from .prediction_parts import write_empty

        write_empty(table, header)
    _barrier(world)
    remaining, total_left, already = _remaining(dataset, table, limit, world, say)
    if len(remaining) == 0:
        _nothing_to_score(table, total_left, len(dataset), main_rank, world, say)
        return 0
    say(f"{len(dataset)} cutouts, {already} already scored, {len(remaining)} to score now"
        + (f" (of {total_left} left)" if len(remaining) < total_left else ""))
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    t0 = time.perf_counter()
    whole = len(remaining) == len(dataset)  # (a fresh run: no copy of the listing)
    written = _score_share(ens, dataset if whole else dataset.subset(remaining), table, fusion, backend, rank, world,
                           dict(batch_size=batch_size, tta=tta, workers=workers), progress and main_rank, remaining,
                           now.get("embeddings"))
    _finish(table, written, time.perf_counter() - t0, total_left, main_rank, world, say)
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

            fast = getattr(dataset.samples, "shard_numbers", None)
            place["tars"] = (len(np.unique(fast()[1][pos])) if fast is not None
                             else len({split_member_path(dataset.samples[int(k)].path)[0] for k in pos}))
        return dataset.subset(pos)
    return select


def _prepare_out(table, now: dict, main_rank: bool, world: int, say) -> None:
    """Check the output ``table`` (``prediction_table``; every rank, read-only: all stop alike), then repair it and
    write the record (rank 0 only), cutting a CSV's embeddings back to its rows; afterwards every rank reads the
    same state."""
    record = table.check(now)
    _barrier(world)
    if main_rank:
        table.prepare(now, record, say)
        if now.get("embeddings") and table.format == "csv":
            from .embeddings import EmbeddingWriter

            for p in [table.path] + find_parts(table.path):
                if os.path.isfile(p):
                    with EmbeddingWriter(p, now["embeddings"]) as emb:
                        cut = emb.reconcile([f for f, _ in iter_rows(p, table.header)])
                    if cut:
                        say(f"{p}: removed {cut} embedding row(s) of a batch an interruption left without scores")
    _barrier(world)


def _remaining(dataset, table, limit: int | None, world: int, say) -> tuple[np.ndarray | range, int, int]:
    """``(positions still to score, at most limit of them; how many are left in all; how many are done)``; the
    positions are a ``range`` when nothing is done yet (a fresh run: no array of every position)."""
    done = table.done_files()
    _barrier(world)
    n = len(dataset)
    if done:
        # positions still to score, as one int64 array (a list of ints costs 36 bytes per cutout); DATA's paths
        # are unique (gather_inputs), so the done ones not among them are the rows for other files
        hit = np.fromiter((s.path in done for s in dataset.samples), dtype=bool, count=n)
        already = int(hit.sum())
        extra = len(done) - already
        remaining = np.flatnonzero(~hit).astype(np.int64)
        del done, hit
    else:
        already, extra, remaining = 0, 0, range(n)
    total_left = len(remaining)
    if limit is not None:
        remaining = remaining[: max(0, limit)]
    if extra:
        say(f"note: {table.path} holds {extra} row(s) for files not in this DATA; they are kept")
    return remaining, total_left, already


def _nothing_to_score(table, total_left: int, n: int, main_rank: bool, world: int, say) -> None:
    out = table.path
    if main_rank and table.pending_parts():
        n, k = table.merge()
        say(f"merged {k} part file(s) into {out}: {n} rows")
    elif total_left == 0:
        say(f"{out} is complete: all {n} cutouts are scored; nothing to do")
    else:
        say("--limit 0: nothing scored")
    _barrier(world)


#: predict scores its inputs in consecutive chunks of at most this many cutouts, one loader each, so that what a
#: loader holds per cutout (DALI's reader index, the shard plan, the file lists) stays bounded whatever the number
#: of cutouts: peak memory is flat from about this many cutouts on (``benchmarks/bench_predict_parquet.py``)
SCORE_CHUNK = 1 << 17


def _release_memory() -> None:
    """Free what is left in reference cycles (``gc.collect``), then hand the freed heap memory back to the system
    (glibc's ``malloc_trim``; nothing elsewhere), so that the next loader does not add to the peak the freed
    pages still count in."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def score_chunks(dataset, size: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` of the consecutive chunks ``dataset`` is scored in, each at most ``size`` (default
    :data:`SCORE_CHUNK`) cutouts: as few as that allows, balanced, for loose files; for a packed set whole tar
    shards (so each reader uses the shard's own index), consecutive ones together up to ``size``, a shard
    larger than that in balanced pieces."""
    from .pipelines.options import shard_bounds

    n, size = len(dataset), int(size or SCORE_CHUNK)

    def pieces(a: int, b: int) -> list[tuple[int, int]]:
        k = max(1, -(-(b - a) // size))
        return [(a + lo, a + hi) for lo, hi in (shard_bounds(b - a, i, k) for i in range(k))]

    runs = getattr(dataset.samples, "shard_runs", None)  # a packed listing's runs of samples in one shard
    if runs is None or n <= size:
        return pieces(0, n)
    out: list[tuple[int, int]] = []
    cur = None
    for a, b in runs():
        if cur is not None and b - cur[0] <= size:
            cur = (cur[0], b)
            continue
        if cur is not None:
            out.append(cur)
        cur = None
        if b - a > size:
            out += pieces(a, b)
        else:
            cur = (a, b)
    if cur is not None:
        out.append(cur)
    return out


def _score_share(ens, sub, table, fusion: str, backend: str, rank: int, world: int, loader_kw: dict,
                 show_progress: bool, positions=None, embeddings: list[dict] | None = None) -> int:
    """Score this rank's share of ``sub`` into the output ``table`` (``OUT`` or its part file), chunk by chunk
    (:func:`score_chunks`: a loader each, every rank its share of each) and batch by batch (``positions``: where
    ``sub``'s samples are in the run's dataset), with the members' embeddings (``embeddings``: their layout;
    Parquet columns, or a CSV's files written just before each batch's rows); returns the rows written."""
    from .inference import loader_options, score_batches
    from .pipelines import build_loader
    from .pipelines.options import shard_bounds

    chunks = score_chunks(sub)
    shares = [shard_bounds(b - a, rank, world) for a, b in chunks]
    expected = sum(hi - lo for lo, hi in shares)
    if expected == 0:
        return 0
    opts = loader_options(ens, loader_kw["batch_size"], loader_kw["tta"], shard_id=rank, num_shards=world,
                          workers=loader_kw["workers"])
    from tqdm import tqdm

    bar = tqdm(total=expected, unit="img", desc="predict" if world == 1 else f"predict rank {rank}/{world}",
               disable=not show_progress, dynamic_ncols=True, smoothing=0.1)
    written = 0
    from .embeddings import embedding_sink

    _release_memory()  # what reading DATA's sample lists left goes before the first loader (1 M cutouts: ~8 MB)

    with table.writer(rank, world) as writer, embedding_sink(table, writer, embeddings) as sink:
        try:
            for (a, b), (lo, hi) in zip(chunks, shares):
                if hi <= lo:
                    continue
                part = sub if (a, b) == (0, len(sub)) else sub.subset(np.arange(a, b, dtype=np.int64))
                where = None if positions is None else np.asarray(positions[a:b], dtype=np.int64)
                loader = build_loader(part, backend=backend, options=opts)
                got = 0
                for idx, _, logits, *vectors in score_batches(ens, loader, embeddings=bool(embeddings)):
                    batch = _batch(ens, part, idx, where, *ens.probabilities(logits, fusion))
                    if embeddings:
                        sink(batch, vectors[0])
                    writer.add(batch)
                    got += len(batch.samples)
                    bar.update(len(batch.samples))
                del loader  # its pipeline (and the reader's index of the chunk) goes before the next is built
                # the loader itself goes on del; the collector then frees what the chunk left in reference cycles
                # (300k cutouts: peak 1,106 MB with it, 1,133 and 1,169 MB without; not pinned down further)
                _release_memory()
                written += got
                if got != hi - lo:
                    raise RuntimeError(f"rank {rank}: the loader returned {got} of {hi - lo} cutouts of "
                                       f"cutouts {a}..{b - 1}")
        finally:
            bar.close()
    return written


def _batch(ens, sub, idx, positions, score, probs, spread):
    """One scored batch as the tables take it (``idx``: positions in ``sub``)."""
    from .prediction_table import ScoredBatch

    several = len(ens.members) > 1
    return ScoredBatch([sub.samples[int(i)] for i in idx], score, {k: probs[k] for k in ens.names} if several else {},
                       spread if several else None, None if positions is None else positions[idx])


def _finish(table, written: int, seconds: float, total_left: int, main_rank: bool, world: int, say) -> None:
    """Every rank done: the counts gathered, the parts merged into ``out`` and the run summed up (rank 0)."""
    _barrier(world)
    if world > 1:
        import torch.distributed as dist

        counts = [None] * world
        dist.all_gather_object(counts, (written, seconds))
        written, seconds = sum(c[0] for c in counts), max(c[1] for c in counts)
    if main_rank:
        out = table.path
        if table.pending_parts():
            _, k = table.merge()
            say(f"merged {k} part file(s) into {out}")
        n = table.rows()
        rate = written / max(seconds, 1e-9)
        left = total_left - written
        say(f"scored {written} cutouts in {seconds:.1f} s ({rate:.1f} img/s); {out} holds {n} rows"
            + (f"; {left} left (rerun to continue)" if left > 0 else ""))
    _barrier(world)


def merge_only(out: str) -> int:
    """Merge ``OUT.part-*-of-*.csv`` (torchrun ranks) or ``OUT.shard-I-of-N.csv|.parquet`` (``--shard`` parts)
    into ``out`` (``--merge``; a Parquet output without parts: its --top parts)."""
    from .prediction_parts import find_shards
    from .prediction_table import is_parquet, merge_output

    out = os.path.abspath(os.path.expanduser(out))
    if find_shards(out):
        return _merge_shards(out)
    if is_parquet(out):
        with _lock_out(out):
            n, k = merge_output(out)
        log(f"merged {k} part file(s) into {out}: {n} rows" if k else f"{out}: {n} rows in its parts; nothing to merge")
        return 0
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


def _merge_shards(out: str) -> int:
    """``--merge`` of the ``--shard`` parts of ``out``: every part present, complete, disjoint and from the
    same model, options and DATA, else nothing changes; then ``out`` and its record are written atomically and
    the parts removed. Holds ``OUT.lock`` and each part's lock (a task still running stops the merge)."""
    from .prediction_parts import check_shards, merge_parquet, parquet_record
    from .prediction_table import is_parquet

    with _lock_out(out):
        count, paths, merged = check_shards(out, parquet_record if is_parquet(out) else read_record, _differences)
        header = merged["columns"]
        locks = []
        try:
            for p in paths:
                locks.append(_lock_out(p))
            if is_parquet(out):
                return merge_parquet(out, count, paths, merged, log)
            for p in paths:
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
