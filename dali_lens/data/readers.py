"""Read one sample into a (bands, H, W) numpy array, with checks that name the file.

The format readers of the built-in kinds (``data/kinds/``), and :func:`read_sample`, which reads any sample
through its kind. Used by the torchvision backend, by the DALI CPU backend for FITS (DALI's FITS reader needs CUDA), by
`python -m dali_lens.check` and to compute normalisation statistics. Images come back as uint8, float data
as float32.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from .dataset import DataError, Dataset, Sample


#: The largest image (or FITS band) dali-lens decodes, in pixels (width x height): 4096 x 4096. Cutouts are 64-224 px; a larger
#: file is not a cutout, or a decompression bomb (a constant 13,500 x 13,500 px PNG is 519 kB on disk and 182 MB
#: decoded), and is refused from its header, before any decoder allocates it.
MAX_IMAGE_PIXELS = 4096 * 4096
PNG_SIG = b"\x89PNG\r\n\x1a\n"
#: JPEG frame types every decoder (Pillow, torchvision's libjpeg-turbo, DALI's decoders, nvJPEG) reads alike:
#: baseline, extended and progressive Huffman (not lossless, hierarchical or arithmetic-coded)
_JPEG_SOF_OK = (0xC0, 0xC1, 0xC2)
_JPEG_SOF = tuple(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))


def image_header(data: bytes) -> tuple[str, int, int, int, int] | str:
    """(format, width, height, bits per sample, PNG colour type or JPEG component count x 16 + frame type - 0xC0)
    from a PNG's IHDR or a JPEG's frame header, read from the bytes without decoding; or a problem (text)."""
    import struct

    if data[:8] == PNG_SIG:
        if len(data) < 26 or data[12:16] != b"IHDR":
            return "corrupt PNG (no IHDR chunk first)"
        w, h = struct.unpack(">II", data[16:24])
        return "PNG", w, h, data[24], data[25]
    if data[:2] != b"\xff\xd8":
        return "not a PNG or JPEG file (dali-lens decodes PNG and JPEG images only)"
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return "corrupt JPEG (no marker where one belongs)"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in _JPEG_SOF:
            if pos + 10 > n:
                break
            h, w = struct.unpack(">HH", data[pos + 5:pos + 9])
            return "JPEG", w, h, data[pos + 4], data[pos + 9] * 16 + marker - 0xC0
        pos += 2 + length
    return "truncated JPEG (no frame header before the image data)"


def image_policy_problem(data: bytes) -> str | None:
    """Why an image file is refused by the decoding policy, from its header (None: decoded, on every backend
    and in check, to the same 8-bit pixels). The policy: PNG or JPEG content (whatever the file name says); at
    most :data:`MAX_IMAGE_PIXELS`; PNG of 8 bits per sample (grey, grey + alpha, RGB, RGBA) or palette (any
    depth: RGB, transparency dropped); JPEG of 8-bit precision, 1 (grey) or 3 (colour) components, baseline or
    progressive; EXIF orientation ignored (the pixels as stored). Refused: 1/2/4/16-bit PNG (decoders scale
    them differently), CMYK/YCCK, 12-bit, lossless and arithmetic-coded JPEG."""
    head = image_header(data)
    if isinstance(head, str):
        return head
    fmt, w, h, depth, detail = head
    if w * h > MAX_IMAGE_PIXELS:
        return (f"image is {w}x{h} px, over dali-lens's limit of {MAX_IMAGE_PIXELS} px (4096x4096; cutouts are "
                "64-224 px): not a cutout, or a decompression bomb")
    if w == 0 or h == 0:
        return f"corrupt {fmt} ({w}x{h} px)"
    if fmt == "PNG":
        if detail not in (0, 2, 3, 4, 6):
            return f"corrupt PNG (colour type {detail})"
        if detail != 3 and depth != 8:
            return (f"{depth}-bit PNG: dali-lens reads 8-bit PNG/JPEG (decoders scale other depths differently); "
                    "store such data as FITS or .npy")
        return None
    comps, sof = divmod(detail, 16)
    if 0xC0 + sof not in _JPEG_SOF_OK:
        return f"JPEG of frame type SOF{sof} (lossless, hierarchical or arithmetic-coded): not every decoder reads it"
    if depth != 8:
        return f"{depth}-bit JPEG: dali-lens reads 8-bit PNG/JPEG; store such data as FITS or .npy"
    if comps not in (1, 3):
        return (f"JPEG with {comps} colour components (CMYK/YCCK): decoders convert it differently; "
                "save it as RGB or greyscale")
    return None


def read_image(path: str) -> np.ndarray:
    with open(path, "rb") as fh:
        return decode_image(fh.read(), path)


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded image bytes -> (bands, H, W) uint8 through Pillow (palette encodings as RGB), after the decoding
    policy (:func:`image_policy_problem`)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise DataError(f"{where}: empty file (0 bytes)")
    bad = image_policy_problem(data)
    if bad:
        raise DataError(f"{where}: {bad}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("P", "CMYK", "YCbCr"):  # palette/colour-space encodings of RGB data
                im = im.convert("RGB")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc})") from None
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


_NPY_HEADER_LOCK = threading.Lock()


def npy_header(path: str) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """(shape, dtype, fortran_order, data offset) of a .npy file, reading only its header.

    numpy parses the header with ``ast.literal_eval``, which is not thread-safe in CPython 3.11 (concurrent
    calls fail with "AST constructor recursion depth mismatch"), so parsing is serialised.
    """
    with open(path, "rb") as fh, _NPY_HEADER_LOCK:
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(fh)
        return tuple(shape), np.dtype(dtype), bool(fortran), fh.tell()


def npy_dtype_problem(dtype: np.dtype) -> str | None:
    """Why a ``.npy`` of ``dtype`` is refused, or None. The decoding policy of ``.npy``: bool, integer and real
    float arrays (float16/32/64), of either byte order and C or Fortran order, become float32 exactly as numpy's
    ``astype(float32)`` makes them, on every backend (``kinds.npy``); complex, structured, text, date and object
    arrays are refused."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.fields or dtype.kind not in "biuf" or (dtype.kind == "f" and dtype.itemsize > 8):
        return (f"unsupported .npy dtype {dtype.str!r} (dali-lens reads bool, integer and float16/32/64 arrays)")
    return None


