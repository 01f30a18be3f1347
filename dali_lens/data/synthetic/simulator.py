"""``simulate``: cutouts and their catalogue, vectorised over blocks of samples shared by worker threads.

One block: draw the parameters, add the unlensed light (deflector, companion, field galaxies), ray-trace
the lensed source, convolve with the PSF, measure the lensed image in the detection band, add the noise.
See the package docstring for the physics.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
import torch

from .bands import REF_WAVELENGTH
from .parameters import (DEFAULT_DIFFICULTY, MAX_FIELD, check_seed, draw_parameters, draw_uniforms,
                         sample_labels, simulation_settings)
from .pool import default_workers
from .profiles import convolve, flux_in_sigma, lensed_source, pixel_axis, psf_otf, sersic_grid

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


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = [0, 0]           # [simulations running, torch's thread count before the first]


@contextlib.contextmanager
def single_torch_thread():
    """torch's intra-op threads off while the simulator runs: it parallelises over its own worker threads
    (independent blocks of samples), and torch's OpenMP threads on the same cores only add barriers (on a busy
    machine each op then waits for a descheduled thread: 10x slower). Restored when the last simulation
    running ends."""
    with _THREADS_LOCK:
        if _THREADS_USERS[0] == 0:
            _THREADS_USERS[1] = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS[0] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS[0] -= 1
            if _THREADS_USERS[0] == 0:
                torch.set_num_threads(_THREADS_USERS[1])


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
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in p.items()}
    o = torch.from_numpy(out)                                 # the block, in place
    o.zero_()
    _add_light(o, t, st)
    lens = np.flatnonzero(is_lens)
    src, magnification = _add_lensed_source(o, t, torch.from_numpy(lens), st)
    fwhm_pix = _fwhm_pix(p, st)
    otf = psf_otf(torch.from_numpy(fwhm_pix), st["size"], st["psf"])
    o.copy_(convolve(o, otf))
    bg_var = _background_variance(st)
    sigma_det = float(np.sqrt(bg_var[st["det"]]))
    npix, fsig = _lensed_image_stats(src, otf, lens, sigma_det, len(indices), st)
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


def _add_light(out: torch.Tensor, p: dict[str, torch.Tensor], st: dict[str, Any]) -> None:
    """Add the unlensed light to ``out``: deflector, companion (where there is one), field galaxies."""
    ps = st["pixel_scale"]
    xs = pixel_axis(st["size"])
    morph = sersic_grid(xs, xs, p["x0"], p["y0"], p["d_re"] / ps, p["d_n"], p["d_q"], p["d_phi"])
    flux = _band_fluxes(p["d_mag"].numpy(), 1.0, p["d_col"].numpy(), st)
    out += torch.from_numpy(flux.astype(np.float32))[:, :, None, None] * morph[:, None]
    sel = torch.nonzero(p["companion"] > 0).flatten()
    if len(sel):
        q = {k: p[k][sel] for k in ("x0", "y0", "c_dx", "c_dy", "c_re", "c_n", "c_q", "c_phi", "c_mag", "c_col")}
        morph = sersic_grid(xs, xs, q["x0"] + q["c_dx"], q["y0"] + q["c_dy"], q["c_re"] / ps, q["c_n"], q["c_q"],
                            q["c_phi"])
        flux = _band_fluxes(q["c_mag"].numpy(), q["c_col"].numpy(), 0.0, st)
        out[sel] += torch.from_numpy(flux.astype(np.float32))[:, :, None, None] * morph[:, None]
    for j in range(MAX_FIELD):
        sel = torch.nonzero(p["n_field"] > j).flatten()
        if not len(sel):
            continue
        f = {k: p[f"f{j}_{k}"][sel] for k in ("x", "y", "re", "q", "phi", "mag", "col")}
        morph = sersic_grid(xs, xs, f["x"], f["y"], f["re"] / ps, torch.ones(len(sel), dtype=torch.float64),
                            f["q"], f["phi"])
        flux = _band_fluxes(f["mag"].numpy(), f["col"].numpy(), 0.0, st)
        out[sel] += torch.from_numpy(flux.astype(np.float32))[:, :, None, None] * morph[:, None]


def source_band_fluxes(p: dict[str, np.ndarray], st: dict[str, Any]) -> np.ndarray:
    """The unlensed source's counts per band (m, B) of parameter draws ``p``."""
    return _band_fluxes(p["s_mag"], 0.0, p["s_col"], st)


def lensed_source_unconvolved(p: dict[str, torch.Tensor], st: dict[str, Any]) -> torch.Tensor:
    """The simulator's lensed source (m, H, W) (unit source flux, unconvolved) for parameter draws ``p`` (m,)
    each, through the shared ray-tracing (``profiles.lensed_source``; lens centre, source offset in pixels)."""
    ps = st["pixel_scale"]
    return lensed_source(p["x0"], p["y0"], p["theta_e"] / ps, p["q"], p["phi"], p["g1"], p["g2"], p["s_dx"],
                         p["s_dy"], p["s_re"] / ps, p["s_n"], p["s_q"], p["s_phi"], st["size"], st["supersample"])


