"""Physics-based synthetic strong-lens simulator and dataset writer.

The simulator
=============

Every cutout is drawn, vectorised over a batch with numpy (float32, no per-pixel Python loops), as:

* **Deflector light**: an elliptical Sersic profile (index n in [3, 4], de Vaucouleurs-like) whose magnitude
  and effective radius scale with the Einstein radius (Faber-Jackson-like: L ~ theta_E^2, plus scatter).
* **Lens mass** (lenses only): a singular isothermal ellipsoid (SIE; Kormann et al. 1994 / Keeton 2001
  deflection in closed form, arctan / arctanh) with axis ratio q, orientation, Einstein radius theta_E, plus
  external shear (gamma_1, gamma_2). The SIE normalisation b = theta_E * sqrt(q) makes the Einstein
  "ellipse" (mean convergence 1) enclose exactly pi * theta_E^2, so ``einstein_area = pi * theta_E^2``
  (in pixels^2).
* **Source** (lenses only): an elliptical Sersic (n in [0.7, 1.5], compact, blue) placed at an offset
  |beta| <= 0.85 theta_E (uniform in radius) from the deflector centre so that arcs, rings, doubles and
  Einstein crosses form. The pixel grid is ray-traced through the lens equation beta = theta - alpha(theta) and the source surface
  brightness is evaluated at beta (surface brightness is conserved, so the magnification comes out
  naturally). ``supersample`` (default 2) ray-traces an s x s sub-pixel grid and averages it, so that
  compact sources and thin arcs get the right flux.
* **Non-lenses** come from the same deflector population (same theta_E distribution, which sets the
  deflector's brightness and size, but no source): 45 % plain deflectors, 40 % with an unlensed *blue*
  companion 1-3 theta_E from the deflector (hard negatives; half of them elongated tangentially, like an arc),
  15 % with a red companion. 15 % of the lenses also get a companion, so a companion is not a give-away.
  Every cutout also gets 0-2 faint field galaxies anywhere in the frame.
* **Colours**: every component has one morphology and a per-band flux from a small SED table
  (``SED_TABLE``: deflector red, source blue, sky brightness, wavelength) keyed by band name (``u g r i z y
  vis``; ``SDSS_R``, ``HSC-G``... are recognised by their last token). Unknown band names fall back on their
  position in the band list: band k of B is given the wavelength of position k / (B - 1) between g and z
  (475-890 nm), and the table is interpolated in wavelength.
* **PSF**: Gaussian or Moffat (beta = 3.5), seeing FWHM drawn per image (ground: FWHM in the band is
  FWHM_r * (lambda / 620 nm)^-0.2), applied by FFT (``numpy.fft.rfft2`` over the batch; Gaussian transfer
  function in closed form). The convolution is periodic (cutout edges wrap); the deflector is centred so this
  only matters for faint light within a few pixels of the border.
* **Noise**: sky background (per band, from the sky brightness in the SED table), photon noise and Gaussian
  read noise. The photon noise is drawn in the Gaussian limit, N(0, sky + model + read_noise^2) per pixel:
  the Poisson mean and variance, neglecting its skewness (1 / sqrt(counts) < 0.15 for the >= 45 sky counts
  per pixel of every band here); much faster than Poisson draws.
  Images are **sky-subtracted** and in **counts** (zero-point ``zeropoint``: a magnitude m gives
  10^(-0.4 (m - zeropoint)) counts).

Determinism: every sample ``index`` has its own generator, ``np.random.default_rng([seed, index])``, from
which it draws a fixed-length vector of uniforms (its parameters) and then its noise. A sample therefore
depends only on (seed, index, its label and the simulation settings), never on the batch or chunk it is
generated in, nor on the number of threads: ``simulate(n, start=k)`` reproduces samples k..k+n-1 of any
bigger run. A lens and a non-lens with the same (seed, index) share the same deflector, field galaxies and
noise realisation.

Difficulty knobs (``simulate`` keyword arguments and ``python -m dali_lens.generate`` flags): the source
magnitude range ``source_mag`` (r-band magnitude of the unlensed source), the Einstein radius range
``einstein_radius`` (arcsec; divide by ``pixel_scale`` for pixels), the seeing range and the PSF shape. The
defaults (see ``DEFAULT_DIFFICULTY``) include faint sources (a quarter of the lenses have no pixel above 1
sigma) and sub-arcsecond Einstein radii, so lenses are *not* trivially separable: a 4-layer CNN trained for
10 epochs on 6000 64x64 g,r,i cutouts reaches an AUC of ~0.86-0.90 (~0.95 on the brightest quarter of the
sources, ~0.73 on the faintest).

Writers
=======

``generate_dataset`` writes the on-disk layouts of ``docs/DESIGN.md``: the standard layout (``png``,
``jpeg``, ``fits``, ``npy``, CSV manifests with the catalogue, ``dataset.json``) and the challenge layout of
the Metcalf et al. (2019) strong-lens finding challenge (``classifications.csv`` + one FITS file per band,
raw fluxes ~1e-11..1e-9, masked pixels = 100). Every file is written atomically (temporary name + rename);
the CSV manifests and ``dataset.json`` are written last, so an interrupted run is recognisable by their
absence and never leaves a truncated file.

PNG/JPEG use one fixed asinh stretch for all images and bands (``stretch_to_uint8``)::

    v = (asinh(x / STRETCH_SOFTENING) - asinh(STRETCH_MIN / STRETCH_SOFTENING))
        / (asinh(STRETCH_MAX / STRETCH_SOFTENING) - asinh(STRETCH_MIN / STRETCH_SOFTENING))
    pixel = round(255 * clip(v, 0, 1))          # x in sky-subtracted counts
"""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from .io import atomic_write_bytes, atomic_write_csv, atomic_write_json

__all__ = [
    "simulate",
    "generate_dataset",
    "stretch_to_uint8",
    "encode_image",
    "png_bytes",
    "fits_bytes",
    "band_properties",
    "SED_TABLE",
    "SURVEYS",
    "DEFAULT_DIFFICULTY",
    "CATALOGUE_COLUMNS",
    "CHALLENGE_COLUMNS",
    "CHALLENGE_GROUND_BANDS",
    "CHALLENGE_SPACE_BANDS",
    "CHALLENGE_FLUX_UNIT",
    "CHALLENGE_MASK_VALUE",
    "CHALLENGE_FIRST_ID",
    "FORMATS",
    "LAYOUTS",
    "STRETCH_SOFTENING",
    "STRETCH_MIN",
    "STRETCH_MAX",
]

# ----------------------------------------------------------------------------------------------------------
# Tables and constants
# ----------------------------------------------------------------------------------------------------------

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
_REF_WAVELENGTH = 620.0

