"""Encoders: one cutout as the bytes of one file, one function per format (array in, bytes out). The byte
writers are the data kinds' own (``data/kinds/image.py``, ``fits.py``, ``npy.py``: one home for each format,
shared with ``pack``); this module adds the synthetic set's fixed stretch to 8 bits.

* ``png_bytes`` / ``jpeg_bytes``: a uint8 (1 or 3, H, W) array (1 band greyscale, 3 bands RGB); the
  float images are mapped to uint8 first by ``stretch_to_uint8``, one fixed asinh stretch for all images
  and bands::

      v = (asinh(x / STRETCH_SOFTENING) - asinh(STRETCH_MIN / STRETCH_SOFTENING))
          / (asinh(STRETCH_MAX / STRETCH_SOFTENING) - asinh(STRETCH_MIN / STRETCH_SOFTENING))
      pixel = round(255 * clip(v, 0, 1))          # x in sky-subtracted counts

* ``fits_bytes``: float32 planes, as one primary HDU or as an empty primary + one IMAGE extension per band.
* ``npy_bytes``: a float32 array in NumPy's .npy format.

Nothing here knows about layouts or file names: the writers (``standard``, ``challenge``) call these.
"""
from __future__ import annotations

import math

import numpy as np

from ..kinds.fits import fits_bytes  # noqa: F401 - re-exported: the synthetic API names every encoder
from ..kinds.image import jpeg_bytes, png_bytes
from ..kinds.npy import NPY

#: a float32 array as the bytes of a .npy file (the npy kind's encoder)
npy_bytes = NPY.encode

#: Fixed asinh stretch for PNG/JPEG (sky-subtracted counts); see the module docstring.
STRETCH_SOFTENING = 15.0
STRETCH_MIN = -25.0
STRETCH_MAX = 4000.0


def stretch_to_uint8(images: np.ndarray) -> np.ndarray:
    """The fixed asinh stretch (see module docstring) of sky-subtracted counts to uint8, any shape."""
    a = STRETCH_SOFTENING
    lo = math.asinh(STRETCH_MIN / a)
    hi = math.asinh(STRETCH_MAX / a)
    x = np.asarray(images, dtype=np.float32) * np.float32(1 / a)
    np.arcsinh(x, out=x)
    x -= np.float32(lo)
    x *= np.float32(255.0 / (hi - lo))
    np.clip(x, 0, 255, out=x)
    np.rint(x, out=x)
    return x.astype(np.uint8)


def check_image_bands(nb: int, fmt: str) -> None:
    """ValueError unless ``nb`` bands fit an 8-bit image format (1 = greyscale, 3 = RGB)."""
    if nb not in (1, 3):
        raise ValueError(f"format {fmt!r} stores 1 band (greyscale) or 3 bands (RGB), but {nb} bands were "
                         f"requested; use --format fits or --format npy for {nb} bands")


def encode_image(img_u8: np.ndarray, fmt: str) -> bytes:
    """PNG/JPEG bytes of a uint8 (B, H, W) array: 1 band -> 'L', 3 bands -> 'RGB' (channel c = band c)."""
    check_image_bands(img_u8.shape[0], fmt)
    if fmt == "png":
        return png_bytes(img_u8)
    if fmt != "jpeg":
        raise ValueError(f"encode_image: unknown format {fmt!r}")
    return jpeg_bytes(img_u8)