def read_npy(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        shape, dtype, fortran, offset = npy_header(path)
    except Exception as exc:  # ValueError/EOFError/OSError for corrupt headers
        raise DataError(f"{path}: cannot read .npy ({exc})") from None
    bad = npy_dtype_problem(dtype)
    if bad:
        raise DataError(f"{path}: {bad}")
    try:
        count = int(np.prod(shape))
        if size < offset + count * dtype.itemsize:
            raise ValueError(f"truncated ({size} bytes, header promises {offset + count * dtype.itemsize})")
        arr = np.fromfile(path, dtype=dtype, count=count, offset=offset)
        arr = arr.reshape(shape, order="F" if fortran else "C")
    except Exception as exc:  # ValueError/EOFError/OSError for corrupt files
        raise DataError(f"{path}: cannot read .npy ({exc})") from None
    return as_bands(arr, path)


def as_bands(arr: np.ndarray, where: str) -> np.ndarray:
    """A stored numeric array as float32 ``(bands, H, W)``: a 2-D array is one band; other shapes and the dtypes
    :func:`npy_dtype_problem` refuses are an error."""
    bad = npy_dtype_problem(arr.dtype)
    if bad:
        raise DataError(f"{where}: {bad}")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise DataError(f"{where}: expected an array shaped (bands, H, W), got shape {arr.shape}")
    return arr.astype(np.float32, copy=False)


def open_fits(path: str):
    """The HDU list of a FITS file (astropy, read in full); DataError naming an empty or unreadable file."""
    from astropy.io import fits

    if os.path.getsize(path) == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    try:
        return fits.open(path, memmap=False, lazy_load_hdus=False)
    except Exception as exc:
        raise DataError(f"{path}: cannot read FITS ({exc})") from None


def _has_hdu(hdul, h) -> bool:
    try:
        hdul[h]
    except (KeyError, IndexError):
        return False
    return True


def read_fits(path: str, hdus: tuple[int | str, ...] | None = None) -> np.ndarray:
    """One band per image HDU (chosen by index or EXTNAME), or a single 2-D/3-D HDU."""
    big, planes = None, []
    with open_fits(path) as hdul:
        try:
            for hdu in [hdul[h] for h in hdus] if hdus else hdul:  # sizes from the headers, no data read yet
                shape = tuple(getattr(hdu, "shape", ()) or ()) if hdu.is_image else ()
                if len(shape) >= 2 and int(np.prod(shape[-2:], dtype=np.int64)) > MAX_IMAGE_PIXELS:
                    big = (f"{path}: HDU {hdu.name or hdul.index_of(hdu)} is {shape[-1]}x{shape[-2]} px, over "
                           f"dali-lens's limit of {MAX_IMAGE_PIXELS} px per band (4096x4096; cutouts are 64-224 px): "
                           "not a cutout, or a decompression bomb")
                    break
            if big is None and hdus:
                planes = [np.asarray(hdul[h].data, dtype=np.float32) for h in hdus]
            elif big is None:
                planes = [np.asarray(h.data, dtype=np.float32) for h in hdul
                          if getattr(h, "data", None) is not None and getattr(h.data, "ndim", 0) in (2, 3)]
        except (KeyError, IndexError):  # an index past the last HDU (--hdus 99) or an EXTNAME the file lacks
            missing = next(h for h in hdus if not _has_hdu(hdul, h))
            raise DataError(f"{path}: --hdus {missing}: no such HDU (its HDUs: "
                            + ", ".join(f"{k} {h.name}".strip() for k, h in enumerate(hdul)) + ")") from None
        except (TypeError, ValueError, OSError) as exc:
            raise DataError(f"{path}: cannot read FITS data ({exc})") from None
    if big:
        raise DataError(big)
    if not planes:
        raise DataError(f"{path}: no image data in any HDU")
    if len(planes) == 1 and planes[0].ndim == 3:
        return planes[0]
    if any(p.ndim != 2 for p in planes) or len({p.shape for p in planes}) != 1:
        raise DataError(f"{path}: HDUs have different shapes {[p.shape for p in planes]}")
    return np.stack(planes)


def read_sample(sample: Sample, dataset: Dataset, check: bool = True) -> np.ndarray:
    """Read ``sample`` as (bands, H, W): uint8 for images, float32 otherwise (its kind's ``read``); raises
    DataError on problems."""
    kind = dataset.data_kind
    if not kind.packed:
        for f in sample.files:
            if not os.path.exists(f):
                raise DataError(f"{f}: file not found")
    arr = kind.read(sample, dataset)
    if check:
        check_array(arr, sample, dataset)
    return arr


def check_array(arr: np.ndarray, sample: Sample, dataset: Dataset, allow_nonfinite: bool = False) -> None:
    where = sample.path if not sample.band_paths else f"object {sample.id} ({sample.path})"
    if arr.shape[0] != dataset.bands:
        raise DataError(f"{where}: has {arr.shape[0]} band(s), the dataset has {dataset.bands}")
    if dataset.shape is not None and tuple(arr.shape[1:]) != tuple(dataset.shape):
        raise DataError(f"{where}: is {arr.shape[1]}x{arr.shape[2]} px, the dataset's images are "
                        f"{dataset.shape[0]}x{dataset.shape[1]} (mixed sizes)")
    if not allow_nonfinite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        if sample.band_paths and len(sample.band_paths) == arr.shape[0]:  # name the band file that holds them
            band = int(np.flatnonzero(~np.isfinite(arr).reshape(arr.shape[0], -1).all(1))[0])
            where = f"{sample.band_paths[band]} (object {sample.id}, band {band + 1})"
        raise DataError(f"{where}: contains {bad} NaN/inf value(s) (--mask-value nan sets them to 0; with a "
                        "number, pixels equal to it too)")


def reference_layout(dataset: Dataset, tries: int = 7) -> tuple[int, tuple[int, int]]:
    """(bands, (H, W)) that most of the first ``tries`` readable samples have. A bad first file is then reported
    as bad (by ``check``, ``--skip-bad``, the loaders) instead of being taken as the dataset's reference.
    Raises the first sample's error when none of the first ``3 * tries`` samples can be read."""
    from collections import Counter

    seen: Counter = Counter()
    first_error = None
    for k, sample in enumerate(dataset.samples):
        if k >= 3 * tries or sum(seen.values()) >= tries:
            break
        try:
            arr = read_sample(sample, dataset, check=False)
        except DataError as exc:
            first_error = first_error or exc
            continue
        seen[(int(arr.shape[0]), (int(arr.shape[1]), int(arr.shape[2])))] += 1
    if not seen:
        raise first_error or DataError(f"{dataset.root} ({dataset.split}): no samples")
    return seen.most_common(1)[0][0]