#: Survey presets: pixel scale (arcsec/px), seeing FWHM range (arcsec, in r), zero-point, read noise (counts).
SURVEYS: dict[str, dict[str, Any]] = {
    "ground": {"pixel_scale": 0.2, "seeing": (0.6, 1.2), "zeropoint": 30.0, "read_noise": 5.0,
               "chromatic_seeing": True},
    "space": {"pixel_scale": 0.1, "seeing": (0.16, 0.22), "zeropoint": 31.5, "read_noise": 4.5,
              "chromatic_seeing": False},
}

#: Defaults of the difficulty knobs (``simulate`` keyword arguments); None = from the survey preset.
DEFAULT_DIFFICULTY: dict[str, Any] = {
    "einstein_radius": (0.5, 2.5),   # arcsec, uniform
    "source_mag": (21.5, 25.0),      # r-band magnitude of the unlensed source, uniform
    "seeing": None,                  # arcsec FWHM range (r band); None = survey preset
    "pixel_scale": None,             # arcsec / pixel; None = survey preset
    "psf": "gaussian",
}

#: Numeric catalogue columns written to the CSV manifests (after ``filepath,label``).
CATALOGUE_COLUMNS: tuple[str, ...] = (
    "einstein_radius",             # arcsec (0 for non-lenses)
    "einstein_area",               # pi * theta_E^2 in pixels^2 (0 for non-lenses)
    "numb_pix_lensed_image",       # pixels where the PSF-convolved lensed source > 1 sigma of the noise
    "flux_lensed_image_in_sigma",  # sum of the lensed source over those pixels / sigma
    "magnification",               # lensed source flux inside the cutout / intrinsic flux (0 for non-lenses)
    "source_mag",                  # r-band magnitude of the unlensed source (0 for non-lenses)
    "source_re",                   # source effective radius, arcsec (0 for non-lenses)
    "deflector_mag",               # r-band magnitude of the deflector
    "deflector_re",                # deflector effective radius, arcsec
    "axis_ratio",                  # deflector (mass) axis ratio q
    "shear",                       # external shear |gamma| (0 for non-lenses)
    "seeing",                      # PSF FWHM in the detection band, arcsec
    "companion",                   # 0 none, 1 blue companion, 2 red companion
    "n_field",                     # number of faint field galaxies
    "noise_sigma",                 # background noise per pixel in the detection band (counts)
)
_INT_COLUMNS = {"numb_pix_lensed_image", "companion", "n_field"}

CHALLENGE_COLUMNS: tuple[str, ...] = ("ID", "is_lens", "einstein_area", "numb_pix_lensed_image",
                                      "flux_lensed_image_in_sigma")
#: Ground track band order: Band1 = R, Band2 = I, Band3 = G, Band4 = U (files imageSDSS_<band>-<ID>.fits).
CHALLENGE_GROUND_BANDS: tuple[str, ...] = ("R", "I", "G", "U")
CHALLENGE_SPACE_BANDS: tuple[str, ...] = ("VIS",)
#: Challenge files hold counts * CHALLENGE_FLUX_UNIT (raw-flux-like values ~1e-11 .. 1e-9).
CHALLENGE_FLUX_UNIT = 1e-12
#: Masked pixels in challenge files have this value (as in the Metcalf et al. 2019 data).
CHALLENGE_MASK_VALUE = 100.0
CHALLENGE_MASK_FRACTION = 0.1
CHALLENGE_FIRST_ID = 100000
CHALLENGE_SIZE = 101

FORMATS = ("png", "jpeg", "fits", "npy")
LAYOUTS = ("standard", "challenge")
TRACKS = ("ground", "space")
SPLITS = ("train", "val", "test")
_EXT = {"png": "png", "jpeg": "jpg", "fits": "fits", "npy": "npy"}

#: Fixed asinh stretch for PNG/JPEG (sky-subtracted counts); see the module docstring.
STRETCH_SOFTENING = 15.0
STRETCH_MIN = -25.0
STRETCH_MAX = 4000.0

_N_UNIFORMS = 64          # uniforms drawn per sample (fixed: changing it changes every sample)
_MOFFAT_BETA = 3.5
_SOFTENING_PIX = 0.3      # core radius (px) of every Sersic profile: avoids the n=4 central cusp
_MAX_FIELD = 2
_SUBCHUNK = 64            # samples per vectorised block (cache-friendly); results do not depend on it


# ----------------------------------------------------------------------------------------------------------
# Bands
# ----------------------------------------------------------------------------------------------------------

def _band_key(name: str) -> str | None:
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
        key = _band_key(name)
        if key is not None:
            lam, dcol, scol, sky = SED_TABLE[key]
        else:
            t = 0.5 if nb == 1 else k / (nb - 1)
            lam = _REF_WAVELENGTH if nb == 1 else SED_TABLE["g"][0] + t * (SED_TABLE["z"][0] - SED_TABLE["g"][0])
            dcol, scol, sky = (float(np.interp(lam, lam_tab, [SED_TABLE[b][j] for b in _SED_ORDER]))
                               for j in (1, 2, 3))
        out["wavelength"][k], out["deflector"][k], out["source"][k], out["sky"][k] = lam, dcol, scol, sky
    return out


def _detection_band(bands: Sequence[str], wavelength: np.ndarray) -> int:
    keys = [_band_key(b) for b in bands]
    for want in ("r", "vis"):
        if want in keys:
            return keys.index(want)
    return int(np.argmin(np.abs(wavelength - _REF_WAVELENGTH)))


# ----------------------------------------------------------------------------------------------------------
# Profiles and lensing
# ----------------------------------------------------------------------------------------------------------

def _sersic_b(n: np.ndarray) -> np.ndarray:
    """b_n such that R_e encloses half the light (Ciotti & Bertin 1999 expansion)."""
    n = np.asarray(n, dtype=np.float64)
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n ** 2) + 131 / (1148175 * n ** 3)


