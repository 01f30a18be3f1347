"""The predictions CSV a scoring run writes, and the run that writes it.

``predict_files`` is the typed core of ``python -m dali_lens.predict`` and of ``dali_lens.predict``: it scores
DATA with an ensemble of checkpoints into one CSV (``file,id,label,score[,score_<member>...,member_std]``) or
Parquet output, batch by batch, resumable, through ``prediction_table`` (the output formats). The CSV's
bookkeeping (header, own-file check, ``OUT.meta.json``, repair, parts, merge) is in ``prediction_csv`` and its
names are re-exported here. The command's docstring (``dali_lens/predict.py``) says what a user sees.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .cli import log
from .prediction_csv import (PROVENANCE_KEYS, PredictError, check_own, check_provenance,  # noqa: F401
                             complete_length, done_files, find_parts, header_for, iter_rows, merge, part_path,
                             provenance, provenance_path, read_header, repair)


# ---------------------------------------------------------------------------------------------------------
# running


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def predict_files(checkpoint: list[str], data: list[str], out: str, *, split: str = "all", backend: str = "auto",
                  batch_size: int = 64, tta: bool = False, fusion: str | None = None, workers: int | None = None,
                  threads: int | None = None, hdus: str | None = None, skip_bad: bool = False,
                  limit: int | None = None, progress: bool = True, top: int | None = None) -> int:
    """Score ``data`` with the ensemble of ``checkpoint`` into ``out``, a CSV or (``.parquet``) a folder of Parquet
    parts (resumable; ``top``: keep only the K best rows; see ``python -m dali_lens.predict --help`` for every
    option). Returns 0; raises DataError, PredictError, CheckpointError or BackendError on bad input."""
    from .pipelines import resolve_backend
    from .distributed import init as init_distributed

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
    resolve_backend(backend)  # a backend this machine lacks fails (BackendError) before anything is loaded
    with _lock_out(out, main_rank, world):
        return _predict_locked(checkpoint, data, out, split=split, backend=backend, batch_size=batch_size,
                               tta=tta, fusion=fusion, workers=workers, threads=threads, hdus=hdus,
                               skip_bad=skip_bad, limit=limit, progress=progress, rank=rank, world=world,
                               device=device, say=say, top=top)


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
                    skip_bad, limit, progress, rank, world, device, say, top=None) -> int:
    from .prediction_table import open_table
    from .score_inputs import load_scoring_inputs

    main_rank = rank == 0
    ens, dataset, backend, _, hdus = load_scoring_inputs(checkpoint, data, split, backend=backend, threads=threads,
                                                         hdus=hdus, skip_bad=skip_bad, device=device, say=say)
    fusion = fusion or ens.fusion
    header = header_for(ens.names)
    say(f"{ens.describe()}; fusion {fusion if len(ens.members) > 1 else 'n/a'}"
        + (", TTA x8" if tta else "") + f"; backend {backend} on {device}; {world} process(es)")

    table = open_table(out, header, dataset.samples, say, top=top)
    _prepare_out(table, provenance(ens, tta, data, split, hdus, fusion, header), main_rank, world, say)
    remaining, total_left, already = _remaining(dataset, table, limit, world, say)
    if len(remaining) == 0:
        _nothing_to_score(table, total_left, len(dataset), main_rank, world, say)
        return 0
    say(f"{len(dataset)} cutouts, {already} already scored, {len(remaining)} to score now"
        + (f" (of {total_left} left)" if len(remaining) < total_left else ""))
    if workers is None:
        workers = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    t0 = time.perf_counter()
    written = _score_share(ens, dataset.subset(remaining), table, fusion, backend, rank, world,
                           dict(batch_size=batch_size, tta=tta, workers=workers), progress and main_rank, remaining)
    _finish(table, written, time.perf_counter() - t0, total_left, main_rank, world, say)
    return 0


def _prepare_out(table, now: dict, main_rank: bool, world: int, say) -> None:
    """Check the output ``table`` (``prediction_table``; every rank, read-only: all stop alike), then repair it and
    write the record (rank 0 only); afterwards every rank reads the same state."""
    record = table.check(now)
    _barrier(world)
    if main_rank:
        table.prepare(now, record, say)
    _barrier(world)


def _remaining(dataset, table, limit: int | None, world: int, say) -> tuple[np.ndarray, int, int]:
    """``(positions still to score, at most limit of them; how many are left in all; how many are done)``."""
    done = table.done_files()
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


def _score_share(ens, sub, table, fusion: str, backend: str, rank: int, world: int, loader_kw: dict,
                 show_progress: bool, positions=None) -> int:
    """Score this rank's share of ``sub`` into the output ``table`` (``OUT`` or its part file), batch by batch
    (``positions``: where ``sub``'s samples are in the run's dataset); returns the rows written."""
    from .inference import loader_options, score_batches
    from .pipelines import build_loader
    from .pipelines.options import shard_bounds

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
    with table.writer(rank, world) as writer:
        try:
            for idx, _, logits in score_batches(ens, loader):
                batch = _batch(ens, sub, idx, positions, *ens.probabilities(logits, fusion))
                writer.add(batch)
                written += len(batch.samples)
                bar.update(len(batch.samples))
        finally:
            bar.close()
    if written != hi - lo:
        raise RuntimeError(f"rank {rank}: the loader returned {written} of {hi - lo} cutouts")
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
    """Merge ``OUT.part-*-of-*.csv`` into ``out`` (``--merge``; a Parquet output: its --top parts)."""
    out = os.path.abspath(os.path.expanduser(out))
    from .prediction_table import is_parquet, merge_output

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
        raise PredictError(f"{out}: neither the file nor any {os.path.basename(out)}.part-*-of-*.csv exists")
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
