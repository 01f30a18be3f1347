"""Light profiles, lens deflection and PSF in torch, batched, on any device: the one home of the lensing physics,
used by the built-in generator (``simulator``, on CPU tensors) and by the injector (``dali_lens.injection``, on
the loader's device: CPU workers or the DALI GPU backend's CUDA tensors).

* Elliptical Sersic profiles (unit flux, 0.3 px softened core) on the pixel grid or at ray-traced positions.
* The singular isothermal ellipsoid (SIE; Kormann et al. 1994 / Keeton 2001 deflection in closed form,
  arctan / arctanh) plus external shear; ``lensed_source`` ray-traces a (supersampled) pixel grid through it
  and evaluates a Sersic source at the traced positions (surface brightness is conserved).
* Pixel grids (optionally supersampled), the PSF's optical transfer functions (Gaussian in closed form, Moffat
  beta = 3.5 by FFT of the kernel on the periodic grid, or any sampled kernel image) and the FFT convolution.
* ``flux_in_sigma``: the lensed-image S/N measure of the catalogue (pixels above 1 sigma, their flux in sigma).

Precision: per-sample constants (profile coefficients, normalisations) are computed in float64, everything per
pixel in float32 (the hot path). Per-sample parameters are 1-D tensors (m,) on the pixels' device (float64 is
best; any float dtype is accepted). All functions are deterministic and elementwise per sample, so a sample's
result does not depend on the batch it is computed in.
"""
from __future__ import annotations

import math

import torch

_MOFFAT_BETA = 3.5
_SOFTENING_PIX = 0.3      # core radius (px) of every Sersic profile: avoids the n=4 central cusp
_F32 = torch.float32
_F64 = torch.float64


