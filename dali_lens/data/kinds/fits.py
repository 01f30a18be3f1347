"""FITS cutouts, one file per sample: one band per image HDU (chosen with ``--hdus``, by index or EXTNAME), or
a single 2-D/3-D HDU. Read with astropy; on the GPU, DALI's FITS reader reads the HDUs it decodes exactly."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..dataset import DataError, dataset_cache
from .base import Kind

# reader arguments for a file list read front to back, the same on every rank: DALI's FITS readers are handed
# this rank's samples of the epoch (one per band file, which these arguments keep in lock-step)
LISTED_READER = dict(shard_id=0, num_shards=1, pad_last_batch=True, stick_to_shard=True, shuffle_after_epoch=False,
                     prefetch_queue_depth=2)


def _card(key: str, value: Any) -> bytes:
    if isinstance(value, bool):
        v = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int):
        v = f"{value:>20d}"
    elif isinstance(value, float):
        v = f"{value:>20.10G}"
    else:
        s = str(value).replace("'", "''")
        v = f"'{s:<8}'"
    card = f"{key:<8}= {v}"
    if len(card) > 80:
        raise ValueError(f"FITS card too long: {card!r}")
    return card.ljust(80).encode("ascii")


def _pad(data: bytes, fill: bytes) -> bytes:
    rem = (-len(data)) % 2880
    return data + fill * rem


def fits_bytes(planes: np.ndarray, extnames: Sequence[str] | None = None) -> bytes:
    """A FITS file as bytes (float32, BITPIX = -32), written directly (fast; standard-conforming).

    ``extnames`` given: an empty primary HDU followed by one IMAGE extension per plane with that EXTNAME.
    ``extnames`` None: a single primary HDU holding ``planes`` (a 2-D array, or a (1, H, W) array).
    """
    planes = np.asarray(planes, dtype=np.float32)
    if extnames is None:
        if planes.ndim == 3 and planes.shape[0] == 1:
            planes = planes[0]
        if planes.ndim != 2:
            raise ValueError("fits_bytes: a primary-only file takes one 2-D plane")
        h, w = planes.shape
        head = b"".join([_card("SIMPLE", True), _card("BITPIX", -32), _card("NAXIS", 2), _card("NAXIS1", w),
                         _card("NAXIS2", h), _card("EXTEND", True), b"END".ljust(80)])
        return _pad(head, b" ") + _pad(planes.astype(">f4").tobytes(), b"\0")
    if planes.ndim != 3 or planes.shape[0] != len(extnames):
        raise ValueError("fits_bytes: planes must be (B, H, W) with one EXTNAME per plane")
    parts = [_pad(b"".join([_card("SIMPLE", True), _card("BITPIX", -32), _card("NAXIS", 0),
                            _card("EXTEND", True), b"END".ljust(80)]), b" ")]
    _, h, w = planes.shape
    for name, plane in zip(extnames, planes):
        head = b"".join([_card("XTENSION", "IMAGE"), _card("BITPIX", -32), _card("NAXIS", 2),
                         _card("NAXIS1", w), _card("NAXIS2", h), _card("PCOUNT", 0), _card("GCOUNT", 1),
                         _card("EXTNAME", str(name).upper()), b"END".ljust(80)])
        parts.append(_pad(head, b" "))
        parts.append(_pad(plane.astype(">f4").tobytes(), b"\0"))
    return b"".join(parts)


class ListedIndex:
    """Dataset positions of the samples a reader reads front to back from ``order`` (no shuffling, one shard),
    the last one repeated for the padding of the last batch: DALI's FITS reader reports no file name."""

    def __init__(self, order: np.ndarray):
        self.order = np.asarray(order, dtype=np.int64)

    def __call__(self, info):
        return self.order[min(info.idx_in_epoch, len(self.order) - 1)].reshape(1)


