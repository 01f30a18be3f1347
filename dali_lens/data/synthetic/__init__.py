"""Physics-based synthetic strong-lens simulator and dataset writer.

The simulator
=============

Every cutout is drawn, vectorised over a batch (torch on CPU tensors through ``profiles``, the lensing physics the
injector ``dali_lens.injection`` shares; float32 pixels, no per-pixel Python loops), as:

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
  FWHM_r * (lambda / 620 nm)^-0.2), applied by FFT (``torch.fft.rfft2`` over the batch; Gaussian transfer
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

PNG/JPEG use one fixed asinh stretch for all images and bands (``stretch_to_uint8``, see ``encoders``).

Modules
=======

``bands`` (SED table, per-band properties), ``profiles`` (Sersic, SIE + shear, PSF), ``parameters`` (survey
presets, settings, parameter draws), ``simulator`` (``simulate``), ``encoders`` (one cutout as png / jpeg /
fits / npy bytes), ``standard`` and ``challenge`` (the two layouts), ``writer`` (``generate_dataset``),
``pool`` (worker threads).
"""
from __future__ import annotations

from .bands import SED_TABLE, band_properties
from .challenge import (CHALLENGE_COLUMNS, CHALLENGE_FIRST_ID, CHALLENGE_FLUX_UNIT, CHALLENGE_GROUND_BANDS,
                        CHALLENGE_MASK_VALUE, CHALLENGE_SPACE_BANDS, TRACKS)
from .encoders import (STRETCH_MAX, STRETCH_MIN, STRETCH_SOFTENING, encode_image, fits_bytes, jpeg_bytes,
                       npy_bytes, png_bytes, stretch_to_uint8)
from .parameters import DEFAULT_DIFFICULTY, SURVEYS
from .parameters import parse_pair, parse_positive_pair, parse_split_fractions
from .simulator import CATALOGUE_COLUMNS, simulate
from .standard import FORMATS
from .writer import LAYOUTS, format_summary, generate_dataset

__all__ = [
    "simulate",
    "generate_dataset",
    "format_summary",
    "parse_pair",
    "parse_positive_pair",
    "parse_split_fractions",
    "stretch_to_uint8",
    "encode_image",
    "png_bytes",
    "jpeg_bytes",
    "fits_bytes",
    "npy_bytes",
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
    "TRACKS",
    "STRETCH_SOFTENING",
    "STRETCH_MIN",
    "STRETCH_MAX",
]
