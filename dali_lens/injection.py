"""TEMPORARY STAND-IN (wt-injwire) for wt-injcore's dali_lens/injection.py: the API of docs/TEAM.md with
simple physics (SIS + shear-free deflection, circular Sersic source, Gaussian PSF by FFT). Deleted when the
real module is merged."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class InjectionSettings:
    probability: float = 0.5
    theta_e: tuple = (0.8, 2.0)
    source_re: tuple = (0.1, 0.4)
    sersic_n: tuple = (0.5, 2.0)
    snr: tuple = (10.0, 50.0)
    offset: float = 0.1
    pixel_scale: float = 0.2
    psf_fwhm: tuple | None = None
    psf: object = None
    colours: tuple | None = None
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.probability <= 1:
            raise ValueError(f"--inject {self.probability}: must be in [0, 1]")
        if min(self.theta_e) < 0:
            raise ValueError(f"--inject-theta-e {self.theta_e}: must be >= 0")


_M = (1 << 61) - 1


def _uniform(seed, epoch, index: torch.Tensor, k: int) -> torch.Tensor:
    """Counter-based uniform [0, 1) per index (float64), the same on CPU and CUDA."""
    x = (index.long() * 0x9E3779B1 + (int(seed) * 1000003 + int(epoch) * 7919 + k * 104729)) % _M
    for _ in range(3):
        x = (x ^ (x >> 17)) % _M
        x = (x * 0x2545F491) % _M
        x = (x ^ (x >> 29)) % _M
    return (x % 16777216).double() / 16777216.0


def draw(settings, bands: int, indices, epoch: int) -> dict:
    idx = torch.as_tensor(indices).long().reshape(-1)
    u = [_uniform(settings.seed, epoch, idx, k) for k in range(8)]

    def lin(r, k):
        return r[0] + (r[1] - r[0]) * u[k]

    return {"inject": u[0] < settings.probability, "theta_e": lin(settings.theta_e, 1),
            "source_re": lin(settings.source_re, 2), "sersic_n": lin(settings.sersic_n, 3),
            "snr": lin(settings.snr, 4), "x0": (2 * u[5] - 1) * settings.offset,
            "y0": (2 * u[6] - 1) * settings.offset, "beta": u[7]}


def lensed_images(params, size: int, bands: int, settings, device=None) -> torch.Tensor:
    dev = torch.device(device) if device is not None else params["theta_e"].device
    p = {k: v.to(dev, torch.float64) for k, v in params.items() if k != "inject"}
    ps = settings.pixel_scale
    c = (torch.arange(size, device=dev, dtype=torch.float64) - (size - 1) / 2) * ps
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    dx = xx[None] - p["x0"][:, None, None]
    dy = yy[None] - p["y0"][:, None, None]
    r = torch.sqrt(dx * dx + dy * dy).clamp_min(1e-6)
    te = p["theta_e"][:, None, None]
    bx = dx - te * dx / r
    by = dy - te * dy / r
    sx = (p["beta"] * 0.5 * p["theta_e"])[:, None, None]
    rs = torch.sqrt((bx - sx) ** 2 + by ** 2)
    n = p["sersic_n"][:, None, None]
    bn = 2 * n - 1 / 3
    img = torch.exp(-bn * ((rs / p["source_re"][:, None, None]) ** (1 / n) - 1))
    fw = settings.psf_fwhm or (1.0,)
    fw = list(fw) * bands if len(fw) == 1 else list(fw)
    colours = list(settings.colours or (1.0, 0.8, 0.6, 0.5, 0.4)[:bands])
    f = torch.fft.fftfreq(size, d=1.0, device=dev, dtype=torch.float64)
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    out = []
    for b in range(bands):
        sig = fw[b] / ps / 2.3548
        otf = torch.exp(-2 * math.pi ** 2 * sig ** 2 * k2)
        conv = torch.fft.ifft2(torch.fft.fft2(img) * otf).real
        conv = conv / conv.sum((-2, -1), keepdim=True).clamp_min(1e-30)
        out.append(conv * colours[b % len(colours)])
    return torch.stack(out, 1).float()


def arcs(settings, bands: int, size: int, indices, epoch: int, noise_sigma, device=None):
    idx = torch.as_tensor(indices).long().reshape(-1)
    dev = torch.device(device) if device is not None else idx.device
    params = {k: v.to(dev) for k, v in draw(settings, bands, idx.to(dev), epoch).items()}
    img = lensed_images(params, size, bands, settings, device=dev).double()
    sig = torch.as_tensor(noise_sigma, dtype=torch.float64, device=dev)
    sig = sig.reshape(1, -1, 1, 1) if sig.ndim == 1 else sig.reshape(len(idx), -1, 1, 1)
    snr0 = torch.sqrt(((img / sig) ** 2).sum((1, 2, 3))).clamp_min(1e-30)
    scale = params["snr"].double() / snr0
    inject = params["inject"].bool()
    out = img * (scale * inject.double())[:, None, None, None]
    cat = {k: v for k, v in params.items() if k != "inject"}
    cat["magnification"] = torch.full_like(params["snr"], 2.0) + params["theta_e"]
    return out.float(), inject, cat