def _col(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-sample float64 vector (m,) as float32 (m, 1, ...) broadcasting against ``ndim``-D pixels."""
    return v.to(_F32).reshape((-1,) + (1,) * (ndim - 1))


def sersic_b(n: torch.Tensor) -> torch.Tensor:
    """b_n such that R_e encloses half the light (Ciotti & Bertin 1999 expansion), float64."""
    n = n.to(_F64)
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n ** 2) + 131 / (1148175 * n ** 3)


def _sersic_coefficients(re, n, q, phi):
    """Quadratic-form coefficients of (R / Re)^2 = a dx^2 + b dx dy + c dy^2 and the profile constants (float64).

    The elliptical radius is R^2 = q u^2 + v^2 / q (area-preserving; u along the major axis at angle phi),
    so that ``re`` is the circularised effective radius.
    """
    re, n, q, phi = (torch.as_tensor(v).to(_F64) for v in (re, n, q, phi))
    c, s = torch.cos(phi), torch.sin(phi)
    inv = 1.0 / re ** 2
    a = (q * c * c + s * s / q) * inv
    b = 2 * c * s * (q - 1 / q) * inv
    cc = (q * s * s + c * c / q) * inv
    soft = _SOFTENING_PIX ** 2 * inv
    bn = sersic_b(n)
    log_amp = 2 * n * torch.log(bn) - torch.log(2 * math.pi * n * re ** 2) - torch.lgamma(2 * n)
    return a, b, cc, soft, n, bn, log_amp          # log_amp: log(b^2n / (2 pi n Re^2 Gamma(2n)))


def _sersic_profile(x: torch.Tensor, n, bn, log_amp) -> torch.Tensor:
    """x = (R / Re)^2 (softened), (m, ...) -> unit-flux Sersic surface brightness per pixel^2 (overwrites x).

    exp(log_amp - b_n (R / Re)^(1/n)) in three passes over the pixels: pow, addcmul, exp."""
    d = x.ndim
    x.pow_(_col(0.5 / n, d))                                    # (R / Re)^(1/n)
    return torch.addcmul(_col(log_amp, d), x, _col(-bn, d), out=x).exp_()


def sersic_grid(xs: torch.Tensor, ys: torch.Tensor, x0, y0, re, n, q, phi) -> torch.Tensor:
    """Unit-flux elliptical Sersic images (m, H, W) on the pixel grid (1-D axes ``xs`` (W,), ``ys`` (H,)),
    centred on (x0, y0) (m,), circularised effective radius ``re`` (px), index ``n``, axis ratio ``q``,
    position angle ``phi``; a 0.3 px core softens the centre. The grid is separable, so the quadratic form
    costs three passes over the image: (b dy) * dx + (a dx^2 + soft) + c dy^2.
    """
    a, b, c, soft, n, bn, log_amp = _sersic_coefficients(re, n, q, phi)
    dx = xs.to(_F64)[None, :] - torch.as_tensor(x0).to(_F64)[:, None]        # (m, W)
    dy = ys.to(_F64)[None, :] - torch.as_tensor(y0).to(_F64)[:, None]        # (m, H)
    tx = (a[:, None] * dx * dx + soft[:, None]).to(_F32)
    ty = (c[:, None] * dy * dy).to(_F32)
    r2 = (b[:, None] * dy).to(_F32)[:, :, None] * dx.to(_F32)[:, None, :]
    r2 += tx[:, None, :]
    r2 += ty[:, :, None]
    return _sersic_profile(r2, n, bn, log_amp)


def sersic_points(dx: torch.Tensor, dy: torch.Tensor, re, n, q, phi) -> torch.Tensor:
    """Unit-flux elliptical Sersic at arbitrary offsets ``dx, dy`` (m, ...) float32 (e.g. ray-traced source
    plane positions). Overwrites ``dx`` and ``dy`` (temporaries); returns a tensor of their shape."""
    a, b, c, soft, n, bn, log_amp = _sersic_coefficients(re, n, q, phi)
    d = dx.ndim
    r2 = dx * dy
    r2 *= _col(b, d)
    dx.mul_(dx).mul_(_col(a, d))
    r2 += dx
    dy.mul_(dy).mul_(_col(c, d)).add_(_col(soft, d))
    r2 += dy
    return _sersic_profile(r2, n, bn, log_amp)


def sie_deflection(dx: torch.Tensor, dy: torch.Tensor, b, q, phi, g1, g2):
    """SIE (+ external shear) deflection at offsets (dx, dy) (m, ...) float32 from the lens centre, in pixels.

    Keeton (2001) / Kormann et al. (1994) form with convergence kappa = b / (2 sqrt(q^2 x'^2 + y'^2)) in the
    frame of the mass major axis x':  alpha_x' = b / f * arctan(f x' / psi),  alpha_y' = b / f *
    arctanh(f y' / psi),  psi = sqrt(q^2 x'^2 + y'^2), f = sqrt(1 - q^2).
    """
    d = dx.ndim
    b, q, phi, g1, g2 = (torch.as_tensor(v).to(_F64) for v in (b, q, phi, g1, g2))
    q = torch.clamp(q, max=0.9999)
    f = torch.sqrt(1 - q ** 2)
    c = _col(torch.cos(phi), d)
    s = _col(torch.sin(phi), d)
    xr = dx * c + dy * s
    yr = dy * c - dx * s
    psi = xr * xr
    psi *= _col(q ** 2, d)
    psi += yr * yr
    psi.sqrt_().add_(1e-6)
    ff = _col(f, d)
    bf = _col(b / f, d)
    xr.mul_(ff).div_(psi).atan_().mul_(bf)                      # alpha_x'
    yr.mul_(ff).div_(psi).atanh_().mul_(bf)                     # alpha_y'
    ax = xr * c
    ax -= yr * s
    ay = xr * s
    ay += yr * c
    g1 = _col(g1, d)
    g2 = _col(g2, d)
    ax += g1 * dx + g2 * dy
    ay += g2 * dx - g1 * dy
    return ax, ay


def pixel_axis(size: int, supersample: int = 1, device=None) -> torch.Tensor:
    """1-D float32 coordinates (size * supersample,) of the (sub-)pixel centres, in pixels from the cutout centre
    (pixel k's centre is k - (size - 1) / 2)."""
    s = int(supersample)
    c = (size - 1) / 2.0
    return ((torch.arange(size * s, dtype=_F64, device=device) + 0.5) / s - 0.5 - c).to(_F32)


def pixel_grid(size: int, supersample: int = 1, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The (sub-)pixel centres as broadcast views X, Y (size * s, size * s) (x along the last axis)."""
    ax = pixel_axis(size, supersample, device)
    n = ax.numel()
    return ax[None, :].expand(n, n), ax[:, None].expand(n, n)


def lensed_source(x0, y0, theta_e_pix, q, phi, g1, g2, src_dx, src_dy, src_re_pix, src_n, src_q, src_phi,
                  size: int, supersample: int = 1, device=None) -> torch.Tensor:
    """The lensed image (m, size, size) float32 of a unit-flux Sersic source, unconvolved, in flux per pixel.

    The (``supersample`` x ``supersample`` per pixel) grid is ray-traced through an SIE centred on (x0, y0) px
    from the cutout centre with Einstein radius ``theta_e_pix`` (normalisation b = theta_E sqrt(q), so the
    Einstein ellipse encloses pi theta_E^2), mass axis ratio ``q`` and angle ``phi``, plus external shear
    (g1, g2); the source (effective radius ``src_re_pix``, index ``src_n``, axis ratio ``src_q``, angle
    ``src_phi``) sits at (src_dx, src_dy) px from the lens centre; sub-pixels are averaged. The image sums to
    the magnification of the part of the lensed light inside the cutout. All parameters are (m,) tensors.

    The same lens equation as ``sie_deflection`` + ``sersic_points``, evaluated in the frame of the mass's major
    axis (the shear, the source offset and the source's orientation are rotated into it instead of the
    deflection out of it) and with the per-sample factors folded into fused passes: ~25 passes over the rays
    instead of ~45 (the hot path of the injector).
    """
    f64 = lambda v: torch.as_tensor(v).to(_F64)  # noqa: E731
    x0, y0, theta_e_pix, q, phi, g1, g2, sdx, sdy = (f64(v) for v in (x0, y0, theta_e_pix, q, phi, g1, g2,
                                                                    src_dx, src_dy))
    m = len(theta_e_pix)
    ax = pixel_axis(size, supersample, device)
    n_ax = ax.numel()
    q = torch.clamp(q, max=0.9999)
    f = torch.sqrt(1 - q ** 2)
    b_over_f = theta_e_pix * torch.sqrt(q) / f
    c, s = torch.cos(phi), torch.sin(phi)
    dx = ax[None, None, :] - _col(x0, 3)                         # (m, 1, W)
    dy = ax[None, :, None] - _col(y0, 3)                         # (m, H, 1)
    xr = dx * _col(c, 3) + dy * _col(s, 3)                       # (m, H, W): along the mass major axis
    yr = dy * _col(c, 3) - dx * _col(s, 3)
    del dx, dy
    psi = torch.hypot(xr * _col(q, 3), yr)
    psi.add_(1e-6).div_(_col(f, 3))                              # psi / f
    ax_ = torch.div(xr, psi).atan_()                             # alpha_x' / (b / f)
    ay_ = torch.div(yr, psi, out=psi).atanh_()                   # alpha_y' / (b / f)
    # shear and source offset in the rotated frame: gamma' = gamma e^{-2i phi}, offset' = R(-phi) offset
    c2, s2 = torch.cos(2 * phi), torch.sin(2 * phi)
    g1r, g2r = g1 * c2 + g2 * s2, g2 * c2 - g1 * s2
    sxr, syr = sdx * c + sdy * s, sdy * c - sdx * s
    bx = torch.addcmul(_col(-sxr, 3), xr, _col(1 - g1r, 3))      # beta_x' = x'(1 - g1') - g2' y' - alpha_x' - s_x'
    bx.addcmul_(yr, _col(-g2r, 3)).addcmul_(ax_, _col(-b_over_f, 3))
    by = torch.addcmul(_col(-syr, 3), yr, _col(1 + g1r, 3), out=yr)  # beta_y' = y'(1 + g1') - g2' x' - ...
    by.addcmul_(xr, _col(-g2r, 3)).addcmul_(ay_, _col(-b_over_f, 3))
    del xr, ax_, ay_, psi
    a, b, cc, soft, n, bn, log_amp = _sersic_coefficients(src_re_pix, src_n, src_q, f64(src_phi) - phi)
    r2 = torch.mul(bx, _col(a, 3))                               # a bx^2 + b bx by + c by^2 + soft
    r2.addcmul_(by, _col(b, 3)).mul_(bx)
    by2 = torch.mul(by, _col(cc, 3)).mul_(by)
    r2.add_(by2).add_(_col(soft, 3))
    del bx, by, by2
    src = _sersic_profile(r2, n, bn, log_amp)
    if supersample > 1:
        k = int(supersample)
        src = src.reshape(m, size, k, size, k).mean(dim=(2, 4))
    assert src.shape[-1] == n_ax // int(supersample)
    return src


def psf_otf(fwhm_pix, size: int, psf: str = "gaussian", device=None, full: bool = False) -> torch.Tensor:
    """Optical transfer functions (..., size, size//2+1) complex64 (``full``: (..., size, size), for
    ``convolve_bands``) for FWHM (...) in pixels, PSF centred at (0, 0): Gaussian in closed form, Moffat
    (beta = 3.5) by FFT of the unit-sum kernel on the periodic grid."""
    fwhm_pix = torch.as_tensor(fwhm_pix, device=device).to(_F64)
    device = fwhm_pix.device
    ky = torch.fft.fftfreq(size, device=device, dtype=_F32)
    kx = ky if full else torch.fft.rfftfreq(size, device=device, dtype=_F32)
    if psf == "gaussian":
        k2 = ky[:, None] ** 2 + kx[None, :] ** 2
        sig = fwhm_pix / (2 * math.sqrt(2 * math.log(2)))
        coef = (-2 * math.pi ** 2 * sig ** 2).to(_F32)
        return torch.exp(coef[..., None, None] * k2).to(torch.complex64)
    if psf != "moffat":
        raise ValueError(f"psf must be 'gaussian' or 'moffat', got {psf!r}")
    d = torch.arange(size, dtype=_F32, device=device)
    d = torch.minimum(d, size - d)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    beta = _MOFFAT_BETA
    alpha = (fwhm_pix / (2 * math.sqrt(2 ** (1 / beta) - 1))).to(_F32)
    ker = r2 / (alpha[..., None, None] ** 2)
    ker.add_(1).log_().mul_(-beta).exp_()
    ker /= ker.sum(dim=(-2, -1), keepdim=True)
    return (torch.fft.fft2(ker.to(torch.complex64)) if full else torch.fft.rfft2(ker)).to(torch.complex64)


def kernel_otf(kernels: torch.Tensor, size: int, full: bool = False) -> torch.Tensor:
    """Transfer functions (..., size, size//2+1) complex64 (``full``: (..., size, size)) of sampled PSF images
    ``kernels`` (..., k, k) on the periodic size x size grid. Each kernel is normalised to unit sum; its centre is
    pixel (k // 2, k // 2) (the middle pixel of an odd size; for an even size the pixel right of and below the
    middle, as numpy and scipy do). A kernel larger than the cutout wraps around (exactly what a periodic
    convolution does)."""
    kernels = torch.as_tensor(kernels).to(_F64)
    kernels = kernels / kernels.sum(dim=(-2, -1), keepdim=True)
    k = kernels.shape[-1]
    idx = (torch.arange(k, device=kernels.device) - k // 2) % size
    lead = kernels.shape[:-2]
    grid = torch.zeros(lead + (size, size), dtype=_F64, device=kernels.device)
    flat = grid.reshape(-1, size * size)
    pos = (idx[:, None] * size + idx[None, :]).reshape(-1)
    flat.index_add_(1, pos, kernels.reshape(-1, k * k))
    grid = flat.reshape(grid.shape)
    if full:
        return torch.fft.fft2(grid.to(torch.complex64)).to(torch.complex64)
    return torch.fft.rfft2(grid.to(_F32)).to(torch.complex64)


def convolve(images: torch.Tensor, otf: torch.Tensor) -> torch.Tensor:
    """Periodic FFT convolution of ``images`` (..., H, W) float32 with transfer functions ``otf`` (broadcasting
    against (..., H, W//2+1)); a new float32 tensor."""
    h, w = images.shape[-2:]
    spec = torch.fft.rfft2(images) * otf
    lead = spec.shape[:-2]
    # (the inverse transform of a 3-D stack is faster than of the same data with more leading dimensions)
    return torch.fft.irfft2(spec.reshape((-1,) + spec.shape[-2:]), s=(h, w)).reshape(lead + (h, w))


def convolve_bands(images: torch.Tensor, otf_full: torch.Tensor) -> torch.Tensor:
    """Periodic FFT convolution of real images (B, H, W) float32 with the PSF of every band, ``otf_full``
    (C, H, W) complex64 (``psf_otf`` / ``kernel_otf`` with ``full=True``: real kernels, shared by all samples):
    (B, C, H, W) float32, equal to ``convolve(images[:, None], otf)`` to float rounding.

    Two samples travel as one complex image (a + i b): a real kernel convolves the real and imaginary parts
    separately, so one complex transform each way does two samples, and no complex-to-real transform is
    needed (torch's CPU c2r transform is several times slower than c2c of the same data)."""
    b, h, w = images.shape
    if b % 2:
        images = torch.cat([images, images.new_zeros(1, h, w)])
    z = torch.fft.fft2(torch.complex(images[0::2], images[1::2]))        # (B/2, H, W)
    out = torch.view_as_real(torch.fft.ifft2(z[:, None] * otf_full))      # (B/2, C, H, W, 2): a, b
    return out.permute(0, 4, 1, 2, 3).reshape(-1, otf_full.shape[0], h, w)[:b]


def flux_in_sigma(images: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lensed-image numbers of the catalogue for noiseless images (m, C, H, W) against the noise ``sigma``
    per band ((C,) or (m, C)): the number of pixels above 1 sigma (int64, (m,)) and the sum over those pixels of
    pixel / sigma (float64, (m,)), over all C bands. With the detection band alone (C = 1) this is the
    generator's ``numb_pix_lensed_image`` and ``flux_lensed_image_in_sigma``; the injector's S/N is this sum
    over all bands."""
    sigma = torch.as_tensor(sigma, device=images.device).to(_F32)
    v = images / sigma.reshape(sigma.shape[:-1] + (sigma.shape[-1], 1, 1))
    above = v > 1
    npix = above.sum(dim=(1, 2, 3))
    fsig = torch.where(above, v, torch.zeros((), dtype=v.dtype, device=v.device)).to(_F64).sum(dim=(1, 2, 3))
    return npix, fsig
