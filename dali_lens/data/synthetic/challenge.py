"""The challenge layout: the files of the Metcalf et al. (2019) strong-lens finding challenge.

``out/classifications.csv`` (``CHALLENGE_COLUMNS``), one single-HDU float32 FITS per band in
``out/Public/<dir>/<prefix>-<ID>.fits`` (``track`` 'space': EUC_VIS; 'ground': Band1..4 =
``CHALLENGE_GROUND_BANDS``), IDs from ``CHALLENGE_FIRST_ID``, values = counts * ``CHALLENGE_FLUX_UNIT``
(raw fluxes ~1e-11..1e-9), ~10 % of the images with masked pixels (= ``CHALLENGE_MASK_VALUE``), and
``out/generator.json`` with the generator's parameters.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..challenge import MASK_VALUE
from ..io import atomic_write_bytes, atomic_write_csv, atomic_write_json
from .encoders import fits_bytes
from .pool import run_parallel
from .simulator import format_value

CHALLENGE_COLUMNS: tuple[str, ...] = ("ID", "is_lens", "einstein_area", "numb_pix_lensed_image",
                                      "flux_lensed_image_in_sigma")
#: Ground track band order: Band1 = R, Band2 = I, Band3 = G, Band4 = U (files imageSDSS_<band>-<ID>.fits).
CHALLENGE_GROUND_BANDS: tuple[str, ...] = ("R", "I", "G", "U")
CHALLENGE_SPACE_BANDS: tuple[str, ...] = ("VIS",)
#: Challenge files hold counts * CHALLENGE_FLUX_UNIT (raw-flux-like values ~1e-11 .. 1e-9).
CHALLENGE_FLUX_UNIT = 1e-12
#: Masked pixels in challenge files have this value (as in the Metcalf et al. 2019 data).
CHALLENGE_MASK_VALUE = MASK_VALUE  # the layout's convention, defined with the layout (data/challenge.py)
CHALLENGE_MASK_FRACTION = 0.1
CHALLENGE_FIRST_ID = 100000
CHALLENGE_SIZE = 101
TRACKS = ("ground", "space")


def challenge_options(track: str, size: int | None) -> tuple[tuple[str, ...], int]:
    """The bands and the cutout size of a challenge set; ValueError for an unknown ``track``."""
    if track not in TRACKS:
        raise ValueError(f"track must be one of {TRACKS}, got {track!r}")
    bands = CHALLENGE_GROUND_BANDS if track == "ground" else CHALLENGE_SPACE_BANDS
    return bands, CHALLENGE_SIZE if size is None else int(size)


class ChallengeWriter:
    """Writes the samples of one challenge set chunk by chunk, then ``classifications.csv`` and
    ``generator.json``."""

    def __init__(self, out: str, track: str, bands: tuple[str, ...], seed: int, fsync: bool) -> None:
        self.out, self.track, self.bands, self.seed, self.fsync = out, track, bands, seed, fsync
        self.dirs = _challenge_dirs(track)
        self.rows: list[list[str]] = []

    def make_dirs(self) -> None:
        for d, _ in self.dirs:
            os.makedirs(os.path.join(self.out, "Public", d), exist_ok=True)

    def write_chunk(self, images: np.ndarray, cat: dict[str, np.ndarray], pool: ThreadPoolExecutor | None,
                    n_workers: int) -> None:
        """One FITS file per band and sample (masked where the sample's mask says), and their rows; the worker
        threads scale, mask, encode and write each sample (only the rows are made here)."""
        nb = images.shape[1]
        size = images.shape[-1]
        for j in range(len(images)):
            ident = CHALLENGE_FIRST_ID + int(cat["index"][j])
            self.rows.append([str(ident), str(int(cat["is_lens"][j]))] +
                             [format_value(c, cat[c][j]) for c in CHALLENGE_COLUMNS[2:]])

        def write(j: int) -> None:
            idx = int(cat["index"][j])
            ident = CHALLENGE_FIRST_ID + idx
            planes = images[j] * np.float32(CHALLENGE_FLUX_UNIT)
            mask = _challenge_mask(np.random.default_rng([int(self.seed), idx, 2]), size, nb)
            if mask is not None:
                planes[mask] = CHALLENGE_MASK_VALUE
            for k, (d, prefix) in enumerate(self.dirs):
                atomic_write_bytes(os.path.join(self.out, "Public", d, f"{prefix}-{ident}.fits"),
                                   fits_bytes(planes[k]), fsync=self.fsync)

        run_parallel(pool, n_workers, write, len(images))

    def finish(self, summary: dict[str, Any], params: dict[str, Any]) -> None:
        """Write ``classifications.csv`` (by ID) and ``generator.json``; complete ``summary``."""
        self.rows.sort(key=lambda r: int(r[0]))
        atomic_write_csv(os.path.join(self.out, "classifications.csv"), CHALLENGE_COLUMNS, self.rows)
        summary.update(track=self.track, bands=list(self.bands), first_id=CHALLENGE_FIRST_ID)
        params.update(track=self.track, flux_unit=CHALLENGE_FLUX_UNIT, mask_value=CHALLENGE_MASK_VALUE,
                      first_id=CHALLENGE_FIRST_ID, band_dirs=self.dirs,
                      lens=summary["lens"], nonlens=summary["nonlens"])
        atomic_write_json(os.path.join(self.out, "generator.json"), params)


def _challenge_dirs(track: str) -> list[tuple[str, str]]:
    """(directory under Public/, file prefix) per band."""
    if track == "space":
        return [("EUC_VIS", "imageEUC_VIS")]
    return [(f"Band{k + 1}", f"imageSDSS_{b}") for k, b in enumerate(CHALLENGE_GROUND_BANDS)]


def _challenge_mask(rng: np.random.Generator, size: int, nb: int) -> np.ndarray | None:
    """A boolean (B, H, W) mask for ~CHALLENGE_MASK_FRACTION of the images (rectangle or stripe), else None."""
    if rng.random() >= CHALLENGE_MASK_FRACTION:
        return None
    mask = np.zeros((nb, size, size), dtype=bool)
    which = rng.random(nb) < 0.6
    which[rng.integers(nb)] = True                        # at least one band
    kind = rng.integers(3)
    if kind == 0:                                         # rectangle (e.g. a bad detector region)
        h, w = rng.integers(size // 8, size // 2, size=2)
        y, x = rng.integers(0, size - h), rng.integers(0, size - w)
        mask[which, y:y + h, x:x + w] = True
    elif kind == 1:                                       # horizontal stripe at an edge (chip gap)
        h = int(rng.integers(2, size // 4))
        if rng.random() < 0.5:
            mask[which, :h] = True
        else:
            mask[which, -h:] = True
    else:                                                 # vertical stripe (bleed trail / bad column)
        w = int(rng.integers(1, 5))
        x = int(rng.integers(0, size - w))
        mask[which, :, x:x + w] = True
    return mask
