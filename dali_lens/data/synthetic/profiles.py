"""Light profiles, lens deflection and PSF, vectorised over a batch (float32 where it is the hot path).

* Elliptical Sersic profiles (unit flux, 0.3 px softened core) on the pixel grid or at ray-traced positions.
* The singular isothermal ellipsoid (SIE; Kormann et al. 1994 / Keeton 2001 deflection in closed form,
  arctan / arctanh) plus external shear.
* Pixel grids (optionally supersampled) and the PSF's optical transfer functions (Gaussian in closed form,
  Moffat beta = 3.5 by FFT of the kernel on the periodic grid).
"""
from __future__ import annotations

import math

import numpy as np

_MOFFAT_BETA = 3.5
_SOFTENING_PIX = 0.3      # core radius (px) of every Sersic profile: avoids the n=4 central cusp


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


def sersic_grid(xs: np.ndarray, ys: np.ndarray, x0, y0, re, n, q, phi) -> np.ndarray:
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


def sersic_points(dx: np.ndarray, dy: np.ndarray, re, n, q, phi) -> np.ndarray:
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


def sie_deflection(dx, dy, b, q, phi, g1, g2):
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



def pixel_grid(size: int, supersample: int = 1) -> tuple[np.ndarray, np.ndarray]:
    s = supersample
    c = (size - 1) / 2.0
    ax = ((np.arange(size * s, dtype=np.float64) + 0.5) / s - 0.5 - c).astype(np.float32)
    return np.broadcast_to(ax[None, :], (size * s, size * s)), np.broadcast_to(ax[:, None], (size * s, size * s))


def psf_otf(fwhm_pix: np.ndarray, size: int, psf: str) -> np.ndarray:
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

