"""The standard layout: train/val/test folders of cutouts, CSV manifests with the catalogue, dataset.json.

``out/{train,val,test}/{lens,nonlens}/<id>.<ext>`` (id = sample index, zero-padded to 6 digits or more),
the manifests ``out/{train,val,test}.csv`` (``filepath,label`` + ``CATALOGUE_COLUMNS``, filepath relative to
``out``) and ``out/dataset.json`` (parameters, counts). Formats: 'png' | 'jpeg' (fixed asinh stretch, 1 or
3 bands), 'fits' (empty primary + one ImageHDU per band, EXTNAME = band name upper-case), 'npy' (float32
(B, H, W) counts).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from ..io import atomic_write_bytes, atomic_write_csv, atomic_write_json
from .bands import parse_bands
from .encoders import (STRETCH_MAX, STRETCH_MIN, STRETCH_SOFTENING, check_image_bands, encode_image, fits_bytes,
                       npy_bytes, stretch_to_uint8)
from .pool import run_parallel
from .simulator import CATALOGUE_COLUMNS, format_value

FORMATS = ("png", "jpeg", "fits", "npy")
SPLITS = ("train", "val", "test")
_EXT = {"png": "png", "jpeg": "jpg", "fits": "fits", "npy": "npy"}


def standard_options(fmt: str, bands: Sequence[str] | str | None, size: int | None,
                     splits: Sequence[float]) -> tuple[tuple[str, ...], int, tuple[float, ...]]:
    """The bands, cutout size and split fractions of a standard set; ValueError for a bad option."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    band_names = parse_bands(("g", "r", "i") if bands is None else bands)
    if fmt in ("png", "jpeg"):
        check_image_bands(len(band_names), fmt)
    size = 64 if size is None else int(size)
    fractions = tuple(float(f) for f in splits)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"splits: expected three non-negative fractions (train, val, test), got {splits}")
    return band_names, size, fractions


def encode(fmt: str, image: np.ndarray, extnames: Sequence[str]) -> bytes:
    """The file of one cutout: ``image`` (B, H, W) counts (png/jpeg: its fixed stretch to 8 bits)."""
    if fmt in ("png", "jpeg"):
        return encode_image(stretch_to_uint8(image), fmt)
    if fmt == "fits":
        return fits_bytes(image, extnames)
    return npy_bytes(image)


class StandardWriter:
    """Writes the samples of one standard set chunk by chunk, then the manifests and ``dataset.json``."""

    def __init__(self, out: str, fmt: str, bands: tuple[str, ...], labels: np.ndarray, split_of: np.ndarray,
                 fractions: tuple[float, ...], fsync: bool) -> None:
        self.out, self.fmt, self.bands, self.fsync = out, fmt, bands, fsync
        self.labels, self.split_of, self.fractions = labels, split_of, fractions
        self.width = max(6, len(str(len(labels) - 1)))
        self.extnames = [b.upper() for b in bands]
        self.rows: dict[int, list[list[str]]] = {k: [] for k in range(len(SPLITS))}

    def make_dirs(self) -> None:
        """The folders that will receive files."""
        for k, lab in sorted(set(zip(self.split_of.tolist(), self.labels.tolist()))):
            os.makedirs(os.path.join(self.out, SPLITS[k], "lens" if lab else "nonlens"), exist_ok=True)

    def _path(self, i: int) -> str:
        """Sample ``i``'s file, relative to the set's folder."""
        return (f"{SPLITS[int(self.split_of[i])]}/{'lens' if self.labels[i] else 'nonlens'}/"
                f"{i:0{self.width}d}.{_EXT[self.fmt]}")

    def write_chunk(self, images: np.ndarray, cat: dict[str, np.ndarray], pool: ThreadPoolExecutor | None,
                    n_workers: int) -> None:
        """One file per sample of the chunk, and their manifest rows; the worker threads stretch, encode and
        write each file (only the rows are made here)."""
        rels = []
        for j in range(len(images)):
            i = int(cat["index"][j])
            rels.append(self._path(i))
            self.rows[int(self.split_of[i])].append(
                [rels[-1], str(int(self.labels[i]))] + [format_value(c, cat[c][j]) for c in CATALOGUE_COLUMNS])

        def write(j: int) -> None:
            data = encode(self.fmt, images[j], self.extnames)
            atomic_write_bytes(os.path.join(self.out, rels[j]), data, fsync=self.fsync)

        run_parallel(pool, n_workers, write, len(images))

    def finish(self, summary: dict[str, Any], params: dict[str, Any]) -> None:
        """Write the three manifests and ``dataset.json``; complete ``summary``."""
        split_summary = {}
        header = ["filepath", "label"] + list(CATALOGUE_COLUMNS)
        for k, name in enumerate(SPLITS):
            atomic_write_csv(os.path.join(self.out, f"{name}.csv"), header, self.rows[k])
            nl = sum(1 for r in self.rows[k] if r[1] == "1")
            split_summary[name] = {"n": len(self.rows[k]), "lens": nl, "nonlens": len(self.rows[k]) - nl}
        summary.update(format=self.fmt, bands=list(self.bands), splits=split_summary)
        params.update(format=self.fmt, splits=split_summary, split_fractions=list(self.fractions),
                      columns=header, id_width=self.width,
                      stretch={"kind": "asinh", "softening": STRETCH_SOFTENING, "min": STRETCH_MIN,
                               "max": STRETCH_MAX} if self.fmt in ("png", "jpeg") else None)
        atomic_write_json(os.path.join(self.out, "dataset.json"), params)