def fits_hdu_numbers(dataset) -> list[int] | None:
    """HDU numbers for DALI's FITS reader, one per band, or None where astropy reads the data instead.

    CFITSIO numbers HDUs from 1 (the primary HDU), astropy and ``--hdus`` from 0. FITS with ``--hdus`` given as
    indices: those, plus one. One file per band: the first HDU holding 2-D data (HDU 1, or HDU 2 for a
    tile-compressed ``.fits.fz``, whose image lives in an extension). The layout is read from the first file;
    HDUs that are not 2-D there (a cube of bands) and ``--hdus`` given as EXTNAMEs, which astropy looks up in
    every file, stay with astropy. So does every data set whose files DALI's GPU reader would decode wrongly
    or differently from one another (``_dali_fits_ok``). Computed once per dataset object.
    """
    entry = dataset_cache(dataset, __name__)
    if "hdus" not in entry:
        hdus = dataset.data_kind.first_file_hdus(dataset) if len(dataset) else None
        entry["hdus"] = hdus if hdus is not None and _dali_fits_ok(dataset, hdus) else None
    return entry["hdus"]


def two_d(hdu) -> bool:
    return getattr(hdu, "data", None) is not None and getattr(hdu.data, "ndim", 0) == 2


def fits_headers(path: str, count: int) -> list[dict[str, str]]:
    """The first ``count`` HDU headers of a FITS file as {keyword: value text}, read card by card, skipping the
    data (a few 2880-byte blocks per file: ~20x faster than astropy.io.fits.open, which matters when every file
    of a survey-sized set is checked)."""
    out: list[dict[str, str]] = []
    with open(path, "rb") as fh:
        while len(out) < count:
            cards: dict[str, str] = {}
            end = False
            while not end:
                block = fh.read(2880)
                if len(block) < 2880:
                    raise DataError(f"{path}: truncated FITS file (HDU {len(out)} has no complete header)")
                for i in range(0, 2880, 80):
                    card = block[i:i + 80].decode("ascii", "replace")
                    key = card[:8].strip()
                    if key == "END":
                        end = True
                        break
                    if card[8:10] == "= ":
                        value = card[10:].strip()
                        value = value[1:value.find("'", 1)].strip() if value.startswith("'") else value.split("/")[0].strip()
                        cards.setdefault(key, value)
            out.append(cards)
            naxis = int(cards.get("NAXIS", 0))
            size = 0
            if naxis:
                size = int(np.prod([int(cards.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)], dtype=np.int64))
            size = (size + int(cards.get("PCOUNT", 0))) * int(cards.get("GCOUNT", 1)) * abs(int(cards.get("BITPIX", 8))) // 8
            fh.seek(-(-size // 2880) * 2880, 1)
    return out


def hdu_layout(cards: dict[str, str]) -> tuple | None:
    """What DALI's GPU FITS reader would make of one HDU: a hashable description when it decodes it exactly
    (uncompressed, or RICE_1-compressed integers in row tiles, with no scaling or BLANK in either), else None
    (astropy reads it: the FITS decoding policy is astropy's scaled values).

    The reader Rice-decodes every tile-compressed HDU without looking at ``ZCMPTYPE``, ignores
    ``ZSCALE``/``ZZERO``/``BSCALE``/``BZERO`` and dithering, and assumes tiles of one row."""
    scaled = any(k in cards for k in ("BLANK", "ZBLANK", "ZSCALE", "ZZERO")) or \
        float(cards.get("BSCALE", 1)) != 1.0 or float(cards.get("BZERO", 0)) != 0.0
    if scaled:  # astropy applies BSCALE/BZERO (uint16 is int16 + BZERO 32768); DALI's reader returns raw numbers
        return None
    if cards.get("ZIMAGE", "F") != "T":
        return ("plain", cards.get("BITPIX"))
    bitpix = int(cards.get("ZBITPIX", 0))
    width = cards.get("ZNAXIS1")
    tiles = [cards.get(f"ZTILE{k}") for k in range(1, int(cards.get("ZNAXIS", 0)) + 1)]
    row_tiles = tiles[0] in (None, width) and all(t in (None, "1") for t in tiles[1:])
    if cards.get("ZCMPTYPE") == "RICE_1" and bitpix > 0 and row_tiles:
        return ("rice", bitpix)
    return None


def _dali_fits_ok(dataset, hdu_numbers: list[int]) -> bool:
    """True when DALI's GPU reader decodes every selected HDU of every file exactly, and every file's layout
    matches the first file's (the reader takes "compressed" from the first sample of a batch). Reads the
    headers of every file (``fits_headers``), in threads; once per dataset (``fits_hdu_numbers`` caches it)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for s in dataset.samples for p in s.files]
    last = max(hdu_numbers)

    def layout(path: str):
        try:
            heads = fits_headers(path, last)
            return tuple(hdu_layout(heads[h - 1]) for h in hdu_numbers)
        except (OSError, ValueError, DataError):
            return None  # astropy reads it and names the problem

    first = layout(paths[0])
    if first is None or None in first:
        return False
    with ThreadPoolExecutor(min(8, len(paths))) as pool:
        return all(lay == first for lay in pool.map(layout, paths[1:], chunksize=256))


class FitsKind(Kind):
    name = "fits"
    exts = (".fits", ".fit", ".fts", ".fits.gz", ".fits.fz")

    def read(self, sample, dataset) -> np.ndarray:
        from ..readers import read_fits

        return read_fits(sample.path, dataset.hdus)

    def encode(self, array: np.ndarray, extnames: Sequence[str] | None = None) -> bytes:
        """float32 (bands, H, W) as a FITS file: an empty primary HDU, then one image extension per band, named
        ``extnames`` (default BAND1, BAND2, ...): :func:`fits_bytes`."""
        array = np.asarray(array, dtype=np.float32)
        array = array[None] if array.ndim == 2 else array
        return fits_bytes(array, extnames or [f"BAND{k + 1}" for k in range(len(array))])

    def first_file_hdus(self, dataset) -> list[int] | None:
        """DALI's HDU numbers from the first file (``fits_hdu_numbers``): ``--hdus`` given as indices of 2-D HDUs."""
        from ..readers import open_fits

        if dataset.hdus and all(isinstance(h, int) for h in dataset.hdus):
            with open_fits(dataset.samples[0].path) as hdul:
                if all(0 <= h < len(hdul) and two_d(hdul[h]) for h in dataset.hdus):
                    return [int(h) + 1 for h in dataset.hdus]
        return None

    def band_files(self, dataset, order: np.ndarray) -> list[list[str]]:
        """The file list each DALI FITS reader reads, in lock-step (one reader here: every HDU of one file)."""
        return [[dataset.samples[i].path for i in order]]

    def dali_listed(self, dataset, gpu: bool) -> bool:
        return gpu and fits_hdu_numbers(dataset) is not None

    def dali_source(self, dataset, opts, gpu: bool, order: np.ndarray, reader_args: dict):
        """DALI's FITS reader (tile-compressed HDUs decompressed on the GPU) where it decodes the files exactly
        (``fits_hdu_numbers``), else None (astropy in the loader's external source).

        The reader reads ``order``, this rank's samples of this epoch (the loader rebuilds the pipeline each
        epoch: ``dali_listed``), front to back: no reader-side sharding or shuffling, so that the sample
        positions, which the reader does not report, are known. One reader per band file, in lock-step, for one
        file per band."""
        if not self.dali_listed(dataset, gpu):
            return None
        from nvidia.dali import fn, types

        hdu_numbers = fits_hdu_numbers(dataset)
        planes = []
        for k, paths in enumerate(self.band_files(dataset, order)):
            out = fn.experimental.readers.fits(files=paths, hdu_indices=hdu_numbers, device="gpu",
                                               name="reader" if k == 0 else f"reader{k}", **LISTED_READER)
            planes += list(out) if isinstance(out, (list, tuple)) else [out]
        planes = [fn.reshape(fn.cast(q, dtype=types.FLOAT), layout="HW") for q in planes]
        x = fn.stack(*planes, axis=2, axis_name="C") if len(planes) > 1 else fn.expand_dims(
            planes[0], axes=[2], new_axis_names="C")
        index = fn.external_source(source=ListedIndex(order), batch=False, dtype=types.INT64)
        return x, index

    def dali_reads(self, dataset, opts) -> str:
        if self.dali_listed(dataset, True):
            return "DALI's GPU FITS reader reads the FITS files"
        return "astropy reads the FITS files (layout or compression DALI's GPU reader cannot decode exactly)"


FITS = FitsKind()
