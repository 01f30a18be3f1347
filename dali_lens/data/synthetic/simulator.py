"""``simulate``: cutouts and their catalogue, vectorised over blocks of samples shared by worker threads.

One block: draw the parameters, add the unlensed light (deflector, companion, field galaxies), ray-trace
the lensed source, convolve with the PSF, measure the lensed image in the detection band, add the noise.
See the package docstring for the physics.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from .bands import REF_WAVELENGTH
from .parameters import (DEFAULT_DIFFICULTY, MAX_FIELD, check_seed, draw_parameters, draw_uniforms,
                         sample_labels, simulation_settings)
from .pool import default_workers
from .profiles import pixel_grid, psf_otf, sersic_grid, sersic_points, sie_deflection

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
_SUBCHUNK = 64            # samples per vectorised block (cache-friendly); results do not depend on it


def format_value(key: str, v: Any) -> str:
    """A catalogue value as written to the CSV files: integers as such, floats with 6 significant digits."""
    if key in _INT_COLUMNS or key in ("ID", "is_lens", "label"):
        return str(int(v))
    return f"{float(v):.6g}"


def _band_fluxes(mag: np.ndarray, colour_mix: np.ndarray | float, slope: np.ndarray | float,
                 st: dict[str, Any]) -> np.ndarray:
    """Counts per band (m, B) for r-band magnitudes ``mag``; colour = mix * deflector + (1-mix) * source."""
    props = st["props"]
    mix = np.asarray(colour_mix, dtype=np.float64).reshape(-1, 1)
    col = mix * props["deflector"][None] + (1 - mix) * props["source"][None]
    slope = np.asarray(slope, dtype=np.float64).reshape(-1, 1)
    col = col + slope * (props["wavelength"][None] - REF_WAVELENGTH) / 400.0
    m = np.asarray(mag, dtype=np.float64).reshape(-1, 1) + col
    return 10 ** (-0.4 * (m - st["zeropoint"]))


def _simulate_block(indices: np.ndarray, labels: np.ndarray, seed: int, st: dict[str, Any], noise: bool,
                    out: np.ndarray) -> dict[str, np.ndarray]:
    """Simulate samples ``indices`` into ``out`` (m, B, H, W); return their catalogue."""
    u, rngs = draw_uniforms(indices, seed)
    is_lens = labels.astype(bool)
    p = draw_parameters(u, is_lens, st)
    out[...] = 0.0
    _add_light(out, p, st)
    lens = np.flatnonzero(is_lens)
    src_det, magnification = _add_lensed_source(out, p, lens, st)
    fwhm_pix, otf = _convolve_psf(out, p, st)
    bg_var = _background_variance(st)
    sigma_det = float(np.sqrt(bg_var[st["det"]]))
    npix, fsig = _lensed_image_stats(src_det, otf, lens, sigma_det, len(indices), st)
    if noise:
        _add_noise(out, rngs, bg_var)
    theta_e = np.where(is_lens, p["theta_e"], 0.0)
    ps = st["pixel_scale"]
    return {
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
        "noise_sigma": np.full(len(indices), sigma_det),
    }


def _add_light(out: np.ndarray, p: dict[str, np.ndarray], st: dict[str, Any]) -> None:
    """Add the unlensed light to ``out``: deflector, companion (where there is one), field galaxies."""
    ps = st["pixel_scale"]
    xs = pixel_grid(st["size"])[0][0]                        # 1-D pixel axis (same for x and y)
    morph = sersic_grid(xs, xs, p["x0"], p["y0"], p["d_re"] / ps, p["d_n"], p["d_q"], p["d_phi"])
    flux = _band_fluxes(p["d_mag"], 1.0, p["d_col"], st).astype(np.float32)
    out += flux[:, :, None, None] * morph[:, None]
    sel = np.flatnonzero(p["companion"] > 0)
    if len(sel):
        morph = sersic_grid(xs, xs, p["x0"][sel] + p["c_dx"][sel], p["y0"][sel] + p["c_dy"][sel],
                            p["c_re"][sel] / ps, p["c_n"][sel], p["c_q"][sel], p["c_phi"][sel])
        flux = _band_fluxes(p["c_mag"][sel], p["c_col"][sel], 0.0, st).astype(np.float32)
        out[sel] += flux[:, :, None, None] * morph[:, None]
    for j in range(MAX_FIELD):
        sel = np.flatnonzero(p["n_field"] > j)
        if not len(sel):
            continue
        morph = sersic_grid(xs, xs, p[f"f{j}_x"][sel], p[f"f{j}_y"][sel], p[f"f{j}_re"][sel] / ps,
                            np.full(len(sel), 1.0), p[f"f{j}_q"][sel], p[f"f{j}_phi"][sel])
        flux = _band_fluxes(p[f"f{j}_mag"][sel], p[f"f{j}_col"][sel], 0.0, st).astype(np.float32)
        out[sel] += flux[:, :, None, None] * morph[:, None]


def _add_lensed_source(out: np.ndarray, p: dict[str, np.ndarray], lens: np.ndarray,
                       st: dict[str, Any]) -> tuple[np.ndarray | None, np.ndarray]:
    """Ray-trace the (supersampled) pixel grid of the lenses ``lens`` through the SIE + shear and add the
    source's surface brightness at the traced positions to ``out``. Returns the unconvolved source in the
    detection band (len(lens), H, W) (None without lenses) and the magnification of every sample."""
    magnification = np.zeros(len(out))
    if not len(lens):
        return None, magnification
    size, ss, ps = st["size"], st["supersample"], st["pixel_scale"]
    Xs, Ys = pixel_grid(size, ss)
    ldx = Xs[None] - p["x0"][lens].astype(np.float32)[:, None, None]
    ldy = Ys[None] - p["y0"][lens].astype(np.float32)[:, None, None]
    theta_e_pix = p["theta_e"][lens] / ps
    bsie = theta_e_pix * np.sqrt(np.minimum(p["q"][lens], 0.9999))
    ax, ay = sie_deflection(ldx, ldy, bsie, p["q"][lens], p["phi"][lens], p["g1"][lens], p["g2"][lens])
    ldx -= ax
    ldx -= p["s_dx"][lens].astype(np.float32)[:, None, None]
    ldy -= ay
    ldy -= p["s_dy"][lens].astype(np.float32)[:, None, None]
    del ax, ay
    src = sersic_points(ldx, ldy, p["s_re"][lens] / ps, p["s_n"][lens], p["s_q"][lens], p["s_phi"][lens])
    del ldx, ldy
    if ss > 1:
        src = src.reshape(len(lens), size, ss, size, ss).mean(axis=(2, 4))
    magnification[lens] = src.sum(axis=(1, 2), dtype=np.float64)
    flux = _band_fluxes(p["s_mag"][lens], 0.0, p["s_col"][lens], st).astype(np.float32)
    out[lens] += flux[:, :, None, None] * src[:, None]
    return src * flux[:, st["det"], None, None], magnification


def _convolve_psf(out: np.ndarray, p: dict[str, np.ndarray], st: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Convolve ``out`` in place with each sample's PSF (FFT over the whole block); returns the FWHM per
    sample and band (m, B) in pixels and the transfer functions."""
    size, ps = st["size"], st["pixel_scale"]
    lam = st["props"]["wavelength"]
    chrom = (lam / REF_WAVELENGTH) ** -0.2 if st["chromatic_seeing"] else np.ones(len(st["bands"]))
    fwhm_pix = (p["seeing"][:, None] * chrom[None, :]) / ps                 # (m, B)
    otf = psf_otf(fwhm_pix, size, st["psf"])
    # norm='ortho' on both transforms: same result as the default pair, but numpy's unscaled transform
    # is ~3x slower than a scaled one (numpy 2.x)
    out[...] = np.fft.irfft2(np.fft.rfft2(out, norm="ortho") * otf, s=(size, size), norm="ortho")
    return fwhm_pix, otf