def _sersic_coefficients(re, n, q, phi):
    """Quadratic-form coefficients of (R / Re)^2 = a dx^2 + b dx dy + c dy^2 and the profile constants.

    The elliptical radius is R^2 = q u^2 + v^2 / q (area-preserving; u along the major axis at angle phi),
    so that ``re`` is the circularised effective radius.
    """
    re = np.asarray(re, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    c, s = np.cos(phi), np.sin(phi)
    inv = 1.0 / re ** 2
    a = (q * c * c + s * s / q) * inv
    b = 2 * c * s * (q - 1 / q) * inv
    cc = (q * s * s + c * c / q) * inv
    soft = _SOFTENING_PIX ** 2 * inv
    bn = _sersic_b(n)
    gam = np.array([math.lgamma(2 * float(x)) for x in np.atleast_1d(n)])
    log_amp = 2 * n * np.log(bn) - np.log(2 * np.pi * n * re ** 2) - gam  # b^2n / (2 pi n Re^2 Gamma(2n))
    return a, b, cc, soft, bn, log_amp


def _sersic_profile(x: np.ndarray, n: np.ndarray, bn: np.ndarray, log_amp: np.ndarray) -> np.ndarray:
    """In place: x = (R / Re)^2 (softened), (m, ...) -> unit-flux Sersic surface brightness per pixel^2."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    np.log(x, out=x)
    x *= (0.5 / n).astype(np.float32).reshape(shape)
    np.exp(x, out=x)                                            # (R / Re)^(1/n)
    x *= (-bn).astype(np.float32).reshape(shape)
    x += log_amp.astype(np.float32).reshape(shape)
    np.exp(x, out=x)
    return x


def _sersic_grid(xs: np.ndarray, ys: np.ndarray, x0, y0, re, n, q, phi) -> np.ndarray:
    """Unit-flux elliptical Sersic images (m, H, W) on the pixel grid (1-D axes ``xs`` (W,), ``ys`` (H,)),
    centred on (x0, y0) (m,), circularised effective radius ``re`` (px), index ``n``, axis ratio ``q``,
    position angle ``phi``; a 0.3 px core softens the centre. The grid is separable, so the quadratic form
    costs three passes over the image: (b dy) * dx + (a dx^2 + soft) + c dy^2.
    """
    a, b, c, soft, bn, log_amp = _sersic_coefficients(re, n, q, phi)
    dx = xs[None, :].astype(np.float64) - np.asarray(x0, dtype=np.float64)[:, None]    # (m, W)
    dy = ys[None, :].astype(np.float64) - np.asarray(y0, dtype=np.float64)[:, None]    # (m, H)
    tx = (a[:, None] * dx * dx + soft[:, None]).astype(np.float32)
    ty = (c[:, None] * dy * dy).astype(np.float32)
    r2 = (b[:, None] * dy).astype(np.float32)[:, :, None] * dx.astype(np.float32)[:, None, :]
    r2 += tx[:, None, :]
    r2 += ty[:, :, None]
    return _sersic_profile(r2, n, bn, log_amp)


def _sersic_points(dx: np.ndarray, dy: np.ndarray, re, n, q, phi) -> np.ndarray:
    """Unit-flux elliptical Sersic at arbitrary offsets ``dx, dy`` (m, ...) float32 (e.g. ray-traced source
    plane positions). Overwrites ``dx`` and ``dy`` (temporaries); returns an array of their shape."""
    a, b, c, soft, bn, log_amp = _sersic_coefficients(re, n, q, phi)
    shape = (dx.shape[0],) + (1,) * (dx.ndim - 1)
    f32 = lambda v: v.astype(np.float32).reshape(shape)  # noqa: E731
    r2 = dx * dy
    r2 *= f32(b)
    np.multiply(dx, dx, out=dx)
    dx *= f32(a)
    r2 += dx
    np.multiply(dy, dy, out=dy)
    dy *= f32(c)
    dy += f32(soft)
    r2 += dy
    return _sersic_profile(r2, n, bn, log_amp)


def _sie_deflection(dx, dy, b, q, phi, g1, g2):
    """SIE (+ external shear) deflection at offsets (dx, dy) from the lens centre, all in pixels.

    Keeton (2001) / Kormann et al. (1994) form with convergence kappa = b / (2 sqrt(q^2 x'^2 + y'^2)) in the
    frame of the mass major axis x':  alpha_x' = b / f * arctan(f x' / psi),  alpha_y' = b / f *
    arctanh(f y' / psi),  psi = sqrt(q^2 x'^2 + y'^2), f = sqrt(1 - q^2).
    """
    shape = (b.shape[0],) + (1,) * (dx.ndim - 1)
    q = np.minimum(q, 0.9999)
    f = np.sqrt(1 - q ** 2)
    c = np.cos(phi).astype(np.float32).reshape(shape)
    s = np.sin(phi).astype(np.float32).reshape(shape)
    xr = dx * c + dy * s
    yr = dy * c - dx * s
    psi = xr * xr
    psi *= (q ** 2).astype(np.float32).reshape(shape)
    psi += yr * yr
    np.sqrt(psi, out=psi)
    psi += np.float32(1e-6)
    ff = f.astype(np.float32).reshape(shape)
    bf = (b / f).astype(np.float32).reshape(shape)
    xr *= ff
    xr /= psi
    np.arctan(xr, out=xr)
    xr *= bf                                   # alpha_x'
    yr *= ff
    yr /= psi
    np.arctanh(yr, out=yr)
    yr *= bf                                   # alpha_y'
    ax = xr * c
    ax -= yr * s
    ay = xr * s
    ay += yr * c
    g1 = g1.astype(np.float32).reshape(shape)
    g2 = g2.astype(np.float32).reshape(shape)
    ax += g1 * dx + g2 * dy
    ay += g2 * dx - g1 * dy
    return ax, ay


# ----------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------

def _pair(value, name: str) -> tuple[float, float]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,:\s]+", value.strip()) if v]
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name}: expected min <= max, got ({lo}, {hi})")
    return lo, hi


def _settings(size, bands, survey, psf, einstein_radius, source_mag, seeing, pixel_scale, supersample,
              lens_fraction) -> dict[str, Any]:
    if survey not in SURVEYS:
        raise ValueError(f"survey must be one of {tuple(SURVEYS)}, got {survey!r}")
    if psf not in ("gaussian", "moffat"):
        raise ValueError(f"psf must be 'gaussian' or 'moffat', got {psf!r}")
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    if isinstance(bands, str):
        bands = [b for b in re.split(r"[,\s]+", bands) if b]
    bands = tuple(str(b) for b in bands)
    if not bands:
        raise ValueError("bands: at least one band is needed")
    preset = SURVEYS[survey]
    pixel_scale = float(preset["pixel_scale"] if pixel_scale is None else pixel_scale)
    if not pixel_scale > 0:
        raise ValueError(f"pixel_scale must be > 0, got {pixel_scale}")
    er = _pair(einstein_radius, "einstein_radius")
    if er[0] <= 0:
        raise ValueError(f"einstein_radius must be > 0 arcsec, got {er}")
    sm = _pair(source_mag, "source_mag")
    see = _pair(preset["seeing"] if seeing is None else seeing, "seeing")
    if see[0] <= 0:
        raise ValueError(f"seeing must be > 0 arcsec, got {see}")
    supersample = int(supersample)
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    if not 0.0 <= float(lens_fraction) <= 1.0:
        raise ValueError(f"lens_fraction must be in [0, 1], got {lens_fraction}")
    props = band_properties(bands)
    return {
        "size": size, "bands": bands, "survey": survey, "psf": psf, "einstein_radius": er, "source_mag": sm,
        "seeing": see, "pixel_scale": pixel_scale, "supersample": supersample,
        "lens_fraction": float(lens_fraction), "zeropoint": float(preset["zeropoint"]),
        "read_noise": float(preset["read_noise"]), "chromatic_seeing": bool(preset["chromatic_seeing"]),
        "props": props, "det": _detection_band(bands, props["wavelength"]),
    }


def _draw_parameters(u: np.ndarray, is_lens: np.ndarray, st: dict[str, Any]) -> dict[str, np.ndarray]:
    """Map the per-sample uniforms ``u`` (m, _N_UNIFORMS) to physical parameters (pixels, counts)."""
    ps = st["pixel_scale"]
    size = st["size"]
    p: dict[str, np.ndarray] = {}
    lo, hi = st["einstein_radius"]
    theta_e = lo + (hi - lo) * u[:, 1]                               # arcsec
    p["theta_e"] = theta_e
    p["q"] = 0.45 + 0.55 * u[:, 2]                                   # mass axis ratio
    p["phi"] = np.pi * u[:, 3]
    gamma = 0.08 * np.sqrt(u[:, 5])
    gphi = np.pi * u[:, 6]
    p["g1"], p["g2"] = gamma * np.cos(2 * gphi), gamma * np.sin(2 * gphi)
    p["gamma"] = gamma
    # deflector light: Faber-Jackson-like scaling with theta_E, scatter
    p["d_mag"] = np.clip(19.6 - 5 * np.log10(theta_e) + 0.8 * (u[:, 7] - 0.5), 16.0, 23.0)
    p["d_n"] = 3.0 + 1.0 * u[:, 8]
    p["d_re"] = 1.0 * theta_e ** 0.7 * 10 ** (0.3 * (u[:, 9] - 0.5))  # arcsec
    p["d_q"] = np.clip(p["q"] + 0.2 * (u[:, 4] - 0.5), 0.4, 1.0)
    p["d_phi"] = p["phi"] + 0.2 * (u[:, 4] - 0.5)
    p["x0"] = u[:, 10] - 0.5
    p["y0"] = u[:, 11] - 0.5
    p["d_col"] = 0.3 * (u[:, 20] - 0.5)                              # colour slope jitter
    # source
    slo, shi = st["source_mag"]
    p["s_mag"] = slo + (shi - slo) * u[:, 12]
    p["s_re"] = 0.08 + 0.32 * u[:, 13]                                # arcsec
    p["s_n"] = 0.7 + 0.8 * u[:, 14]
    p["s_q"] = 0.35 + 0.65 * u[:, 15]
    p["s_phi"] = np.pi * u[:, 16]
    r_off = 0.85 * theta_e * u[:, 17] / ps                            # pixels (uniform in radius)
    a_off = 2 * np.pi * u[:, 18]
    p["s_dx"], p["s_dy"] = r_off * np.cos(a_off), r_off * np.sin(a_off)
    p["s_col"] = 0.3 * (u[:, 19] - 0.5)
    # seeing (r band FWHM, arcsec)
    see_lo, see_hi = st["seeing"]
    p["seeing"] = see_lo + (see_hi - see_lo) * u[:, 21]
    # companion: lenses 15 % (half blue, half red); non-lenses 40 % blue (hard negatives), 15 % red, 45 % none
    k = u[:, 22]
    comp = np.zeros(len(u), dtype=np.int64)
    shared = k < 0.15
    comp[shared] = np.where(u[shared, 30] < 0.5, 1, 2)
    nl = ~is_lens
    comp[nl & (k >= 0.15) & (k < 0.475)] = 1                        # -> 40 % blue in all
    comp[nl & (k >= 0.475) & (k < 0.55)] = 2                         # -> 15 % red in all, 45 % none
    p["companion"] = comp
    blue = comp == 1
    p["c_mag"] = np.where(blue, (slo - 1.0) + (shi - slo - 0.5) * u[:, 23], 20.5 + 3.0 * u[:, 23])
    theta_e_pix = theta_e / ps
    dist = np.where(is_lens, 1.6 + 2.0 * u[:, 24], 1.0 + 2.0 * u[:, 24]) * theta_e_pix
    dist = np.clip(dist, 2.0, 0.42 * size)
    ang = 2 * np.pi * u[:, 25]
    p["c_dx"], p["c_dy"] = dist * np.cos(ang), dist * np.sin(ang)
    p["c_re"] = np.where(blue, 0.15 + 0.45 * u[:, 26], 0.3 + 0.6 * u[:, 26])
    p["c_q"] = np.where(blue, 0.25 + 0.75 * u[:, 27], 0.5 + 0.5 * u[:, 27])
    tangential = blue & (u[:, 28] < 0.5)
    p["c_phi"] = np.where(tangential, ang + np.pi / 2, np.pi * u[:, 28])
    p["c_n"] = np.where(blue, 0.7 + 0.8 * u[:, 29], 2.5 + 1.5 * u[:, 29])
    p["c_col"] = np.where(blue, 0.0, 1.0)                            # 0 = source colours, 1 = deflector
    # field galaxies
    nf = np.searchsorted([0.5, 0.85], u[:, 31], side="right")
    p["n_field"] = nf.astype(np.int64)
    for j in range(_MAX_FIELD):
        b = 32 + 7 * j
        p[f"f{j}_x"] = (u[:, b] - 0.5) * size
        p[f"f{j}_y"] = (u[:, b + 1] - 0.5) * size
        p[f"f{j}_mag"] = 22.0 + 3.5 * u[:, b + 2]
        p[f"f{j}_re"] = 0.15 + 0.45 * u[:, b + 3]
        p[f"f{j}_q"] = 0.3 + 0.7 * u[:, b + 4]
        p[f"f{j}_phi"] = np.pi * u[:, b + 5]
        p[f"f{j}_col"] = u[:, b + 6]
    # slots 46..63 are spare (kept so that new parameters do not shift the noise stream)
    return p


def _band_fluxes(mag: np.ndarray, colour_mix: np.ndarray | float, slope: np.ndarray | float,
                 st: dict[str, Any]) -> np.ndarray:
    """Counts per band (m, B) for r-band magnitudes ``mag``; colour = mix * deflector + (1-mix) * source."""
    props = st["props"]
    mix = np.asarray(colour_mix, dtype=np.float64).reshape(-1, 1)
    col = mix * props["deflector"][None] + (1 - mix) * props["source"][None]
    col = col + np.asarray(slope, dtype=np.float64).reshape(-1, 1) * (props["wavelength"][None] - 620.0) / 400.0
    m = np.asarray(mag, dtype=np.float64).reshape(-1, 1) + col
    return 10 ** (-0.4 * (m - st["zeropoint"]))


def _grid(size: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = supersample
    c = (size - 1) / 2.0
    ax = ((np.arange(size * s, dtype=np.float64) + 0.5) / s - 0.5 - c).astype(np.float32)
    return np.broadcast_to(ax[None, :], (size * s, size * s)), np.broadcast_to(ax[:, None], (size * s, size * s))


def _otf(fwhm_pix: np.ndarray, size: int, psf: str) -> np.ndarray:
    """Optical transfer functions (m, B, size, size//2+1) for FWHM (m, B) in pixels, PSF centred at (0, 0)."""
    ky = np.fft.fftfreq(size).astype(np.float32)
    kx = np.fft.rfftfreq(size).astype(np.float32)
    if psf == "gaussian":
        k2 = (ky[:, None] ** 2 + kx[None, :] ** 2)
        sig = (fwhm_pix / (2 * math.sqrt(2 * math.log(2)))).astype(np.float32)
        coef = (-2 * np.pi ** 2 * sig ** 2).astype(np.float32)
        return np.exp(coef[..., None, None] * k2).astype(np.complex64)
    # Moffat: build the kernel on the periodic grid and transform it
    d = np.arange(size, dtype=np.float32)
    d = np.minimum(d, size - d)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    beta = _MOFFAT_BETA
    alpha = (fwhm_pix / (2 * math.sqrt(2 ** (1 / beta) - 1))).astype(np.float32)
    ker = r2 / (alpha[..., None, None] ** 2)
    ker += 1
    np.log(ker, out=ker)
    ker *= np.float32(-beta)
    np.exp(ker, out=ker)
    ker /= ker.sum(axis=(-2, -1), keepdims=True)
    return (np.fft.rfft2(ker, norm="ortho") * np.float32(size)).astype(np.complex64)  # = unscaled rfft2


# ----------------------------------------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------------------------------------

def _simulate_block(indices: np.ndarray, labels: np.ndarray, seed: int, st: dict[str, Any], noise: bool,
                    out: np.ndarray) -> dict[str, np.ndarray]:
    """Simulate samples ``indices`` into ``out`` (m, B, H, W); return their catalogue."""
    m = len(indices)
    size, nb, ss = st["size"], len(st["bands"]), st["supersample"]
    ps = st["pixel_scale"]
    u = np.empty((m, _N_UNIFORMS))
    rngs = []
    for j, idx in enumerate(indices):
        rng = np.random.default_rng([int(seed), int(idx)])
        u[j] = rng.random(_N_UNIFORMS)
        rngs.append(rng)
    is_lens = labels.astype(bool)
    p = _draw_parameters(u, is_lens, st)
    X, Y = _grid(size)
    xs = X[0]                                                # 1-D pixel axis (same for x and y)

    out[...] = 0.0
    # --- deflector light
    morph = _sersic_grid(xs, xs, p["x0"], p["y0"], p["d_re"] / ps, p["d_n"], p["d_q"], p["d_phi"])
    flux = _band_fluxes(p["d_mag"], 1.0, p["d_col"], st).astype(np.float32)
    out += flux[:, :, None, None] * morph[:, None]
    # --- companion
    sel = np.flatnonzero(p["companion"] > 0)
    if len(sel):
        morph = _sersic_grid(xs, xs, p["x0"][sel] + p["c_dx"][sel], p["y0"][sel] + p["c_dy"][sel],
                             p["c_re"][sel] / ps, p["c_n"][sel], p["c_q"][sel], p["c_phi"][sel])
        flux = _band_fluxes(p["c_mag"][sel], p["c_col"][sel], 0.0, st).astype(np.float32)
        out[sel] += flux[:, :, None, None] * morph[:, None]
    # --- field galaxies
    for j in range(_MAX_FIELD):
        sel = np.flatnonzero(p["n_field"] > j)
        if not len(sel):
            continue
        morph = _sersic_grid(xs, xs, p[f"f{j}_x"][sel], p[f"f{j}_y"][sel], p[f"f{j}_re"][sel] / ps,
                             np.full(len(sel), 1.0), p[f"f{j}_q"][sel], p[f"f{j}_phi"][sel])
        flux = _band_fluxes(p[f"f{j}_mag"][sel], p[f"f{j}_col"][sel], 0.0, st).astype(np.float32)
        out[sel] += flux[:, :, None, None] * morph[:, None]
    # --- lensed source
    lens = np.flatnonzero(is_lens)
    magnification = np.zeros(m)
    src = None
    if len(lens):
        Xs, Ys = _grid(size, ss) if ss > 1 else (X, Y)
        ldx = Xs[None] - p["x0"][lens].astype(np.float32)[:, None, None]
        ldy = Ys[None] - p["y0"][lens].astype(np.float32)[:, None, None]
        theta_e_pix = p["theta_e"][lens] / ps
        bsie = theta_e_pix * np.sqrt(np.minimum(p["q"][lens], 0.9999))
        ax, ay = _sie_deflection(ldx, ldy, bsie, p["q"][lens], p["phi"][lens], p["g1"][lens], p["g2"][lens])
        ldx -= ax
        ldx -= p["s_dx"][lens].astype(np.float32)[:, None, None]
        ldy -= ay
        ldy -= p["s_dy"][lens].astype(np.float32)[:, None, None]
        del ax, ay
        src = _sersic_points(ldx, ldy, p["s_re"][lens] / ps, p["s_n"][lens], p["s_q"][lens], p["s_phi"][lens])
        del ldx, ldy
        if ss > 1:
            src = src.reshape(len(lens), size, ss, size, ss).mean(axis=(2, 4))
        magnification[lens] = src.sum(axis=(1, 2), dtype=np.float64)
        flux = _band_fluxes(p["s_mag"][lens], 0.0, p["s_col"][lens], st).astype(np.float32)
        out[lens] += flux[:, :, None, None] * src[:, None]
        src_det = src * flux[:, st["det"], None, None]
    # --- PSF (FFT over the whole block)
    lam = st["props"]["wavelength"]
    chrom = (lam / _REF_WAVELENGTH) ** -0.2 if st["chromatic_seeing"] else np.ones(nb)
    fwhm_pix = (p["seeing"][:, None] * chrom[None, :]) / ps                 # (m, B)
    otf = _otf(fwhm_pix, size, st["psf"])
    # norm='ortho' on both transforms: same result as the default pair, but numpy's unscaled transform
    # is ~3x slower than a scaled one (numpy 2.x)
    out[...] = np.fft.irfft2(np.fft.rfft2(out, norm="ortho") * otf, s=(size, size), norm="ortho")
    # --- catalogue numbers of the lensed image in the detection band
    sky = 10 ** (-0.4 * (st["props"]["sky"] - st["zeropoint"])) * ps ** 2           # counts / px (B,)
    bg_var = sky + st["read_noise"] ** 2
    sigma_det = float(np.sqrt(bg_var[st["det"]]))
    npix = np.zeros(m, dtype=np.int64)
    fsig = np.zeros(m)
    if src is not None:
        conv = np.fft.irfft2(np.fft.rfft2(src_det, norm="ortho") * otf[lens, st["det"]], s=(size, size),
                             norm="ortho")
        above = conv > sigma_det
        npix[lens] = above.sum(axis=(1, 2))
        fsig[lens] = np.where(above, conv, 0).sum(axis=(1, 2), dtype=np.float64) / sigma_det
    # --- noise: sky + photon (Gaussian limit) + read noise; images are sky-subtracted
    if noise:
        var = np.maximum(out, 0)
        var += bg_var.astype(np.float32)[None, :, None, None]
        np.sqrt(var, out=var)
        draws = np.empty((nb, size, size), dtype=np.float32)
        for j, rng in enumerate(rngs):
            rng.standard_normal(dtype=np.float32, out=draws)
            var[j] *= draws
        out += var
    theta_e = np.where(is_lens, p["theta_e"], 0.0)
    cat = {
        "index": np.asarray(indices, dtype=np.int64),
        "is_lens": is_lens.astype(np.int64),
        "einstein_radius": theta_e,
        "einstein_area": np.pi * (theta_e / ps) ** 2,
        "numb_pix_lensed_image": npix,
        "flux_lensed_image_in_sigma": fsig,
        "magnification": magnification,
        "source_mag": np.where(is_lens, p["s_mag"], 0.0),
        "source_re": np.where(is_lens, p["s_re"], 0.0),
        "deflector_mag": p["d_mag"],
        "deflector_re": p["d_re"],
        "axis_ratio": p["q"],
        "shear": np.where(is_lens, p["gamma"], 0.0),
        "seeing": fwhm_pix[:, st["det"]] * ps,
        "companion": p["companion"],
        "n_field": p["n_field"],
        "noise_sigma": np.full(m, sigma_det),
    }
    return cat


def simulate(n: int, size: int = 64, bands: Sequence[str] = ("g", "r", "i"), seed: int = 0,
             is_lens: bool | Sequence[bool] | np.ndarray | None = None, *,
             einstein_radius: tuple[float, float] = DEFAULT_DIFFICULTY["einstein_radius"],
             source_mag: tuple[float, float] = DEFAULT_DIFFICULTY["source_mag"],
             seeing: tuple[float, float] | None = None, pixel_scale: float | None = None,
             psf: str = "gaussian", survey: str = "ground", lens_fraction: float = 0.5,
             supersample: int = 2, noise: bool = True, start: int = 0,
             workers: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Simulate ``n`` cutouts; returns ``(images float32 (n, B, size, size), catalogue dict of (n,) arrays)``.

    Images are sky-subtracted counts (see the module docstring for the physics).

    ``is_lens``: None draws each label from the sample's own generator (lens with probability
    ``lens_fraction``); a bool applies to all samples; an array gives one label per sample.
    Difficulty: ``einstein_radius`` (min, max) arcsec, ``source_mag`` (min, max) r-band magnitude of the
    unlensed source, ``seeing`` (min, max) FWHM arcsec (None: survey preset), ``pixel_scale`` arcsec/px
    (None: survey preset: ground 0.2, space 0.1), ``psf`` 'gaussian' | 'moffat', ``survey`` 'ground' |
    'space' (pixel scale, seeing, zero-point, read noise). ``supersample`` ray-traces s x s rays per pixel.
    ``noise=False`` returns the noiseless (PSF-convolved) model.
    Samples are ``start .. start + n - 1``: sample k is identical whatever ``n``, ``start`` and ``workers``.
    ``workers`` threads (default: up to 4, the CPU count) share the work (numpy releases the GIL).

    The catalogue has ``index``, ``is_lens`` and the ``CATALOGUE_COLUMNS``.
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seed = _check_seed(seed)
    st = _settings(size, bands, survey, psf, einstein_radius, source_mag, seeing, pixel_scale, supersample,
                   lens_fraction)
    indices = np.arange(int(start), int(start) + n, dtype=np.int64)
    labels = _labels_for(indices, seed, is_lens, st["lens_fraction"])
    size, nb = st["size"], len(st["bands"])
    images = np.empty((n, nb, size, size), dtype=np.float32)
    blocks = [slice(i, min(i + _SUBCHUNK, n)) for i in range(0, n, _SUBCHUNK)]
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    workers = max(1, min(int(workers), len(blocks)))

    def run(sl: slice) -> dict[str, np.ndarray]:
        return _simulate_block(indices[sl], labels[sl], seed, st, noise, images[sl])

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            cats = list(pool.map(run, blocks))
    else:
        cats = [run(sl) for sl in blocks]
    if cats:
        catalogue = {k: np.concatenate([c[k] for c in cats]) for k in cats[0]}
    else:
        catalogue = {k: np.zeros(0) for k in ("index", "is_lens") + CATALOGUE_COLUMNS}
    return images, catalogue


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _labels_for(indices: np.ndarray, seed: int, is_lens, lens_fraction: float) -> np.ndarray:
    n = len(indices)
    if is_lens is None:
        # label from a generator of its own (independent of the parameter draws, so that the same
        # (seed, index) simulated as lens and as non-lens shares its deflector)
        return np.array([np.random.default_rng([int(seed), int(i), 1]).random() < lens_fraction
                         for i in indices], dtype=bool)
    arr = np.asarray(is_lens)
    if arr.ndim == 0:
        return np.full(n, bool(arr))
    arr = arr.astype(bool).ravel()
    if len(arr) != n:
        raise ValueError(f"is_lens has {len(arr)} entries for n={n} samples")
    return arr


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------

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


def _check_image_bands(nb: int, fmt: str) -> None:
    if nb not in (1, 3):
        raise ValueError(f"format {fmt!r} stores 1 band (greyscale) or 3 bands (RGB), but {nb} bands were "
                         f"requested; use --format fits or --format npy for {nb} bands")


def encode_image(img_u8: np.ndarray, fmt: str) -> bytes:
    """PNG/JPEG bytes of a uint8 (B, H, W) array: 1 band -> 'L', 3 bands -> 'RGB' (channel c = band c)."""
    _check_image_bands(img_u8.shape[0], fmt)
    if fmt == "png":
        return png_bytes(img_u8)
    if fmt != "jpeg":
        raise ValueError(f"encode_image: unknown format {fmt!r}")
    import io as _io

    from PIL import Image

    arr = img_u8[0] if img_u8.shape[0] == 1 else img_u8.transpose(1, 2, 0)
    buf = _io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_bytes(img_u8: np.ndarray, level: int = 1) -> bytes:
    """An 8-bit PNG of a uint8 (1, H, W) (greyscale) or (3, H, W) (RGB) array.

    Written directly (filter type 0, zlib ``level``): ~2x faster than PIL for small cutouts, and the zlib
    call releases the GIL so that writer threads run in parallel. Any PNG reader decodes it.
    """
    img_u8 = np.asarray(img_u8)
    if img_u8.dtype != np.uint8 or img_u8.ndim != 3 or img_u8.shape[0] not in (1, 3):
        raise ValueError(f"png_bytes: expected uint8 (1 or 3, H, W), got {img_u8.dtype} {img_u8.shape}")
    nb, h, w = img_u8.shape
    raw = np.zeros((h, w * nb + 1), dtype=np.uint8)           # first byte of each row: filter type 0
    raw[:, 1:] = img_u8.transpose(1, 2, 0).reshape(h, w * nb)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if nb == 1 else 2, 0, 0, 0)
    return b"".join((b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", ihdr),
                     _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), level)), _png_chunk(b"IEND", b"")))


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


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Dataset writer
# ----------------------------------------------------------------------------------------------------------

