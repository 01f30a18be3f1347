"""Bands: the small SED table and what it gives each band (wavelength, colours, sky), by name or position.

Known names (``u g r i z y vis``; ``SDSS_R``, ``HSC-G``... by their last token) come from ``SED_TABLE``.
Unknown names fall back on their position in the band list: band k of B is given the wavelength of position
k / (B - 1) between g and z (475-890 nm), and the table is interpolated in wavelength.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

#: band -> (wavelength nm, deflector colour m_band - m_r, source colour m_band - m_r, sky mag / arcsec^2).
#: The deflector is a red elliptical (z ~ 0.3-0.5), the source a blue star-forming galaxy (z ~ 1-2).
SED_TABLE: dict[str, tuple[float, float, float, float]] = {
    "u": (355.0, 2.80, 0.10, 22.3),
    "g": (475.0, 1.40, -0.10, 22.0),
    "r": (620.0, 0.00, 0.00, 21.0),
    "i": (760.0, -0.60, 0.05, 20.2),
    "z": (890.0, -0.95, 0.05, 19.4),
    "y": (1000.0, -1.15, 0.05, 18.6),
    "vis": (700.0, -0.35, 0.03, 22.2),  # Euclid VIS (broad r+i+z); sky as seen from space
}
_SED_ORDER = ("u", "g", "r", "i", "z", "y")  # wavelength-ordered entries used for interpolation
REF_WAVELENGTH = 620.0  # nm (r band): the reference of colours and chromatic seeing


def band_key(name: str) -> str | None:
    low = str(name).strip().lower()
    if low in SED_TABLE:
        return low
    last = re.split(r"[_\-\s./]+", low)[-1] if low else ""
    if last in SED_TABLE:
        return last
    if low.endswith("vis"):
        return "vis"
    return None


def band_properties(bands: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-band wavelength (nm), deflector / source colours (mag relative to r) and sky (mag/arcsec^2).

    Known names come from ``SED_TABLE``; unknown ones are placed by their index in ``bands`` between g and z
    and interpolated in wavelength (a single unknown band is placed at r).
    """
    bands = list(bands)
    nb = len(bands)
    lam_tab = np.array([SED_TABLE[b][0] for b in _SED_ORDER])
    out = {k: np.zeros(nb) for k in ("wavelength", "deflector", "source", "sky")}
    for k, name in enumerate(bands):
        key = band_key(name)
        if key is not None:
            lam, dcol, scol, sky = SED_TABLE[key]
        else:
            t = 0.5 if nb == 1 else k / (nb - 1)
            lam = REF_WAVELENGTH if nb == 1 else SED_TABLE["g"][0] + t * (SED_TABLE["z"][0] - SED_TABLE["g"][0])
            dcol, scol, sky = (float(np.interp(lam, lam_tab, [SED_TABLE[b][j] for b in _SED_ORDER]))
                               for j in (1, 2, 3))
        out["wavelength"][k], out["deflector"][k], out["source"][k], out["sky"][k] = lam, dcol, scol, sky
    return out


def detection_band(bands: Sequence[str], wavelength: np.ndarray) -> int:
    keys = [band_key(b) for b in bands]
    for want in ("r", "vis"):
        if want in keys:
            return keys.index(want)
    return int(np.argmin(np.abs(wavelength - REF_WAVELENGTH)))


def parse_bands(bands: Sequence[str] | str) -> tuple[str, ...]:
    """A band list from a sequence or from text such as 'g,r,i' or 'g r i'."""
    if isinstance(bands, str):
        return tuple(b for b in re.split(r"[,\s]+", bands) if b)
    return tuple(bands)