def _background_variance(st: dict[str, Any]) -> np.ndarray:
    """Per band (B,): sky counts per pixel + read noise^2."""
    sky = 10 ** (-0.4 * (st["props"]["sky"] - st["zeropoint"])) * st["pixel_scale"] ** 2   # counts / px (B,)
    return sky + st["read_noise"] ** 2


def _lensed_image_stats(src_det: np.ndarray | None, otf: np.ndarray, lens: np.ndarray, sigma_det: float, m: int,
                        st: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Catalogue numbers of the PSF-convolved lensed image in the detection band: pixels above 1 sigma and
    their flux in sigma, (m,) each (0 for non-lenses)."""
    npix = np.zeros(m, dtype=np.int64)
    fsig = np.zeros(m)
    if src_det is not None:
        size = st["size"]
        conv = np.fft.irfft2(np.fft.rfft2(src_det, norm="ortho") * otf[lens, st["det"]], s=(size, size),
                             norm="ortho")
        above = conv > sigma_det
        npix[lens] = above.sum(axis=(1, 2))
        fsig[lens] = np.where(above, conv, 0).sum(axis=(1, 2), dtype=np.float64) / sigma_det
    return npix, fsig


def _add_noise(out: np.ndarray, rngs: list[np.random.Generator], bg_var: np.ndarray) -> None:
    """Sky + photon (Gaussian limit) + read noise, from each sample's own generator; images stay
    sky-subtracted."""
    var = np.maximum(out, 0)
    var += bg_var.astype(np.float32)[None, :, None, None]
    np.sqrt(var, out=var)
    draws = np.empty(out.shape[1:], dtype=np.float32)
    for j, rng in enumerate(rngs):
        rng.standard_normal(dtype=np.float32, out=draws)
        var[j] *= draws
    out += var


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
    seed = check_seed(seed)
    st = simulation_settings(size, bands, survey, psf, einstein_radius, source_mag, seeing, pixel_scale,
                             supersample, lens_fraction)
    indices = np.arange(int(start), int(start) + n, dtype=np.int64)
    labels = sample_labels(indices, seed, is_lens, st["lens_fraction"])
    size, nb = st["size"], len(st["bands"])
    images = np.empty((n, nb, size, size), dtype=np.float32)
    blocks = [slice(i, min(i + _SUBCHUNK, n)) for i in range(0, n, _SUBCHUNK)]
    workers = max(1, min(default_workers(workers), len(blocks)))

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