def _split_counts(n: int, n_lens: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Exact split sizes (largest remainder) and, per split, an exact stratified number of lenses.

    lens_k = largest remainder of n_lens * size_k / n: each raw share is <= size_k, so its ceiling is too,
    and the non-lens counts size_k - lens_k are >= 0 and add up to n - n_lens.
    """
    f = np.asarray(fractions, dtype=np.float64)
    sizes = _largest_remainder(n, f / f.sum())
    lens = _largest_remainder(n_lens, sizes.astype(np.float64))
    return [(int(s), int(l)) for s, l in zip(sizes, lens)]


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    raw = total * w / w.sum() if w.sum() > 0 else np.zeros_like(w)
    base = np.floor(raw).astype(np.int64)
    rest = int(total - base.sum())
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:rest]] += 1
    return base


def _plan(n: int, lens_fraction: float, fractions: Sequence[float] | None, seed: int):
    """Labels (n,) and split ids (n,) for samples 0..n-1: exact lens count, exact stratified split sizes."""
    rng = np.random.default_rng([int(seed), 2**31 - 1])
    n_lens = int(round(n * lens_fraction))
    labels = np.zeros(n, dtype=bool)
    labels[rng.permutation(n)[:n_lens]] = True
    split = np.zeros(n, dtype=np.int64)
    if fractions is not None:
        counts = _split_counts(n, n_lens, fractions)
        lens_idx = np.flatnonzero(labels)
        non_idx = np.flatnonzero(~labels)
        rng.shuffle(lens_idx)
        rng.shuffle(non_idx)
        lo_l = lo_n = 0
        for k, (size, nl) in enumerate(counts):
            split[lens_idx[lo_l:lo_l + nl]] = k
            split[non_idx[lo_n:lo_n + size - nl]] = k
            lo_l += nl
            lo_n += size - nl
    return labels, split


_GENERATED = ("train", "val", "test", "train.csv", "val.csv", "test.csv", "dataset.json", "Public",
              "classifications.csv", "generator.json")


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; choose another directory or pass overwrite=True "
                                  "(--overwrite) to replace the generated dataset in it")
        # remove only what a previous run of the generator wrote (never other files)
        for name in _GENERATED:
            p = os.path.join(out, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            elif os.path.lexists(p):
                os.unlink(p)
    os.makedirs(out, exist_ok=True)


def _fmt_value(key: str, v: Any) -> str:
    if key in _INT_COLUMNS or key in ("ID", "is_lens", "label"):
        return str(int(v))
    return f"{float(v):.6g}"


def generate_dataset(out: str | os.PathLike, n: int = 6000, size: int | None = None,
                     bands: Sequence[str] | str | None = None, fmt: str = "png", layout: str = "standard",
                     track: str = "ground", seed: int = 0, lens_fraction: float = 0.5,
                     splits: Sequence[float] = (0.7, 0.15, 0.15), overwrite: bool = False,
                     einstein_radius: tuple[float, float] = DEFAULT_DIFFICULTY["einstein_radius"],
                     source_mag: tuple[float, float] = DEFAULT_DIFFICULTY["source_mag"],
                     seeing: tuple[float, float] | None = None, pixel_scale: float | None = None,
                     psf: str = "gaussian", supersample: int = 2, chunk: int = 512, workers: int | None = None,
                     fsync: bool = False, progress: bool = False) -> dict[str, Any]:
    """Simulate ``n`` cutouts and write them in the standard or challenge layout of ``docs/DESIGN.md``.

    Standard layout: ``out/{train,val,test}/{lens,nonlens}/<id>.<ext>`` (id = 6-digit sample index), the
    manifests ``out/{train,val,test}.csv`` (``filepath,label`` + ``CATALOGUE_COLUMNS``, filepath relative to
    ``out``) and ``out/dataset.json`` (parameters, counts). ``fmt``: 'png' | 'jpeg' (fixed asinh stretch, 1 or 3
    bands), 'fits' (empty primary + one ImageHDU per band, EXTNAME = band name upper-case), 'npy' (float32
    (B, H, W) counts). The lens count is exactly round(n * lens_fraction) and every split has an exact size
    (largest remainder of ``splits`` * n) and is stratified.

    Challenge layout (Metcalf et al. 2019): ``out/classifications.csv`` (``CHALLENGE_COLUMNS``), one
    single-HDU float32 FITS per band in ``out/Public/...`` (``track`` 'space': EUC_VIS; 'ground': Band1..4 =
    ``CHALLENGE_GROUND_BANDS``), IDs from 100000, 101 x 101 px by default, values = counts *
    ``CHALLENGE_FLUX_UNIT``, ~10 % of the images with masked pixels (= ``CHALLENGE_MASK_VALUE``);
    ``out/generator.json`` records the parameters. ``bands``, ``fmt`` and ``splits`` do not apply.

    Refuses a non-empty ``out`` unless ``overwrite`` (then only the generator's own outputs are replaced).
    Files are written atomically; the manifests last. Returns a summary dict (counts, seconds, rate).
    """
    t0 = time.perf_counter()
    out = os.fspath(out)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seed = _check_seed(seed)
    if layout == "challenge":
        if track not in TRACKS:
            raise ValueError(f"track must be one of {TRACKS}, got {track!r}")
        band_names = CHALLENGE_GROUND_BANDS if track == "ground" else CHALLENGE_SPACE_BANDS
        size = CHALLENGE_SIZE if size is None else int(size)
        survey = track
        fractions = None
    else:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if bands is None:
            bands = ("g", "r", "i")
        band_names = tuple(b for b in re.split(r"[,\s]+", bands) if b) if isinstance(bands, str) else tuple(bands)
        if fmt in ("png", "jpeg"):
            _check_image_bands(len(band_names), fmt)
        size = 64 if size is None else int(size)
        survey = "ground"
        fractions = tuple(float(f) for f in splits)
        if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
            raise ValueError(f"splits: expected three non-negative fractions (train, val, test), got {splits}")
    # validate the simulation settings before touching the disk
    st = _settings(size, band_names, survey, psf, einstein_radius, source_mag, seeing, pixel_scale,
                   supersample, lens_fraction)
    sim_kw = dict(size=size, bands=band_names, seed=seed, einstein_radius=st["einstein_radius"],
                  source_mag=st["source_mag"], seeing=st["seeing"], pixel_scale=st["pixel_scale"], psf=psf,
                  survey=survey, supersample=supersample, workers=workers)
    _prepare_out(out, overwrite)

    labels, split_of = _plan(n, st["lens_fraction"], fractions, seed)
    width = max(6, len(str(n - 1)))
    params = {
        "generator": "dali_lens.data.synthetic", "layout": layout, "n": n, "size": size,
        "bands": list(band_names), "seed": int(seed), "lens_fraction": st["lens_fraction"],
        "survey": survey, "pixel_scale": st["pixel_scale"], "einstein_radius": list(st["einstein_radius"]),
        "source_mag": list(st["source_mag"]), "seeing": list(st["seeing"]), "psf": psf,
        "supersample": st["supersample"], "zeropoint": st["zeropoint"], "read_noise": st["read_noise"],
        "units": "sky-subtracted counts (a magnitude m gives 10**(-0.4*(m - zeropoint)) counts)",
    }
    rows: dict[int, list[list[str]]] = {k: [] for k in range(3)}
    challenge_rows: list[list[str]] = []
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=n, unit="img", desc="generate", leave=False)
        except ImportError:  # pragma: no cover
            bar = None
    ext = _EXT.get(fmt, "fits")
    extnames = [b.upper() for b in band_names]
    n_workers = min(4, os.cpu_count() or 1) if workers is None else max(1, int(workers))
    if layout == "standard":  # the folders that will receive files
        for k, lab in sorted(set(zip(split_of.tolist(), labels.tolist()))):
            os.makedirs(os.path.join(out, SPLITS[k], "lens" if lab else "nonlens"), exist_ok=True)
    else:
        for d, _ in _challenge_dirs(track):
            os.makedirs(os.path.join(out, "Public", d), exist_ok=True)
    pool = ThreadPoolExecutor(n_workers) if n_workers > 1 else None
    try:
        for lo in range(0, n, int(chunk)):
            hi = min(lo + int(chunk), n)
            images, cat = simulate(hi - lo, is_lens=labels[lo:hi], start=lo, **sim_kw)
            if layout == "challenge":
                _write_challenge_chunk(out, track, images, cat, seed, fsync, pool, n_workers, challenge_rows)
            else:
                u8 = stretch_to_uint8(images) if fmt in ("png", "jpeg") else None
                rels = []
                for j in range(hi - lo):
                    i = lo + j
                    k = int(split_of[i])
                    rel = f"{SPLITS[k]}/{'lens' if labels[i] else 'nonlens'}/{i:0{width}d}.{ext}"
                    rels.append(rel)
                    rows[k].append([rel, str(int(labels[i]))] +
                                   [_fmt_value(c, cat[c][j]) for c in CATALOGUE_COLUMNS])

                def write(j: int, images=images, u8=u8, rels=rels) -> None:
                    if fmt in ("png", "jpeg"):
                        data = encode_image(u8[j], fmt)
                    elif fmt == "fits":
                        data = fits_bytes(images[j], extnames)
                    else:
                        data = _npy_bytes(images[j])
                    atomic_write_bytes(os.path.join(out, rels[j]), data, fsync=fsync)

                _run_parallel(pool, n_workers, write, hi - lo)
            if bar is not None:
                bar.update(hi - lo)
    finally:
        if pool is not None:
            pool.shutdown()
        if bar is not None:
            bar.close()

    seconds = time.perf_counter() - t0
    summary: dict[str, Any] = {"out": os.path.abspath(out), "n": n, "layout": layout, "seconds": seconds,
                               "cutouts_per_s": n / seconds if seconds > 0 else float("inf"),
                               "lens": int(labels.sum()), "nonlens": int(n - labels.sum())}
    if layout == "challenge":
        challenge_rows.sort(key=lambda r: int(r[0]))
        atomic_write_csv(os.path.join(out, "classifications.csv"), CHALLENGE_COLUMNS, challenge_rows)
        summary.update(track=track, bands=list(band_names), first_id=CHALLENGE_FIRST_ID)
        params.update(track=track, flux_unit=CHALLENGE_FLUX_UNIT, mask_value=CHALLENGE_MASK_VALUE,
                      first_id=CHALLENGE_FIRST_ID, band_dirs=_challenge_dirs(track),
                      lens=summary["lens"], nonlens=summary["nonlens"])
        atomic_write_json(os.path.join(out, "generator.json"), params)
    else:
        split_summary = {}
        header = ["filepath", "label"] + list(CATALOGUE_COLUMNS)
        for k, name in enumerate(SPLITS):
            atomic_write_csv(os.path.join(out, f"{name}.csv"), header, rows[k])
            nl = sum(1 for r in rows[k] if r[1] == "1")
            split_summary[name] = {"n": len(rows[k]), "lens": nl, "nonlens": len(rows[k]) - nl}
        summary.update(format=fmt, bands=list(band_names), splits=split_summary)
        params.update(format=fmt, splits=split_summary, split_fractions=list(fractions),
                      columns=header, id_width=width,
                      stretch={"kind": "asinh", "softening": STRETCH_SOFTENING, "min": STRETCH_MIN,
                               "max": STRETCH_MAX} if fmt in ("png", "jpeg") else None)
        atomic_write_json(os.path.join(out, "dataset.json"), params)
    summary["seconds"] = time.perf_counter() - t0
    summary["cutouts_per_s"] = n / summary["seconds"]
    return summary


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


def _run_parallel(pool: ThreadPoolExecutor | None, k: int, fn, m: int) -> None:
    """fn(j) for j in range(m), split into contiguous slices over the pool's threads (PIL encoding and file
    writes release the GIL)."""
    if pool is None or m < 8:
        for j in range(m):
            fn(j)
        return
    bounds = np.linspace(0, m, k + 1).astype(int)

    def run(a_b):
        for j in range(a_b[0], a_b[1]):
            fn(j)

    list(pool.map(run, zip(bounds[:-1], bounds[1:])))


def _write_challenge_chunk(out, track, images, cat, seed, fsync, pool, n_workers, rows) -> None:
    dirs = _challenge_dirs(track)
    nb = images.shape[1]
    size = images.shape[-1]
    scaled = images * np.float32(CHALLENGE_FLUX_UNIT)
    masks = []
    for j in range(len(images)):
        idx = int(cat["index"][j])
        ident = CHALLENGE_FIRST_ID + idx
        masks.append(_challenge_mask(np.random.default_rng([int(seed), idx, 2]), size, nb))
        rows.append([str(ident), str(int(cat["is_lens"][j]))] +
                    [_fmt_value(c, cat[c][j]) for c in CHALLENGE_COLUMNS[2:]])

    def write(j: int) -> None:
        ident = CHALLENGE_FIRST_ID + int(cat["index"][j])
        planes = scaled[j]
        if masks[j] is not None:
            planes = planes.copy()
            planes[masks[j]] = CHALLENGE_MASK_VALUE
        for k, (d, prefix) in enumerate(dirs):
            atomic_write_bytes(os.path.join(out, "Public", d, f"{prefix}-{ident}.fits"),
                               fits_bytes(planes[k]), fsync=fsync)

    _run_parallel(pool, n_workers, write, len(images))
