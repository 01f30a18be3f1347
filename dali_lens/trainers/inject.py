"""The training run's side of ``--inject`` (issue 25): backgrounds, the checks before any work, the PSF file,
the injection record (noise, PSF) that config.json and the checkpoint keep, and the injected evaluation
sets' catalogue. The painting itself is the loaders' (``pipelines/injecting.py``)."""
from __future__ import annotations

import functools
import os

import numpy as np

from ..data import DataError
from ..pipelines.injecting import discover_backgrounds as _discover

CATALOGUE_FILE = "injected_catalogue.csv"


def discover_for(cfg):
    """``discover(root, hdus=, val_fraction=, seed=)`` for each of a run's data roots (``data.labels.gather``):
    with ``--inject``, unlabelled cutouts and one-class training splits are non-lens backgrounds."""
    return functools.partial(_discover, inject=cfg.inject > 0)


def read_psf(path: str, bands: int) -> np.ndarray:
    """``--psf FILE``: (bands, k, k) float32 PSF images, each normalised to unit sum, from a FITS file (one image
    HDU per band, or a cube; astropy) or a ``.npy`` array (read without pickle). One error line naming --psf."""
    from ..data.readers import read_fits, read_npy

    if not os.path.isfile(path):
        raise DataError(f"--psf {path}: no such file")
    try:
        arr = read_npy(path) if path.lower().endswith(".npy") else read_fits(path)
    except DataError as exc:
        raise DataError(f"--psf {exc}") from None
    if arr.shape[0] not in (1, bands):
        raise DataError(f"--psf {path}: holds {arr.shape[0]} PSF image(s), the data has {bands} band(s) "
                        f"(give {bands}, or one for all bands)")
    return arr[0] if arr.shape[0] == 1 else arr  # checked and normalised by InjectionSettings


def check(cfg, splits: dict, say) -> np.ndarray | None:
    """Everything about ``--inject*`` that needs the data, before any work: per-band counts, the PSF file,
    square cutouts, a background to paint on. Returns the PSF images (or None)."""
    if not cfg.inject > 0:
        return None
    train = splits["train"]
    bands = train.bands
    for flag, value in (("--psf-fwhm", cfg.psf_fwhm), ("--inject-colours", cfg.inject_colours)):
        if value is not None and len(value) not in (1, bands):
            raise DataError(f"{flag}: {len(value)} value(s) for {bands} band(s); give one per band or one for all")
    psf = read_psf(cfg.psf, bands) if cfg.psf else None
    if train.shape is not None and train.shape[0] != train.shape[1]:
        raise DataError(f"--inject: needs square cutouts, the training data is {train.shape[0]}x{train.shape[1]} px")
    if not any(s.label != 1 for s in train.samples):
        raise DataError(f"--inject: {train.root}: the training split has no non-lens or unlabelled cutouts to paint "
                        "arcs on (only lenses)")
    from ..pipelines.injecting import settings_from_config

    try:  # the injector's own checks of the settings and band counts (ValueError naming the option)
        settings_from_config(cfg.__dict__ | {"injection_psf": psf}, bands=bands).check_bands(bands)
    except ValueError as exc:
        raise DataError(str(exc).splitlines()[0]) from None
    c = train.counts()
    say(f"injection: arcs painted on {c['nonlens'] + c['unlabelled']} training background(s) with probability "
        f"{cfg.inject:g} per epoch; real lenses: {c['lens']}"
        + ("; val/test injected with fixed seeds (--inject-eval)" if cfg.inject_eval else ""))
    return psf


def val_has_lenses(cfg, splits: dict) -> bool:
    """With ``--inject-eval`` the val split holds injected lenses (its non-lenses drawn with ``--inject``'s
    probability), so its AUC picks best.pt even when its files are non-lenses only."""
    val = splits.get("val")
    return bool(cfg.inject > 0 and cfg.inject_eval and val is not None and any(s.label != 1 for s in val.samples))


def record(cfg, train, pixels, psf, say) -> dict | None:
    """The injection record kept with the run (config.json and the checkpoint's config, key "injection"): the
    per-band noise the S/N is measured against (``--scaling auto``'s estimate, measured on the training set
    for 8-bit data too) and the PSF images."""
    if not cfg.inject > 0:
        return None
    noise = pixels.noise_sigma
    if noise is None:
        from ..pipelines import estimate_noise
        from ..pipelines.options import LoaderOptions

        noise = estimate_noise(train, LoaderOptions(seed=cfg.seed, **pixels.pixel_fields()))
    say("injection: S/N against the noise " + ", ".join(f"{v:.3g}" for v in noise)
        + (" (8-bit values)" if train.eight_bit else "") + " per band")
    return {"noise": [float(v) for v in noise], "psf": psf.tolist() if psf is not None else None}


def run_config(cfg, injection: dict | None) -> dict:
    """What config.json, the checkpoint and the loaders read: the options as given (so that --resume compares
    like with like) plus the injection record."""
    d = cfg.to_dict()
    if injection is not None:
        d["injection"] = injection
    return d


def injector(config: dict, dataset, train: bool, mask_value):
    """The loader's Injector for ``dataset`` (None: no injection there)."""
    from ..pipelines.injecting import injector_for

    return injector_for(config, dataset.split, train, dataset.eight_bit, mask_value)


def write_eval_catalogue(out: str, config: dict, splits: dict, mask_value) -> str | None:
    """``OUT/injected_catalogue.csv`` for the injected val/test splits (``--inject-eval``); its path or None."""
    from ..pipelines.injecting import catalogue, write_catalogue

    parts = {}
    for name in ("val", "test"):
        if name in splits:
            inj = injector(config, splits[name], False, mask_value)
            if inj is not None:
                parts[name] = (splits[name], catalogue(inj, splits[name]))
    if not parts:
        return None
    path = os.path.join(out, CATALOGUE_FILE)
    write_catalogue(path, parts)
    return path
