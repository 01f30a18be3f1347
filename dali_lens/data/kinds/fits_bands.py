"""FITS cutouts with one file per band per sample (``Sample.band_paths``, in band order); the challenge layout
(``data/challenge.py``) is a layout of this kind."""
from __future__ import annotations

import numpy as np

from ..dataset import DataError
from .fits import FitsKind, two_d


class FitsBandsKind(FitsKind):
    name = "fits-bands"
    exts = ()  # found by layouts (the challenge's band folders), not by extension
    one_file_per_band = True

    def read(self, sample, dataset) -> np.ndarray:
        """Each band file holds one 2-D image, all of one shape."""
        from ..readers import read_fits

        planes = [read_fits(p) for p in sample.band_paths]
        for f, p in zip(sample.band_paths, planes):
            if p.shape[0] != 1:
                raise DataError(f"{f}: holds {p.shape[0]} image planes, a band file of object {sample.id} must hold "
                                "one 2-D image")
        if len({p.shape for p in planes}) != 1:
            raise DataError(f"object {sample.id}: band files have different shapes "
                            + ", ".join(f"{f} {p.shape[1:]}" for f, p in zip(sample.band_paths, planes)))
        return np.concatenate(planes)

    def encode(self, array: np.ndarray) -> bytes:
        """One band file: float32 (1, H, W) or (H, W) in the primary HDU (:func:`kinds.fits.fits_bytes`)."""
        from .fits import fits_bytes

        return fits_bytes(np.asarray(array, dtype=np.float32).reshape(array.shape[-2:]))

    def first_file_hdus(self, dataset) -> list[int] | None:
        """The first HDU holding 2-D data in the first band file."""
        from ..readers import open_fits

        with open_fits(dataset.samples[0].band_paths[0]) as hdul:
            return next(([k + 1] for k, h in enumerate(hdul) if two_d(h)), None)

    def band_files(self, dataset, order: np.ndarray) -> list[list[str]]:
        return [[dataset.samples[i].band_paths[b] for i in order] for b in range(dataset.bands)]


FITS_BANDS = FitsBandsKind()
