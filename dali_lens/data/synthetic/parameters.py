"""Simulation settings and parameter draws: survey presets, difficulty defaults, validation, seeds, labels,
and the map from each sample's uniforms to its physical parameters (lens mass, deflector light, source,
seeing, companion, field galaxies).

Determinism: every sample ``index`` has its own generator, ``np.random.default_rng([seed, index])``, from
which it draws a fixed-length vector of uniforms (its parameters) and then its noise; its label, when drawn,
comes from ``default_rng([seed, index, 1])``.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from ...choices import PSFS, Parsed
from .bands import band_properties, detection_band, parse_bands

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

_N_UNIFORMS = 64          # uniforms drawn per sample (fixed: changing it changes every sample)
MAX_FIELD = 2            # field galaxies per cutout, at most

#: Distributions of the lens and source shape shared with the injector (``dali_lens.injection``): mass axis ratio
#: q uniform in MASS_Q, external shear |gamma| = SHEAR_MAX sqrt(u) (uniform in the disc |gamma| <= SHEAR_MAX),
#: source axis ratio uniform in SOURCE_Q, source offset |beta| <= SOURCE_OFFSET theta_E uniform in radius (inside
#: the region where the SIE's images form arcs, rings, doubles and crosses).
MASS_Q = (0.45, 1.0)
SHEAR_MAX = 0.08
SOURCE_Q = (0.35, 1.0)
SOURCE_OFFSET = 0.85


def parse_pair(value, name: str) -> tuple[float, float]:
    """A (min, max) range from a pair or from text such as '0.5,2.5'; ValueError naming ``name`` if not."""
    if isinstance(value, str):
        value = [v for v in re.split(r"[,:\s]+", value.strip()) if v]
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a (min, max) pair of numbers, got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"{name}: expected min <= max, got ({lo}, {hi})")
    return lo, hi


def parse_positive_pair(value, name: str = "value") -> tuple[float, float]:
    """:func:`parse_pair` with ``0 < min`` (Einstein radius, seeing)."""
    lo, hi = parse_pair(value, name)
    if lo <= 0:
        raise ValueError(f"{lo:g} is not > 0")
    return lo, hi


def parse_split_fractions(text: str) -> tuple[float, ...]:
    """``TRAIN,VAL,TEST`` split fractions: three finite non-negative numbers, not all 0."""
    vals = tuple(float(v) for v in text.split(","))
    if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0 or not all(map(math.isfinite, vals)):
        raise ValueError("not three non-negative fractions")
    return vals


#: the generator's MIN,MAX options (--source-mag; --einstein-radius and --seeing, > 0) and --splits, with
#: their documented ranges (``choices.Parsed``)
PAIR = Parsed(lambda t: parse_pair(t, "value"), "MIN,MAX numbers with MIN <= MAX", ("x", "2,1", "1,2,3"))
POSITIVE_PAIR = Parsed(parse_positive_pair, "MIN,MAX numbers with 0 < MIN <= MAX", ("x", "0,1", "2,1"))
SPLITS = Parsed(parse_split_fractions, "three non-negative fractions TRAIN,VAL,TEST (not all 0)",
                ("x", "-1,1,1", "0,0,0", "1,1"))


def simulation_settings(size, bands, survey, psf, einstein_radius, source_mag, seeing, pixel_scale,
                        supersample, lens_fraction) -> dict[str, Any]:
    """Checked simulation settings (ValueError on a bad one), survey presets filled in, band properties."""
    if survey not in SURVEYS:
        raise ValueError(f"survey must be one of {tuple(SURVEYS)}, got {survey!r}")
    if psf not in PSFS:
        raise ValueError(f"psf must be one of {PSFS}, got {psf!r}")
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    bands = tuple(str(b) for b in parse_bands(bands))
    if not bands:
        raise ValueError("bands: at least one band is needed")
    preset = SURVEYS[survey]
    pixel_scale = float(preset["pixel_scale"] if pixel_scale is None else pixel_scale)
    if not pixel_scale > 0:
        raise ValueError(f"pixel_scale must be > 0, got {pixel_scale}")
    er = parse_pair(einstein_radius, "einstein_radius")
    if er[0] <= 0:
        raise ValueError(f"einstein_radius must be > 0 arcsec, got {er}")
    sm = parse_pair(source_mag, "source_mag")
    see = parse_pair(preset["seeing"] if seeing is None else seeing, "seeing")
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
        "props": props, "det": detection_band(bands, props["wavelength"]),
    }


def draw_uniforms(indices: np.ndarray, seed: int) -> tuple[np.ndarray, list[np.random.Generator]]:
    """Per sample ``index``: its generator ``default_rng([seed, index])`` and the fixed-length vector of
    uniforms (m, _N_UNIFORMS) drawn first from it (the parameters); the generators go on to draw the noise."""
    u = np.empty((len(indices), _N_UNIFORMS))
    rngs = []
    for j, idx in enumerate(indices):
        rng = np.random.default_rng([int(seed), int(idx)])
        u[j] = rng.random(_N_UNIFORMS)
        rngs.append(rng)
    return u, rngs


def draw_parameters(u: np.ndarray, is_lens: np.ndarray, st: dict[str, Any]) -> dict[str, np.ndarray]:
    """Map the per-sample uniforms ``u`` (m, _N_UNIFORMS) to physical parameters (pixels, counts).

    Each component reads its own fixed slots of ``u``; slots 46..63 are spare (kept so that new parameters
    do not shift the noise stream)."""
    p: dict[str, np.ndarray] = {}
    _draw_mass(u, st, p)
    _draw_deflector_light(u, p)
    _draw_source(u, st, p)
    see_lo, see_hi = st["seeing"]
    p["seeing"] = see_lo + (see_hi - see_lo) * u[:, 21]             # r band FWHM, arcsec
    _draw_companion(u, is_lens, st, p)
    _draw_field(u, st["size"], p)
    return p


def _draw_mass(u: np.ndarray, st: dict[str, Any], p: dict[str, np.ndarray]) -> None:
    """SIE: Einstein radius (arcsec), axis ratio, orientation; external shear (slots 1-3, 5, 6)."""
    lo, hi = st["einstein_radius"]
    p["theta_e"] = lo + (hi - lo) * u[:, 1]                          # arcsec
    p["q"] = MASS_Q[0] + (MASS_Q[1] - MASS_Q[0]) * u[:, 2]           # mass axis ratio
    p["phi"] = np.pi * u[:, 3]
    gamma = SHEAR_MAX * np.sqrt(u[:, 5])
    gphi = np.pi * u[:, 6]
    p["g1"], p["g2"] = gamma * np.cos(2 * gphi), gamma * np.sin(2 * gphi)
    p["gamma"] = gamma


def _draw_deflector_light(u: np.ndarray, p: dict[str, np.ndarray]) -> None:
    """Deflector light: Faber-Jackson-like scaling with theta_E, scatter; follows the mass (slots 4, 7-11, 20)."""
    theta_e = p["theta_e"]
    p["d_mag"] = np.clip(19.6 - 5 * np.log10(theta_e) + 0.8 * (u[:, 7] - 0.5), 16.0, 23.0)
    p["d_n"] = 3.0 + 1.0 * u[:, 8]
    p["d_re"] = 1.0 * theta_e ** 0.7 * 10 ** (0.3 * (u[:, 9] - 0.5))  # arcsec
    p["d_q"] = np.clip(p["q"] + 0.2 * (u[:, 4] - 0.5), 0.4, 1.0)
    p["d_phi"] = p["phi"] + 0.2 * (u[:, 4] - 0.5)
    p["x0"] = u[:, 10] - 0.5
    p["y0"] = u[:, 11] - 0.5
    p["d_col"] = 0.3 * (u[:, 20] - 0.5)                              # colour slope jitter


def _draw_source(u: np.ndarray, st: dict[str, Any], p: dict[str, np.ndarray]) -> None:
    """The lensed source: Sersic, offset |beta| <= 0.85 theta_E uniform in radius (slots 12-19)."""
    slo, shi = st["source_mag"]
    p["s_mag"] = slo + (shi - slo) * u[:, 12]
    p["s_re"] = 0.08 + 0.32 * u[:, 13]                                # arcsec
    p["s_n"] = 0.7 + 0.8 * u[:, 14]
    p["s_q"] = SOURCE_Q[0] + (SOURCE_Q[1] - SOURCE_Q[0]) * u[:, 15]
    p["s_phi"] = np.pi * u[:, 16]
    r_off = SOURCE_OFFSET * p["theta_e"] * u[:, 17] / st["pixel_scale"]       # pixels (uniform in radius)
    a_off = 2 * np.pi * u[:, 18]
    p["s_dx"], p["s_dy"] = r_off * np.cos(a_off), r_off * np.sin(a_off)
    p["s_col"] = 0.3 * (u[:, 19] - 0.5)


def _draw_companion(u: np.ndarray, is_lens: np.ndarray, st: dict[str, Any], p: dict[str, np.ndarray]) -> None:
    """Companion: lenses 15 % (half blue, half red); non-lenses 40 % blue (hard negatives, half of them
    tangential, arc-like), 15 % red, 45 % none (slots 22-30)."""
    k = u[:, 22]
    comp = np.zeros(len(u), dtype=np.int64)
    shared = k < 0.15
    comp[shared] = np.where(u[shared, 30] < 0.5, 1, 2)
    nl = ~is_lens
    comp[nl & (k >= 0.15) & (k < 0.475)] = 1                        # -> 40 % blue in all
    comp[nl & (k >= 0.475) & (k < 0.55)] = 2                         # -> 15 % red in all, 45 % none
    p["companion"] = comp
    blue = comp == 1
    slo, shi = st["source_mag"]
    p["c_mag"] = np.where(blue, (slo - 1.0) + (shi - slo - 0.5) * u[:, 23], 20.5 + 3.0 * u[:, 23])
    theta_e_pix = p["theta_e"] / st["pixel_scale"]
    dist = np.where(is_lens, 1.6 + 2.0 * u[:, 24], 1.0 + 2.0 * u[:, 24]) * theta_e_pix
    dist = np.clip(dist, 2.0, 0.42 * st["size"])
    ang = 2 * np.pi * u[:, 25]
    p["c_dx"], p["c_dy"] = dist * np.cos(ang), dist * np.sin(ang)
    p["c_re"] = np.where(blue, 0.15 + 0.45 * u[:, 26], 0.3 + 0.6 * u[:, 26])
    p["c_q"] = np.where(blue, 0.25 + 0.75 * u[:, 27], 0.5 + 0.5 * u[:, 27])
    tangential = blue & (u[:, 28] < 0.5)
    p["c_phi"] = np.where(tangential, ang + np.pi / 2, np.pi * u[:, 28])
    p["c_n"] = np.where(blue, 0.7 + 0.8 * u[:, 29], 2.5 + 1.5 * u[:, 29])
    p["c_col"] = np.where(blue, 0.0, 1.0)                            # 0 = source colours, 1 = deflector


def _draw_field(u: np.ndarray, size: int, p: dict[str, np.ndarray]) -> None:
    """0-2 faint field galaxies anywhere in the frame (slot 31, then 7 slots each from 32)."""
    nf = np.searchsorted([0.5, 0.85], u[:, 31], side="right")
    p["n_field"] = nf.astype(np.int64)
    for j in range(MAX_FIELD):
        b = 32 + 7 * j
        p[f"f{j}_x"] = (u[:, b] - 0.5) * size
        p[f"f{j}_y"] = (u[:, b + 1] - 0.5) * size
        p[f"f{j}_mag"] = 22.0 + 3.5 * u[:, b + 2]
        p[f"f{j}_re"] = 0.15 + 0.45 * u[:, b + 3]
        p[f"f{j}_q"] = 0.3 + 0.7 * u[:, b + 4]
        p[f"f{j}_phi"] = np.pi * u[:, b + 5]
        p[f"f{j}_col"] = u[:, b + 6]


def check_seed(seed) -> int:
    """``seed`` as an int; ValueError unless it is a non-negative integer."""
    if isinstance(seed, bool) or int(seed) != seed or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def sample_labels(indices: np.ndarray, seed: int, is_lens, lens_fraction: float) -> np.ndarray:
    """Labels (m,) bool of samples ``indices``: drawn (None), one for all (a bool) or one per sample."""
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

