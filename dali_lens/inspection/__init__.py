"""Look at the candidates: colour thumbnails, ``gallery.png`` and a keyboard grading page (``index.html``).

:func:`inspect_predictions` is ``python -m dali_lens.inspect``; :func:`split_gallery` is what ``train`` and
``evaluate`` call to write the false-positive and missed-lens gallery of their evaluation split. Cutouts are
read with :func:`dali_lens.data.readers.read_sample`, so every source kind works (loose images, FITS by HDU,
per-band FITS, the challenge layout, ``.npy``, packed shards). See ``composite.py`` for the colour scheme.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ..cli import log
from ..data.dataset import DataError, Dataset
from .candidates import (DEFAULT_BINS, GRADES, Candidate, format_purity, graded_search, match, purity_table,
                         read_grades, read_ids, read_predictions, select)
from .composite import parse_rgb_bands, thumbnail
from .injected import injected_tiles

__all__ = ["inspect_predictions", "split_gallery", "grades_summary", "Candidate", "read_predictions", "select",
           "read_grades", "purity_table", "graded_search", "format_purity", "thumbnail", "GRADES", "DEFAULT_BINS",
           "OUTPUTS", "GALLERY_N", "show_injected"]

OUTPUTS = ("gallery.png", "index.html")
GALLERY_N = 50  # false positives and missed lenses each, in the galleries train and evaluate write


def _quiet(*_a, **_k) -> None:
    return None


def data_mask_value(root: str) -> float | None:
    """The masked-pixel value of the data at ``root``: the one a generated set records (``dataset.json`` or
    ``generator.json``), else 100 for the lens-finding-challenge layout (its convention), else None."""
    from ..data.challenge import MASK_VALUE, is_challenge_layout

    folder = root if os.path.isdir(root) else os.path.dirname(root)
    for name in ("dataset.json", "generator.json"):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                v = json.load(fh).get("mask_value")
            if v is not None:
                return float(v)
        except (OSError, ValueError, AttributeError, TypeError):
            pass
    return MASK_VALUE if is_challenge_layout(folder) else None


_COMMAND = "dali_lens.inspect"


def check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out}: --out exists and is not a directory")
    there = [f for f in OUTPUTS if os.path.exists(os.path.join(out, f))]
    if there and not overwrite:
        raise DataError(f"{out}: already holds {', '.join(there)}; refusing to overwrite (pass --overwrite, or "
                        "choose another --out)")
    _record_out(out, record=False)


def _record_out(out: str, record: bool = True) -> None:
    """--overwrite replaces only the gallery.png/index.html that inspect wrote, by its record in ``out``
    (checked before any work, recorded just before writing)."""
    from ..data.io import claim_outputs

    try:
        claim_outputs(out, _COMMAND, OUTPUTS, record=record)
    except FileExistsError as exc:
        raise DataError(str(exc)) from None


def write_inspection(out: str, shown: list[Candidate], title: str, rgb_bands=None, mask_value=None,
                     grades: dict[str, int] | None = None, threshold: float = 0.5, gallery_max: int = 200,
                     workers: int | None = None, log=_quiet) -> dict:
    """Render ``shown`` and write ``out/gallery.png`` (the first ``gallery_max``) and ``out/index.html``."""
    from .render import render_thumbnails, write_gallery, write_page

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    thumbs = render_thumbnails(shown, rgb_bands, mask_value, workers=workers, log=log)
    t1 = time.perf_counter()
    k = max(1, gallery_max)
    if len(shown) > k:
        log(f"note: gallery.png shows the first {k} of {len(shown)} candidates (--gallery-max); index.html has all")
    write_gallery(os.path.join(out, "gallery.png"), shown[:k], thumbs[:k], title)
    t2 = time.perf_counter()
    write_page(os.path.join(out, "index.html"), shown, thumbs, title, grades, threshold)
    t3 = time.perf_counter()
    return {"out": out, "shown": len(shown), "problems": {c.id: c.problem for c in shown if c.problem},
            "seconds": {"thumbnails": round(t1 - t0, 2), "gallery": round(t2 - t1, 2), "page": round(t3 - t2, 2)}}


def inspect_predictions(predictions: str, data: str, out: str | None = None, *, top: int = 0, bottom: int = 0,
                        ids: str | None = None, false_positives: int = 0, missed: int = 0, uncertain: int = 0,
                        disagree: int = 0,
                        rgb_bands: str | None = None, mask_value: float | None = None, hdus=None,
                        threshold: float = 0.5, grades: str | None = None, gallery_max: int = 200,
                        overwrite: bool = False, workers: int | None = None, log=_quiet,
                        similar: str | None = None) -> dict:
    """Select candidates from ``predictions`` (a predictions CSV), read their cutouts from ``data`` and write
    ``gallery.png`` and ``index.html`` to ``out`` (default: ``inspect/`` next to the CSV).

    ``uncertain``: the N scores nearest ``threshold``; ``disagree``: the N largest ensemble spreads (the most
    informative to grade next). With no selection at all, the top 100 are shown. IDs in the CSV (or in ``ids``)
    that are not in the data are logged by name and shown as placeholder tiles; so is any cutout that cannot be
    read. ``similar``: an id (or file) of the predictions, whose ``top`` (default 100) nearest cutouts by
    embedding are shown instead (``inspection.similar``; the predictions need ``predict --embeddings``).
    """
    from ..data.sources import discover

    predictions = os.path.abspath(os.path.expanduser(predictions))
    out = os.path.abspath(os.path.expanduser(out or os.path.join(os.path.dirname(predictions), "inspect")))
    check_out(out, overwrite)
    cands = read_predictions(predictions)
    if similar is not None:
        from .similar import similar_candidates

        near = similar_candidates(predictions, cands, similar, top or 100, log)
        cands, top, bottom, ids, false_positives, missed = near, len(near), 0, None, 0, 0
    wanted = read_ids(ids) if ids else None
    if not (top or bottom or wanted or false_positives or missed or uncertain or disagree):
        top = 100
    datasets = list(discover(data, hdus=hdus, val_fraction=0.0).values())
    if mask_value is None:
        mask_value = data_mask_value(os.path.abspath(os.path.expanduser(data)))
    missing = match(cands, datasets)  # first: labels missing from the CSV come from the data
    if missing:
        log(f"warning: {len(missing)} id(s) in {os.path.basename(predictions)} not found in {data}: "
            + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "") + " (placeholder tiles if shown)")
    try:
        shown, unknown = select(cands, top, bottom, wanted, false_positives, missed, threshold, uncertain, disagree)
    except DataError as exc:  # a selection these predictions cannot make: name the file
        raise DataError(f"{predictions}: {exc}") from None
    if unknown:
        log(f"warning: {len(unknown)} id(s) from {ids} not in {os.path.basename(predictions)}: "
            + ", ".join(unknown[:20]) + (" ..." if len(unknown) > 20 else ""))
    picked = parse_rgb_bands(rgb_bands, datasets[0].bands) if rgb_bands else None
    prior = {k: g for k, (g, _) in read_grades(grades).items()} if grades else None
    groups = [g for g in ("similar", "top", "bottom", "ids", "false-positive", "missed", "uncertain", "disagree")
              if any(g in c.groups for c in shown)]
    if similar is not None:
        shown.sort(key=lambda c: -c.similarity)  # nearest first (select ordered them by score)
        groups = [f"the {len(shown)} nearest to {similar} by embedding"]
    title = f"{os.path.basename(os.path.dirname(predictions))}/{os.path.basename(predictions)}: " \
            f"{len(shown)} candidates ({', '.join(groups)})"
    _record_out(out)
    result = write_inspection(out, shown, title, picked, mask_value, prior, threshold, gallery_max, workers, log)
    result.update(missing=missing, unknown_ids=unknown)
    return result


def split_gallery(out: str, dataset: Dataset, scores, labels, spread=None, *, n: int = GALLERY_N,
                  threshold: float = 0.5, mask_value: float | None = None, log=log) -> dict | None:
    """The ``n`` highest-scoring non-lenses and ``n`` lowest-scoring lenses of ``dataset`` (scores and labels
    in its sample order; label -1 = unknown) as ``out/gallery.png`` and ``out/index.html``. None if the split
    has no labels."""
    labels = np.asarray(labels)
    if not (labels >= 0).any():
        return None
    scores = np.asarray(scores, dtype=np.float64)
    cands = [Candidate(s.id, float(scores[j]), s.path, None if labels[j] < 0 else int(labels[j]),
                       None if spread is None else float(spread[j]), sample=s, dataset=dataset)
             for j, s in enumerate(dataset.samples)]
    shown, _ = select(cands, false_positives=n, missed=n, threshold=threshold)
    title = f"{dataset.split}: the {n} highest-scoring non-lenses and the {n} lowest-scoring lenses"
    return write_inspection(out, shown, title, mask_value=mask_value, threshold=threshold, workers=None, log=log)


def show_injected(predictions: str, data: str, out: str | None, n: int, *, overwrite: bool = False,
                  log=_quiet) -> dict:
    """``inspect PREDICTIONS DATA --injected N`` (issue 25, ``injected.py``): ``out/gallery.png`` and
    ``out/index.html`` (default ``inspect-injected/`` next to PREDICTIONS) of the run's arcs on DATA."""
    from .render import write_gallery, write_page

    out = os.path.abspath(os.path.expanduser(out or os.path.join(os.path.dirname(os.path.abspath(predictions)),
                                                                 "inspect-injected")))
    check_out(out, overwrite)
    tiles = injected_tiles(predictions, data, n)
    _record_out(out)
    os.makedirs(out, exist_ok=True)
    write_gallery(os.path.join(out, "gallery.png"), tiles["cands"], tiles["thumbs"], tiles["title"],
                  columns=tiles["columns"])
    write_page(os.path.join(out, "index.html"), tiles["cands"], tiles["thumbs"], tiles["title"], None, 0.5)
    log(f"{tiles['injected']} injected, {tiles['lenses']} real lenses; wrote {out}/gallery.png and {out}/index.html")
    return {"out": out, "shown": len(tiles["cands"]), "injected": tiles["injected"], "lenses": tiles["lenses"]}


def grades_summary(grades: str, bins=DEFAULT_BINS, at_n=None) -> str:
    """Purity of the graded set by score bin, as a text table, then purity@N, completeness@N and completeness
    at purity of the graded candidates ranked by score (``metrics.format_search``; ``at_n``: the N, default
    10, 100, 1000) (``inspect --grades FILE --summary``)."""
    from ..metrics import format_search

    g = read_grades(grades)
    unscored = sum(1 for _, s in g.values() if s is None)
    head = f"{grades}: {len(g)} graded candidate(s); purity = share graded 2 (probable) or 3 (definite)\n"
    text = head + format_purity(purity_table(g, bins), unscored)
    search = graded_search(g, at_n)
    if search is not None:
        text += ("\nranked by score (completeness: share of the graded lenses, 2-3):\n"
                 + format_search(search, "graded"))
    return text
