"""One cutout as an 8-bit RGB thumbnail: Lupton asinh colour, asinh greyscale, or the image as it is.

* Three or more float bands (FITS, per-band FITS, ``.npy``, packed float shards): an asinh RGB composite in
  the Lupton et al. (2004) style, ``astropy.visualization.make_lupton_rgb``. ``rgb_bands`` names the bands
  that go to red, green and blue. The default assumes bands ordered from blue to red (g, r, i, ...): red =
  band 2, green = band 1, blue = band 0 (the first three, reversed). For the lens-finding challenge's ground
  track (Band1..Band4 = R, I, G, U) the default is I, R, G = bands 1, 0, 2. Each band has its sky level (the
  median) subtracted and is divided by its 99.5th percentile before the common asinh stretch, so bands of
  very different flux levels all show; colours are therefore relative, per cutout.
* One or two float bands: greyscale asinh (``AsinhStretch`` through an ``ImageNormalize`` from the sky level
  to the 99.5th percentile); two bands are averaged after that normalisation.
* 8-bit PNG/JPEG pixels (loose or packed) are shown as they are (1 band as grey, 3 bands as RGB; a 4th
  alpha band is dropped).
* Masked pixels (NaN/inf, and pixels equal to ``mask_value``) take no part in the sky level or the stretch
  and are drawn in flat grey (:data:`MASK_COLOUR`).
"""
from __future__ import annotations

import numpy as np

from ..data.dataset import DataError, Dataset, get_kind


def drawable(text: str) -> str:
    """``text`` as Pillow can draw it on a thumbnail or a gallery: control characters (a CR or LF in a file name
    or id) shown as '?' -- Pillow's text layout fails on them, which stopped a run's gallery with a traceback."""
    import unicodedata

    return "".join("?" if unicodedata.category(ch).startswith("C") else ch for ch in str(text))

MASK_COLOUR = (128, 128, 128)
CHALLENGE_GROUND_RGB = (1, 0, 2)  # Band2 = I -> red, Band1 = R -> green, Band3 = G -> blue
Q, STRETCH = 8.0, 1.0


def default_rgb_bands(dataset: Dataset) -> tuple[int, int, int] | None:
    """The bands shown as R, G, B for ``dataset`` by default (None for fewer than three bands)."""
    if dataset.bands < 3 or dataset.eight_bit:
        return None
    from ..data.challenge import GROUND_DIRS

    s = dataset.samples[0] if dataset.samples else None
    if s is not None and len(s.band_paths) == len(GROUND_DIRS):  # one file per band, in the challenge's folders
        import os

        if [os.path.basename(os.path.dirname(p)) for p in s.band_paths] == list(GROUND_DIRS):
            return CHALLENGE_GROUND_RGB
    return (2, 1, 0)


def parse_rgb_bands(text: str | tuple[int, ...] | None, bands: int) -> tuple[int, int, int] | None:
    """``--rgb-bands R,G,B`` (0-based band indices, the text or its tuple) checked against the data's band count."""
    if not text:
        return None
    try:
        picked = tuple(int(t) for t in (text if isinstance(text, (list, tuple)) else str(text).split(",")))
    except ValueError:
        raise DataError(f"--rgb-bands: expected three band indices R,G,B (e.g. 2,1,0), got {text!r}") from None
    if len(picked) != 3 or not all(0 <= b < bands for b in picked):
        raise DataError(f"--rgb-bands {','.join(map(str, picked))}: need three band indices between 0 and {bands - 1} "
                        f"(the data has {bands} band(s))")
    return picked  # type: ignore[return-value]


def masked_pixels(arr: np.ndarray, mask_value: float | None) -> np.ndarray:
    """(H, W) bool: pixels that are NaN/inf or equal to ``mask_value`` in any band."""
    bad = ~np.isfinite(arr)
    if mask_value is not None:
        bad |= arr == np.float32(mask_value)
    return bad.any(axis=0)


def _normalised(plane: np.ndarray, good: np.ndarray) -> np.ndarray:
    """``plane`` minus its sky level (median of the good pixels), divided by its 99.5th percentile."""
    vals = plane[good]
    if vals.size == 0:
        return np.zeros_like(plane, dtype=np.float32)
    sky, top = np.percentile(vals, (50.0, 99.5))  # one partition for both
    top -= sky
    if not np.isfinite(top) or top <= 0:
        top = max(float(np.max(vals) - sky), 1e-30)
    out = (plane - sky) / top
    out[~good] = 0.0
    return out.astype(np.float32, copy=False)


def thumbnail(arr: np.ndarray, pixel_kind: str, rgb_bands: tuple[int, int, int] | None = None,
              mask_value: float | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one cutout ``arr`` (bands, H, W) as described in the module docstring."""
    if get_kind(pixel_kind).eight_bit:
        a = np.asarray(arr, dtype=np.uint8)
        if a.shape[0] >= 3:
            return np.ascontiguousarray(a[:3].transpose(1, 2, 0))
        return np.repeat(a[0][:, :, None], 3, axis=2)
    from astropy.visualization import AsinhStretch, ImageNormalize, ManualInterval, make_lupton_rgb

    a = np.asarray(arr, dtype=np.float32)
    bad = masked_pixels(a, mask_value)
    good = ~bad
    if a.shape[0] >= 3:
        r, g, b = rgb_bands or (2, 1, 0)
        planes = [_normalised(a[k], good) for k in (r, g, b)]
        with np.errstate(invalid="ignore", divide="ignore"):  # astropy divides by the intensity, 0 at black
            rgb = make_lupton_rgb(*planes, interval=ManualInterval(vmin=0), stretch=STRETCH, Q=Q)
    else:
        grey = np.mean([_normalised(a[k], good) for k in range(a.shape[0])], axis=0)
        norm = ImageNormalize(vmin=0.0, vmax=1.0, stretch=AsinhStretch(0.1), clip=True)
        g8 = (np.asarray(norm(grey).filled(0.0)) * 255).round().astype(np.uint8)
        rgb = np.repeat(g8[:, :, None], 3, axis=2)
    if bad.any():
        rgb = np.array(rgb, copy=True)
        rgb[bad] = MASK_COLOUR
    return rgb


def placeholder(size: tuple[int, int], problem: str) -> np.ndarray:
    """(H, W, 3) uint8: a dark red tile with ``problem`` written on it (for a missing or unreadable cutout)."""
    from PIL import Image, ImageDraw

    h, w = max(size[0], 64), max(size[1], 64)
    im = Image.new("RGB", (w, h), (70, 20, 20))
    draw = ImageDraw.Draw(im)
    words, lines, line = problem.split(), [], ""
    chars = max(8, w // 6)
    for word in words:
        if len(line) + len(word) + 1 > chars and line:
            lines.append(line)
            line = word[:chars]
        else:
            line = f"{line} {word}".strip()[:chars]
    lines.append(line)
    for k, text in enumerate(lines[: max(1, h // 12)]):
        draw.text((3, 3 + 12 * k), drawable(text), fill=(255, 220, 220))
    return np.asarray(im)
