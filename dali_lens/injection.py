"""Simulated lensed arcs painted onto real cutouts, on the fly, batched in torch on the loader's device.

A user's survey cutouts of (mostly) non-lenses become training lenses: each sample gets, with probability
``--inject P``, the image of a Sersic source lensed by a singular isothermal ellipsoid (SIE) plus external shear
centred on the cutout's central galaxy, convolved with the survey's PSF and scaled to a drawn S/N against the
band's noise. The physics is the built-in generator's own (``dali_lens.data.synthetic.profiles``: the same
Sersic, deflection and PSF code renders the generator's lensed sources), so an arc planted on an all-zero image
equals the simulator's lensed-source image for the same parameters (tests/test_injection.py).

What is drawn, per sample (``draw``; every knob has a documented default range, ``InjectionSettings``):

* the lens: Einstein radius theta_E uniform in ``--inject-theta-e`` (arcsec, default 0.8-2.0); centre at the cutout
  centre plus an offset uniform in the disc of radius ``--inject-offset`` (arcsec, default 0.1); mass axis ratio
  q uniform in [0.45, 1], orientation uniform, external shear |gamma| <= 0.08 uniform in the disc (the
  generator's distributions, ``synthetic.parameters``);
* the source: circularised effective radius uniform in ``--inject-source-re`` (arcsec, default 0.1-0.4), Sersic
  index uniform in ``--inject-sersic-n`` (default 0.5-2), axis ratio uniform in [0.35, 1], orientation uniform,
  position |beta| <= 0.85 theta_E from the lens centre, uniform in radius (inside the region where the SIE forms
  arcs, rings, doubles and crosses, as the generator places its sources);
* its brightness: the S/N of the lensed image uniform in ``--inject-snr`` (default 10-50). **S/N** is the
  generator's ``flux_lensed_image_in_sigma`` summed over all bands: sum over the pixels of every band where the
  noiseless arc exceeds that band's noise sigma of arc / sigma (``profiles.flux_in_sigma``). The arc is scaled
  so that this equals the drawn value (exactly on the stretches where it varies continuously; pixels cross the
  threshold one at a time, each adding at least 1, so where the drawn value falls in such a jump the nearer
  end is taken: within +-0.5, or half the jump where bands with equal colours and noise cross together); the
  catalogue holds the S/N of the scaled arc. A draw that lenses less than ``MIN_FLUX_IN_CUTOUT`` (1 %) of the
  source's flux into the cutout (an Einstein radius larger than a small cutout) is not injected;
* its colours: per-band flux ratios ``colours`` (default: the generator's blue star-forming source,
  ``synthetic.bands``, at the bands' positions between g and z for the band count);
* the PSF: a Gaussian (or Moffat, beta = 3.5) of FWHM ``--psf-fwhm`` per band (arcsec; one value for all bands;
  default 1.0 arcsec), or a PSF image per band (``--psf FILE``: (C, k, k) or one (k, k) for all bands; any
  size k, odd or even (the centre is pixel k // 2); finite, non-negative, each band's sum > 0; normalised to unit
  sum). Convolution is by FFT on the cutout's periodic grid.

Determinism: every draw comes from a counter-based hash of (seed, epoch, sample index, slot) (32-bit integer
arithmetic in int64 tensors, identical on CPU and CUDA), so the arc of a sample depends on nothing else: not on
the batch it is in, its position there, the number of workers or DDP ranks. Its parameters are the same bit for
bit; its pixels to float rounding (~1e-6 of its peak: two samples share one complex FFT, and devices round
differently), and bit for bit in the same batch on the same device, so a mid-epoch resume repeats the
injections exactly; the next epoch draws new ones (fixed sets: pass the same epoch, e.g. 0).

Use::

    settings = InjectionSettings(probability=0.5, pixel_scale=0.2, psf_fwhm=(0.9, 0.8, 0.8))
    arc, inject, catalogue = arcs(settings, bands=3, size=64, indices=idx, epoch=epoch, noise_sigma=sigma)
    images = images + arc            # native resolution, data's flux units; injected samples are lenses

``noise_sigma`` is each band's background noise per pixel in the data's units ((C,) or (B, C)). The catalogue
(``CATALOGUE``) holds, per sample: inject, theta_e, snr, magnification, source_re, sersic_n, source_q,
lens_q, lens_phi, shear, x0, y0, source_x, source_y, npix, source_flux (0 where not injected).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .choices import NON_NEGATIVE_NUMBER, POSITIVE, PROBABILITY, PSFS, SEED, OptionRangeError, Parsed, Range
from .data.synthetic.bands import band_properties
from .data.synthetic.parameters import MASS_Q, SHEAR_MAX, SOURCE_OFFSET, SOURCE_Q, parse_pair
from .data.synthetic.profiles import convolve, convolve_bands, kernel_otf, lensed_source, psf_otf

__all__ = ["InjectionSettings", "draw", "lensed_images", "arcs", "default_colours", "uniforms", "scale_to_snr",
           "OPTIONS", "CATALOGUE", "DEFAULT_PSF_FWHM", "MIN_FLUX_IN_CUTOUT"]

DEFAULT_PSF_FWHM = 1.0    #: arcsec, every band, when neither psf_fwhm nor psf is given
#: a draw is injected only if at least this much of the (unit) source's lensed flux falls inside the cutout
MIN_FLUX_IN_CUTOUT = 0.01

#: catalogue columns of ``arcs`` (B,) each: inject (bool), then float64 values (0 where not injected):
#: theta_e, source_re, x0, y0, source_x, source_y (arcsec; x0, y0 the lens centre's offset from the cutout
#: centre, source_x/y the source's offset from the lens centre; x along the image's last axis (columns), y along
#: its rows), snr (as measured on the scaled arc, see the module docstring), magnification (lensed flux in the
#: cutout before the PSF / the unlensed source's flux, the generator's definition: the Sersic's analytic unit
#: flux, of which the 0.3 px softened core of a source smaller than ~1 px holds a few per cent less),
#: sersic_n, source_q, lens_q, lens_phi (rad), shear (|gamma|), npix (pixels above 1 sigma, all bands),
#: source_flux (the unlensed source's flux in data units per unit of ``colours``).
CATALOGUE = ("inject", "theta_e", "snr", "magnification", "source_re", "sersic_n", "source_q", "lens_q", "lens_phi",
             "shear", "x0", "y0", "source_x", "source_y", "npix", "source_flux")


# ----------------------------------------------------------------------------------------------- settings

def _numbers(value) -> tuple[float, ...]:
    if isinstance(value, str):
        value = [v for v in re.split(r"[,:\s]+", value.strip()) if v]
    try:
        vals = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError("not a list of numbers") from None
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("not finite")
    return vals


def _pair(lo_min: float, lo_open: bool = False, hi_max: float | None = None):
    """A parser of MIN,MAX ranges (``synthetic.parameters.parse_pair``: two finite numbers, MIN <= MAX) with
    MIN >= ``lo_min`` (> where ``lo_open``) and MAX <= ``hi_max``."""
    def parse(value) -> tuple[float, float]:
        lo, hi = parse_pair(value, "MIN,MAX")
        if lo < lo_min or (lo_open and lo == lo_min):
            raise ValueError(f"MIN {lo:g} is {'<=' if lo_open else '<'} {lo_min:g}")
        if hi_max is not None and hi > hi_max:
            raise ValueError(f"MAX {hi:g} > {hi_max:g}")
        return lo, hi
    return parse


def _positive_list(value) -> tuple[float, ...]:
    vals = _numbers(value)
    if not vals:
        raise ValueError("no values")
    if min(vals) <= 0:
        raise ValueError(f"{min(vals):g} is not > 0")
    return vals


#: The documented range of every injection option (``choices.Parsed`` / ``Range``: argparse's type= and the
#: library's check), by InjectionSettings field: (flag, range).
OPTIONS: dict[str, tuple[str, Any]] = {
    "probability": ("--inject", PROBABILITY),
    "theta_e": ("--inject-theta-e", Parsed(_pair(0.0), "MIN,MAX arcsec with 0 <= MIN <= MAX",
                                           ("x", "-1,1", "2,1", "1"))),
    "source_re": ("--inject-source-re", Parsed(_pair(0.0, lo_open=True), "MIN,MAX arcsec with 0 < MIN <= MAX",
                                               ("x", "0,1", "0.4,0.1"))),
    "sersic_n": ("--inject-sersic-n", Parsed(_pair(0.3, hi_max=10.0), "MIN,MAX with 0.3 <= MIN <= MAX <= 10",
                                             ("x", "0.1,1", "2,1", "1,11"))),
    "snr": ("--inject-snr", Parsed(_pair(0.0, lo_open=True), "MIN,MAX with 0 < MIN <= MAX",
                                   ("x", "0,10", "50,10"))),
    "offset": ("--inject-offset", NON_NEGATIVE_NUMBER),
    "pixel_scale": ("--pixel-scale", POSITIVE),
    "psf_fwhm": ("--psf-fwhm", Parsed(_positive_list, "comma-separated FWHMs > 0 arcsec (one per band, or one)",
                                      ("x", "0", "1,-1"))),
    "colours": ("--inject-colours", Parsed(_positive_list, "comma-separated flux ratios > 0, one per band",
                                           ("x", "0", "1,-1"))),
    "seed": ("--inject-seed", SEED),
    "supersample": ("--inject-supersample", Range(int, 1, 8)),
}


@dataclass(frozen=True)
class InjectionSettings:
    """What ``draw`` draws and how ``lensed_images`` renders it; validated on construction (ValueError, an
    ``OptionRangeError``, whose message starts with the CLI option: ``--inject-theta-e must be ...``).

    Ranges are (MIN, MAX) pairs (or 'MIN,MAX' text), drawn uniformly. ``psf`` is a (C, k, k) or (k, k) array of
    PSF images (exclusive with ``psf_fwhm``); ``colours`` per-band flux ratios of the source (their overall scale
    does not matter: arcs are scaled to the S/N). ``supersample`` ray-traces s x s rays per pixel (1 by default,
    see ``docs/DESIGN.md``: the generator uses 2; 1 is ~4x cheaper and within a few per cent in flux except for
    sources smaller than a pixel). Band counts are checked when the bands are known (``check_bands``)."""

    probability: float = 0.5
    theta_e: tuple[float, float] = (0.8, 2.0)
    source_re: tuple[float, float] = (0.1, 0.4)
    sersic_n: tuple[float, float] = (0.5, 2.0)
    snr: tuple[float, float] = (10.0, 50.0)
    offset: float = 0.1
    pixel_scale: float = 0.2
    psf_fwhm: tuple[float, ...] | None = None
    psf: np.ndarray | None = field(default=None, compare=False, repr=False)
    colours: tuple[float, ...] | None = None
    seed: int = 0
    psf_profile: str = "gaussian"
    supersample: int = 1

    def __post_init__(self):
        for name, (flag, rng) in OPTIONS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(rng, Parsed):
                try:
                    value = rng.parse(value)
                except ValueError as exc:
                    raise OptionRangeError(f"{flag} must be {rng.describe}, got {value!r} ({exc})") from None
            else:
                rng.check(flag, value)
                value = rng.kind(value)
            object.__setattr__(self, name, value)
        if self.psf_profile not in PSFS:
            raise OptionRangeError(f"--psf-profile must be one of {', '.join(PSFS)}, got {self.psf_profile!r}")
        if self.psf is not None:
            if self.psf_fwhm is not None:
                raise OptionRangeError("--psf: give either --psf or --psf-fwhm, not both")
            object.__setattr__(self, "psf", _check_psf(self.psf))

    def check_bands(self, bands: int) -> None:
        """ValueError (naming the option) unless psf_fwhm, psf and colours fit ``bands`` bands."""
        if self.psf_fwhm is not None and len(self.psf_fwhm) not in (1, bands):
            raise OptionRangeError(f"--psf-fwhm: {len(self.psf_fwhm)} values for {bands} bands (give 1 or {bands})")
        if self.psf is not None and self.psf.ndim == 3 and self.psf.shape[0] != bands:
            raise OptionRangeError(f"--psf: {self.psf.shape[0]} PSF images for {bands} bands "
                                   f"(give {bands}, or one (k, k) image for all)")
        if self.colours is not None and len(self.colours) != bands:
            raise OptionRangeError(f"--inject-colours: {len(self.colours)} values for {bands} bands")

    def fwhm(self, bands: int) -> tuple[float, ...]:
        """The Gaussian/Moffat PSF FWHM per band, arcsec."""
        f = self.psf_fwhm if self.psf_fwhm is not None else (DEFAULT_PSF_FWHM,)
        return tuple(f) * bands if len(f) == 1 else tuple(f)

    def colour_ratios(self, bands: int) -> tuple[float, ...]:
        return tuple(self.colours) if self.colours is not None else default_colours(bands)


def _check_psf(psf) -> np.ndarray:
    """PSF images as a read-only float64 (C, k, k) or (k, k) array; OptionRangeError naming --psf if unusable."""
    try:
        arr = np.array(psf, dtype=np.float64)
    except (TypeError, ValueError):
        raise OptionRangeError("--psf: not an array of numbers") from None
    if arr.ndim not in (2, 3) or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 1 or arr.size == 0:
        raise OptionRangeError(f"--psf: expected (bands, k, k) or (k, k) PSF images, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise OptionRangeError("--psf: the PSF has non-finite values")
    if (arr < 0).any():
        raise OptionRangeError("--psf: the PSF has negative values (clip them to 0)")
    if (arr.reshape(-1, arr.shape[-1] ** 2).sum(axis=1) <= 0).any():
        raise OptionRangeError("--psf: a PSF image sums to 0")
    arr.setflags(write=False)
    return arr


def default_colours(bands: int) -> tuple[float, ...]:
    """Flux ratios (relative to r) of the generator's blue source (``synthetic.bands.SED_TABLE``) for ``bands``
    bands placed by position between g and z (the generator's rule for unknown band names; one band: r)."""
    props = band_properties([f"band{k}" for k in range(int(bands))])
    return tuple(float(10 ** (-0.4 * c)) for c in props["source"])


# ----------------------------------------------------------------------------------------------- draws

_M32 = 0xFFFFFFFF
_N_SLOTS = 16


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding values in [0, 2^32): every product
    stays below 2^63, so it is exact and identical on every device."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def uniforms(seed: int, epoch: int, indices: torch.Tensor, slots: int = _N_SLOTS) -> torch.Tensor:
    """Counter-based uniforms in (0, 1), float64 (B, slots): a hash of (seed, epoch, index, slot), so each
    value depends on nothing else (batch, device, order)."""
    idx = torch.as_tensor(indices, dtype=torch.int64)             # (any int64, negative ones too)
    h = _mix(torch.full_like(idx, (int(seed) ^ 0x9E3779B9) & _M32))
    h = _mix(h ^ (int(epoch) & _M32))
    h = _mix(h ^ ((int(epoch) >> 32) & _M32) ^ 0x85EBCA6B)
    h = _mix(h ^ (idx & _M32))
    h = _mix(h ^ ((idx >> 32) & _M32) ^ 0xC2B2AE35)
    slot = torch.arange(slots, dtype=torch.int64, device=idx.device)
    hs = _mix(h[:, None] ^ _mix((slot * 0x27D4EB2F + 0x165667B1) & _M32)[None, :])
    return (hs.to(torch.float64) + 0.5) / 2.0 ** 32


def draw(settings: InjectionSettings, bands: int, indices, epoch: int) -> dict[str, torch.Tensor]:
    """Per-sample parameters (B,) each for samples ``indices`` (int64 (B,), on the device the draws are made
    on) in ``epoch``: ``inject`` (bool: drawn < probability) and the lens and source (arcsec, radians; see the
    module docstring), float64. Deterministic in (settings.seed, epoch, index)."""
    settings.check_bands(int(bands))
    u = uniforms(settings.seed, epoch, indices)
    lo, hi = settings.theta_e
    theta_e = lo + (hi - lo) * u[:, 1]
    r_off = settings.offset * torch.sqrt(u[:, 6])                     # uniform in the disc
    a_off = 2 * math.pi * u[:, 7]
    r_src = SOURCE_OFFSET * theta_e * u[:, 8]                         # uniform in radius (the generator's)
    a_src = 2 * math.pi * u[:, 9]
    gamma = SHEAR_MAX * torch.sqrt(u[:, 4])
    g_phi = math.pi * u[:, 5]

    def uniform(rng, k):
        return rng[0] + (rng[1] - rng[0]) * u[:, k]

    return {
        "inject": u[:, 0] < settings.probability,
        "theta_e": theta_e,
        "lens_q": uniform(MASS_Q, 2),
        "lens_phi": math.pi * u[:, 3],
        "shear": gamma,
        "g1": gamma * torch.cos(2 * g_phi),
        "g2": gamma * torch.sin(2 * g_phi),
        "x0": r_off * torch.cos(a_off),
        "y0": r_off * torch.sin(a_off),
        "source_x": r_src * torch.cos(a_src),
        "source_y": r_src * torch.sin(a_src),
        "source_re": uniform(settings.source_re, 10),
        "sersic_n": uniform(settings.sersic_n, 11),
        "source_q": uniform(SOURCE_Q, 12),
        "source_phi": math.pi * u[:, 13],
        "snr": uniform(settings.snr, 14),
    }


# ----------------------------------------------------------------------------------------------- rendering

def _otf(settings: InjectionSettings, params: dict, bands: int, size: int, device) -> torch.Tensor:
    """Transfer functions (B, C, size, size//2+1) for per-sample ``params["psf_fwhm"]`` (B, C) (``convolve``);
    else full ones (C, size, size) for ``convolve_bands``, (1, size, size) where every band has the same PSF
    (one (k, k) image, or equal FWHMs: the default)."""
    ps = settings.pixel_scale
    if "psf_fwhm" in params:
        return psf_otf(torch.as_tensor(params["psf_fwhm"], device=device).to(torch.float64) / ps, size,
                       settings.psf_profile)
    if settings.psf is not None:
        ker = torch.from_numpy(np.array(settings.psf)).to(device)
        return kernel_otf(ker[None] if ker.ndim == 2 else ker, size, full=True)
    fwhm = settings.fwhm(bands)
    fwhm = fwhm[:1] if len(set(fwhm)) == 1 else fwhm
    return psf_otf(torch.tensor(fwhm, dtype=torch.float64, device=device) / ps, size, settings.psf_profile,
                   full=True)


def _render(params: dict, size: int, bands: int, settings: InjectionSettings, device,
            flux: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (B, C, size, size) float32, magnification (B,) float64) of ``lensed_images``; ``flux`` (B, C)
    or (C,): the unlensed source's flux per band (default: ``params["flux"]``, else the settings' colours).
    One FFT convolution per band (two samples per complex transform), or one in all where the bands share the
    PSF."""
    ps = settings.pixel_scale
    dev = torch.device(device) if device is not None else params["theta_e"].device
    p = {k: torch.as_tensor(v, device=dev) for k, v in params.items()}
    src = lensed_source(p["x0"] / ps, p["y0"] / ps, p["theta_e"] / ps, p["lens_q"], p["lens_phi"], p["g1"], p["g2"],
                        p["source_x"] / ps, p["source_y"] / ps, p["source_re"] / ps, p["sersic_n"], p["source_q"],
                        p["source_phi"], size, settings.supersample, dev)
    magnification = src.sum(dim=(1, 2)).to(torch.float64)
    if flux is None:
        flux = p["flux"] if "flux" in p else torch.tensor(settings.colour_ratios(bands), device=dev)
    flux = torch.as_tensor(flux, device=dev).to(torch.float32)
    flux = flux.reshape((-1, bands, 1, 1))
    otf = _otf(settings, p, bands, size, dev)
    img = convolve(src[:, None], otf) if otf.ndim == 4 else convolve_bands(src, otf)    # (B, C or 1, H, W)
    return (img.mul_(flux) if img.shape[1] == bands else img * flux), magnification


def lensed_images(params: dict, size: int, bands: int, settings: InjectionSettings, device=None) -> torch.Tensor:
    """The noiseless PSF-convolved lensed-source images (B, C, size, size) float32 of parameters ``params``
    (``draw``'s keys; (B,) tensors), in flux units before the S/N scaling: the unlensed source has flux
    ``colours[c]`` in band c (or ``params["flux"]`` (B, C) where given), so band c sums to about
    magnification x colours[c]. ``params["psf_fwhm"]`` (B, C) arcsec, where given, overrides the settings' PSF
    per sample. Rendered by the generator's own code (``synthetic.profiles.lensed_source``, ``psf_otf`` /
    ``kernel_otf``, ``convolve``), on ``device`` (default: the parameters')."""
    return _render(params, int(size), int(bands), settings, device)[0]


def scale_to_snr(images: torch.Tensor, sigma: torch.Tensor, snr: torch.Tensor, snr_max: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The factor k (B,) float64 that brings the S/N of ``k * images`` against ``sigma`` ((C,) or (B, C);
    ``profiles.flux_in_sigma``, the module docstring's S/N) closest to ``snr`` (B,), with the S/N reached and
    the number of pixels above 1 sigma (B,) of the scaled images.

    F(k) = k * (sum of v over the pixels with k v > 1), v = image / sigma, increases with k, continuously
    between threshold crossings, and jumps by exactly 1 where a pixel crosses the threshold. Where ``snr`` lies
    on a continuous stretch F(k) = snr exactly; where it falls in a jump, the nearer end is taken (|F - snr| <=
    0.5). Every pixel counted adds > 1, so at most ceil(snr) + 1 pixels count: only the top floor(max snr) + 3
    values per sample are needed (``topk``, not a sort; ``snr_max``, an upper bound of ``snr`` known beforehand,
    spares reading it back from the device). k = 0 for an image without a positive pixel."""
    b = images.shape[0]
    sigma = torch.as_tensor(sigma, device=images.device).to(torch.float32)
    v = (images / sigma.reshape(sigma.shape[:-1] + (sigma.shape[-1], 1, 1))).reshape(b, -1)
    target = torch.as_tensor(snr, device=images.device).to(torch.float64)
    if b == 0:
        z = torch.zeros(0, dtype=torch.float64, device=images.device)
        return z, z, z.to(torch.int64)
    top = float(target.max()) if snr_max is None else float(snr_max)
    kk = min(v.shape[1], int(math.floor(top)) + 3)
    vs = torch.topk(v, kk, dim=1, sorted=True).values.to(torch.float64)      # (B, K) descending
    s = torch.cumsum(vs, dim=1)                                               # S_j: top j + 1 pixels
    pos = vs > 0
    inf = torch.full_like(vs, math.inf)
    inv = torch.where(pos, 1.0 / vs, inf)                                     # pixel j counts for k > inv_j
    inv_next = torch.cat([inv[:, 1:], inf[:, :1] if kk == v.shape[1] else inv[:, -1:]], dim=1)
    cand = torch.maximum(inv, target[:, None] / torch.where(pos, s, torch.ones_like(s)))
    k, j = torch.where(pos & (cand < inv_next), cand, inf).min(dim=1)  # smallest k with F(k) >= snr: segment j
    found = torch.isfinite(k)
    j1 = j[:, None]
    v_j, inv_j, s_j = vs.gather(1, j1)[:, 0], inv.gather(1, j1)[:, 0], s.gather(1, j1)[:, 0]
    # j is the last of the pixels equal to v_j (equal values cross together: a tie's first segments are empty)
    n_eq = (vs == v_j[:, None]).sum(dim=1)
    s_prev = s_j - n_eq * v_j                                                  # the pixels above v_j
    first = j + 1 - n_eq                                                       # how many those are
    inv_prev = torch.where(first > 0, inv.gather(1, (first - 1).clamp(min=0)[:, None])[:, 0],
                           torch.zeros_like(inv_j))
    # in a jump (k = inv_j): the S/N just below (pixel j not counted) or at it (counted), whichever is nearer
    f_plus, f_minus = s_j * inv_j, s_prev * inv_j
    below = found & (k <= inv_j) & (target - f_minus < f_plus - target)
    # margins keep a pixel at its threshold on the intended side after float32 rounding, never past a neighbour's
    k_up = torch.minimum(k * (1 + 2e-6), 0.5 * (k + inv_next.gather(1, j1)[:, 0]))
    k_down = torch.maximum(inv_j * (1 - 2e-6), 0.5 * (inv_j + inv_prev))
    k = torch.where(below, k_down, k_up)
    reached = torch.where(below, k * s_prev, k * s_j)
    npix = torch.where(below, first, j + 1)
    zero = torch.zeros_like(k)
    return torch.where(found, k, zero), torch.where(found, reached, zero), torch.where(found, npix, 0 * npix)


def arcs(settings: InjectionSettings, bands: int, size: int, indices, epoch: int, noise_sigma,
         device=None, eligible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                    dict[str, torch.Tensor]]:
    """Arcs to add to a batch of cutouts: ``(arcs (B, C, size, size) float32, inject (B,) bool, catalogue)``.

    ``indices`` (B,) are the samples' dataset indices, ``epoch`` the epoch (the draws' counters), ``noise_sigma``
    each band's noise per pixel in the data's units, (C,) or (B, C). Arcs are scaled to the drawn S/N against it
    and are 0 where not injected (only the injected samples are rendered; a draw with less than
    ``MIN_FLUX_IN_CUTOUT`` of its source's flux lensed into the cutout is not injected). ``catalogue``: ``CATALOGUE``'s
    columns, (B,) each, on the device. Everything is batched torch on ``device`` (default: ``indices``').
    ``eligible`` (B,) bool, optional: the samples that may be injected (the background: non-lenses); the others
    get no arc, ``inject`` False, and are not rendered (their draws are unchanged, so a sample's arc does not
    depend on its neighbours' eligibility)."""
    bands, size = int(bands), int(size)
    idx = torch.as_tensor(indices, dtype=torch.int64)
    dev = torch.device(device) if device is not None else idx.device
    idx = idx.to(dev)
    p = draw(settings, bands, idx, epoch)
    inject = p["inject"]
    if eligible is not None:
        inject = inject & torch.as_tensor(eligible, dtype=torch.bool, device=dev)
    b = idx.numel()
    sigma = torch.as_tensor(noise_sigma, dtype=torch.float32, device=dev)
    if sigma.ndim not in (1, 2) or sigma.shape[-1] != bands or (sigma.ndim == 2 and sigma.shape[0] != b):
        raise ValueError(f"noise_sigma must be ({bands},) or ({b}, {bands}), got {tuple(sigma.shape)}")
    cat = {k: torch.zeros(b, dtype=torch.float64, device=dev) for k in CATALOGUE[1:]}
    cat["inject"] = inject
    sel = torch.nonzero(inject).flatten()
    if not sel.numel():
        return torch.zeros((b, bands, size, size), dtype=torch.float32, device=dev), inject, cat
    q = {k: v[sel] for k, v in p.items()}
    sig = sigma[sel] if sigma.ndim == 2 else sigma
    img, magnification = _render(q, size, bands, settings, dev)
    k, snr, npix = scale_to_snr(img, sig, q["snr"], settings.snr[1])
    # a draw whose lensed light falls (almost) all outside the cutout is not injected: scaling its remnant to the
    # S/N would amplify rounding noise (and a sample labelled a lens would show no arc)
    visible = magnification >= MIN_FLUX_IN_CUTOUT
    inject = inject.clone()
    inject[sel] = visible
    k, snr, npix = k * visible, snr * visible, npix * visible
    img *= k.to(torch.float32)[:, None, None, None]
    if sel.numel() == b:
        out = img
    else:
        out = torch.zeros((b, bands, size, size), dtype=torch.float32, device=dev).index_copy_(0, sel, img)
    cat["inject"] = inject
    for name in ("theta_e", "source_re", "sersic_n", "source_q", "lens_q", "lens_phi", "shear", "x0", "y0",
                 "source_x", "source_y"):
        cat[name][sel] = q[name] * visible
    cat["snr"][sel] = snr
    cat["magnification"][sel] = magnification * visible
    cat["npix"][sel] = npix.to(torch.float64)
    cat["source_flux"][sel] = k
    return out, inject, cat
