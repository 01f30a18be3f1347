"""``inspect --similar ID --top K``: the K cutouts nearest to one object by the cosine similarity of their
embeddings (``predict --embeddings``).

Brute force in numpy: the (memory-mapped) vectors are read in chunks of :data:`CHUNK` rows, normalised, and
multiplied with the query; a running top-K is kept, so memory stays at one chunk whatever the number of rows
(a few million rows take seconds). With several members the similarity is the mean of the members' cosine
similarities (each member's vectors have their own dimension). Past some tens of millions of rows, build an
approximate index instead: FAISS (``faiss.IndexFlatIP`` on the normalised vectors, or ``IndexHNSWFlat``).
"""
from __future__ import annotations

import os

import numpy as np

from ..data.dataset import DataError

__all__ = ["nearest", "similar_candidates", "CHUNK"]

CHUNK = 65536


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def nearest(vectors: list[np.ndarray], row: int, k: int, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, similarities)`` of the ``k`` rows most similar to row ``row``, most similar first (ties: the
    lower row first): the mean over ``vectors`` (one ``(n, D)`` array per member) of the cosine similarity.
    Row ``row`` itself comes first, with similarity 1 (an identical copy may round to a hair above it)."""
    n = len(vectors[0])
    queries = [_unit(v[row]) for v in vectors]
    best_rows = np.empty(0, dtype=np.int64)
    best_sims = np.empty(0, dtype=np.float64)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        sims = np.mean([_unit(v[lo:hi]) @ q for v, q in zip(vectors, queries)], axis=0).astype(np.float64)
        if lo <= row < hi:
            sims[row - lo] = np.inf
        rows = np.concatenate([best_rows, np.arange(lo, hi, dtype=np.int64)])
        sims = np.concatenate([best_sims, sims])
        order = np.lexsort((rows, -sims))[:k]
        best_rows, best_sims = rows[order], sims[order]
    return best_rows, np.where(np.isinf(best_sims), 1.0, best_sims)


def _embeddings(predictions: str):
    """``(embeddings.Embeddings, layout)`` of a predictions CSV (its ``.npy`` files) or Parquet output (its
    ``emb_<member>`` columns); DataError when it has none."""
    import json

    from ..embeddings import Embeddings, column_of, layout_of, read_embeddings
    from ..prediction_table import is_parquet

    if is_parquet(predictions):
        from ..prediction_table import live_parts, part_meta, read_table

        try:
            parts = live_parts(predictions)[0]
            layout = layout_of(part_meta(parts[0])[0].get("provenance")) if parts else None
            if layout:
                t = read_table(predictions, ["file", "id"] + [column_of(e) for e in layout])
        except ValueError as exc:  # PredictError: not ours, damaged
            raise DataError(str(exc)) from None
    else:
        from ..predictions import provenance_path

        try:
            with open(provenance_path(predictions), encoding="utf-8") as fh:
                layout = layout_of(json.load(fh))
        except (OSError, ValueError):
            layout = None
    if not layout:
        raise DataError(f"{predictions}: no embeddings (its record lists none): score with predict --embeddings to "
                        "use --similar")
    if not is_parquet(predictions):
        return read_embeddings(predictions, layout), layout
    vectors = {e["member"]: t.column(column_of(e)).combine_chunks().flatten().to_numpy().reshape(-1, e["dim"])
               for e in layout}
    return Embeddings(t.column("file").to_pylist(), t.column("id").to_pylist(), vectors), layout


def similar_candidates(predictions: str, cands: list, ident: str, k: int, log=None) -> list:
    """The ``k`` candidates (rows of ``predictions``, as ``read_predictions`` gives them) nearest to the one whose
    id (or file) is ``ident``, each with its ``similarity``; the object itself comes first. DataError (one
    line) when the predictions have no embeddings, the ID is not in them or names several rows."""
    emb, layout = _embeddings(predictions)
    rows = [j for j, i in enumerate(emb.ids) if i == ident] or \
        [j for j, f in enumerate(emb.files) if f == ident or f == os.path.abspath(ident)]
    if not rows:
        raise DataError(f"--similar {ident}: no such id (or file) in {predictions}")
    if len(rows) > 1:
        raise DataError(f"--similar {ident}: {len(rows)} rows of {predictions} have this id; give the file instead "
                        f"(e.g. {emb.files[rows[0]]})")
    hits, sims = nearest([emb.vectors[e["member"]] for e in layout], rows[0], k)
    by_file = {c.file: c for c in cands}
    shown = []
    for j, sim in zip(hits, sims):
        c = by_file.get(emb.files[int(j)])
        if c is None:
            raise DataError(f"{predictions}: {emb.files[int(j)]!r} has an embedding but no row (damaged output?)")
        c.similarity = float(sim)
        c.groups.append("similar")
        shown.append(c)
    if log is not None:
        log(f"the {len(shown)} nearest to {ident} (cosine similarity): "
            + ", ".join(f"{c.id} {c.similarity:.3f}" for c in shown[:10]) + (" ..." if len(shown) > 10 else ""))
    return shown
