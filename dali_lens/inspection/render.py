"""Thumbnails of the selected candidates, ``gallery.png`` (matplotlib mosaic) and ``index.html`` (grading page)."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..data.dataset import DataError
from ..data.io import atomic_open, atomic_write_text
from .candidates import Candidate
from .composite import default_rgb_bands, drawable, placeholder, thumbnail
from .page import page_html

KIND_COLOUR = {"false-positive": (220, 40, 40), "missed": (30, 150, 255)}
KIND_TEXT = {"false-positive": "FALSE POSITIVE", "missed": "MISSED LENS"}


def render_thumbnails(cands: list[Candidate], rgb_bands=None, mask_value: float | None = None,
                      workers: int | None = None, log=None) -> list[np.ndarray]:
    """(H, W, 3) uint8 per candidate, in order; a placeholder naming the problem for any it cannot read."""
    from ..data.readers import check_array, read_sample

    size = next(((c.dataset.shape or (64, 64)) for c in cands if c.dataset is not None), (64, 64))

    def one(c: Candidate) -> np.ndarray:
        if c.sample is None:
            return placeholder(size, f"{c.id}: {c.problem or 'not in the data'}")
        ds = c.dataset
        try:
            arr = read_sample(c.sample, ds, check=False)
            check_array(arr, c.sample, ds, allow_nonfinite=True)
            bands = rgb_bands if rgb_bands is not None else default_rgb_bands(ds)
            return thumbnail(arr, ds.pixel_kind, bands, mask_value)
        except (DataError, OSError, ValueError) as exc:
            c.problem = str(exc)
            if log is not None:
                log(f"warning: {c.id}: {exc}; a placeholder tile is shown instead")
            return placeholder(ds.shape or size, f"{c.id}: cannot read: {exc}")

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(cands) < 8:
        return [one(c) for c in cands]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, cands, chunksize=8))


def png_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def caption(c: Candidate) -> list[str]:
    """The lines under a tile: ID; score (and ensemble spread); the label, or the mark (FALSE POSITIVE is a
    non-lens, MISSED LENS a lens)."""
    lines = [c.id if len(c.id) <= 22 else c.id[:10] + "…" + c.id[-10:]]
    line = f"score {c.score:.3f}" if math.isfinite(c.score) else ""  # NaN: not scored (inspect --injected)
    if c.spread is not None:
        line += f" ±{c.spread:.3f}"
    if c.similarity is not None:  # inspect --similar
        line += f" cos {c.similarity:.3f}"
    lines.append(line)
    label = KIND_TEXT[c.kind] if c.kind else {1: "lens", 0: "non-lens", None: "unlabelled"}[c.label]
    if c.problem:
        label = "NOT SHOWN: " + c.problem[:40]
    lines.append(label)
    return lines


def _font(size: int, bold: bool = False):
    """matplotlib's DejaVu Sans Mono (it ships with matplotlib) as a PIL font; PIL's default without it."""
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        name = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans Mono",
                                                                 weight="bold" if bold else "normal"))
        return ImageFont.truetype(name, size)
    except Exception:  # noqa: BLE001 - any font problem: fall back on PIL's built-in font
        return ImageFont.load_default()


def write_gallery(path: str, cands: list[Candidate], thumbs: list[np.ndarray], title: str, tile: int = 120,
                  columns: int = 10) -> None:
    """A mosaic of ``thumbs`` labelled with ID, score (± spread), label; false positives framed red, missed
    lenses blue. Composed with PIL in matplotlib's DejaVu font: a matplotlib figure with hundreds of texts
    took ~10 s for 200 tiles, this well under one."""
    from PIL import Image, ImageDraw

    n = len(cands)
    cols = max(1, min(columns, n))
    rows = max(1, math.ceil(n / cols))
    pad, text_h, head = 6, 42, 46
    cw, ch = tile + 2 * pad, tile + 2 * pad + text_h
    canvas = np.full((head + rows * ch, max(cols * cw, 640), 3), 255, np.uint8)
    for k, (c, t) in enumerate(zip(cands, thumbs)):
        r, q = divmod(k, cols)
        y0, x0 = head + r * ch, q * cw
        if c.kind:
            canvas[y0 + 1:y0 + tile + 2 * pad - 1, x0 + 1:x0 + cw - 1] = KIND_COLOUR[c.kind]
        img = np.asarray(Image.fromarray(t).resize((tile, tile), Image.BICUBIC if t.shape[0] < tile else Image.LANCZOS))
        canvas[y0 + pad:y0 + pad + tile, x0 + pad:x0 + pad + tile] = img
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    small, bold, big = _font(10), _font(10, bold=True), _font(13, bold=True)
    draw.text((6, 6), drawable(title), fill=(0, 0, 0), font=big)
    draw.text((6, 26), "red frame: false positive (non-lens scored high)   blue frame: missed lens (lens scored low)",
              fill=(64, 64, 64), font=small)
    for k, c in enumerate(cands):
        r, q = divmod(k, cols)
        y, x = head + r * ch + tile + 2 * pad + 1, q * cw + pad
        lines = [drawable(line) for line in caption(c)]
        draw.text((x, y), lines[0], fill=(0, 0, 0), font=small)
        draw.text((x, y + 13), lines[1], fill=(0, 0, 0), font=small)
        colour = tuple(int(v * 0.8) for v in KIND_COLOUR[c.kind]) if c.kind else (80, 80, 80)
        draw.text((x, y + 26), lines[2], fill=colour, font=bold if c.kind else small)
    with atomic_open(path, "wb") as fh:
        im.save(fh, format="PNG", compress_level=4)


def grade_keys(cands: list[Candidate]) -> list[str]:
    """What each candidate's grade is filed under (the ``id`` of grades.csv): its ID, or where IDs repeat (the
    same name in two splits) ``ID@split`` (``ID@file`` without a split)."""
    seen: dict[str, int] = {}
    for c in cands:
        seen[c.id] = seen.get(c.id, 0) + 1
    return [c.id if seen[c.id] == 1 else f"{c.id}@{c.dataset.split if c.dataset else os.path.basename(c.file)}"
            for c in cands]


def page_key(cands: list[Candidate], grades: dict) -> str:
    """Where the page keeps its grades in the browser: the same candidates (and imported grades) share it."""
    h = hashlib.sha1()
    for c in cands:
        h.update(c.id.encode() + b"\0")
    h.update(json.dumps(sorted(grades.items())).encode())
    return h.hexdigest()[:16]


def write_page(path: str, cands: list[Candidate], thumbs: list[np.ndarray], title: str,
               grades: dict[str, int] | None = None, threshold: float = 0.5) -> None:
    keys = grade_keys(cands)
    grades = {k: int(v) for k, v in (grades or {}).items() if k in set(keys)}
    data = {
        "title": title, "threshold": threshold, "key": page_key(cands, grades), "grades": grades,
        "candidates": [{"id": c.id, "key": k, "score": c.score, "label": c.label, "spread": c.spread, "kind": c.kind,
                        "groups": c.groups, "problem": c.problem, "caption": caption(c),
                        "img": png_data_uri(t)} for c, k, t in zip(cands, keys, thumbs)],
    }
    atomic_write_text(path, page_html(title, data))