def _add_lensed_source(out: torch.Tensor, p: dict[str, torch.Tensor], lens: torch.Tensor,
                       st: dict[str, Any]) -> tuple[torch.Tensor | None, np.ndarray]:
    """Ray-trace the (supersampled) pixel grid of the lenses ``lens`` through the SIE + shear and add the
    source's surface brightness at the traced positions to ``out``. Returns the unconvolved source in every
    band (len(lens), B, H, W) (None without lenses) and the magnification of every sample."""
    magnification = np.zeros(len(out))
    if not len(lens):
        return None, magnification
    q = {k: v[lens] for k, v in p.items()}
    src = lensed_source_unconvolved(q, st)
    magnification[lens.numpy()] = src.sum(dim=(1, 2), dtype=torch.float64).numpy()
    flux = torch.from_numpy(source_band_fluxes({k: v.numpy() for k, v in q.items() if k in ("s_mag", "s_col")},
                                               st).astype(np.float32))
    src = flux[:, :, None, None] * src[:, None]
    out[lens] += src
    return src, magnification


def _fwhm_pix(p: dict[str, np.ndarray], st: dict[str, Any]) -> np.ndarray:
    """The PSF FWHM per sample and band (m, B) in pixels (ground: chromatic seeing)."""
    lam = st["props"]["wavelength"]
    chrom = (lam / REF_WAVELENGTH) ** -0.2 if st["chromatic_seeing"] else np.ones(len(st["bands"]))
    return (p["seeing"][:, None] * chrom[None, :]) / st["pixel_scale"]


def _background_variance(st: dict[str, Any]) -> np.ndarray:
    """Per band (B,): sky counts per pixel + read noise^2."""
    sky = 10 ** (-0.4 * (st["props"]["sky"] - st["zeropoint"])) * st["pixel_scale"] ** 2   # counts / px (B,)
    return sky + st["read_noise"] ** 2


def _lensed_image_stats(src: torch.Tensor | None, otf: torch.Tensor, lens: np.ndarray, sigma_det: float, m: int,
                        st: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Catalogue numbers of the PSF-convolved lensed image in the detection band: pixels above 1 sigma and
    their flux in sigma, (m,) each (0 for non-lenses); ``profiles.flux_in_sigma``."""
    npix = np.zeros(m, dtype=np.int64)
    fsig = np.zeros(m)
    if src is not None:
        det = st["det"]
        conv = convolve(src[:, det:det + 1], otf[torch.from_numpy(lens), det:det + 1])
        n, f = flux_in_sigma(conv, torch.tensor([sigma_det]))
        npix[lens], fsig[lens] = n.numpy(), f.numpy()
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


def lensed_source_model(n: int, size: int = 64, bands: Sequence[str] = ("g", "r", "i"), seed: int = 0, *,
                        start: int = 0, einstein_radius: tuple[float, float] = DEFAULT_DIFFICULTY["einstein_radius"],
                        source_mag: tuple[float, float] = DEFAULT_DIFFICULTY["source_mag"],
                        seeing: tuple[float, float] | None = None, pixel_scale: float | None = None,
                        psf: str = "gaussian", survey: str = "ground", supersample: int = 2,
                        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The lensed source alone of samples ``start .. start + n - 1`` simulated as lenses (the noiseless,
    PSF-convolved part that ``simulate`` adds to the deflector's light), in counts, float32 (n, B, size, size),
    and their parameters: the draws of ``draw_parameters`` (pixels and arcsec as there) plus ``flux`` (n, B),
    the unlensed source's counts per band, and ``fwhm_pix`` (n, B), the PSF FWHM in pixels. Rendered by the
    same shared code as ``simulate`` (``profiles.lensed_source``, ``psf_otf``, ``convolve``); the injector's
    ``lensed_images`` renders the same image from the same parameters (tests/test_injection.py)."""
    st = simulation_settings(size, bands, survey, psf, einstein_radius, source_mag, seeing, pixel_scale,
                             supersample, 1.0)
    indices = np.arange(int(start), int(start) + int(n), dtype=np.int64)
    u, _ = draw_uniforms(indices, check_seed(seed))
    p = draw_parameters(u, np.ones(len(indices), dtype=bool), st)
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in p.items()}
    flux = source_band_fluxes(p, st)
    fwhm_pix = _fwhm_pix(p, st)
    src = torch.from_numpy(flux.astype(np.float32))[:, :, None, None] * lensed_source_unconvolved(t, st)[:, None]
    images = convolve(src, psf_otf(torch.from_numpy(fwhm_pix), st["size"], st["psf"])).numpy()
    return images, dict(p, flux=flux, fwhm_pix=fwhm_pix)


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
    ``workers`` threads (default: up to 4, the CPU count) share the work (numpy and torch release the GIL;
    torch's own intra-op threads are off meanwhile, ``single_torch_thread``).

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

    with single_torch_thread():
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

