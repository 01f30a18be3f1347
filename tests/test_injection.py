"""The injector's physics core (dali_lens.injection): an arc on a blank image is the simulator's lensed source,
draws depend only on (seed, epoch, index), the S/N is the generator's definition, PSF images, settings checks.

Where CUDA is present the same checks run on the GPU too (``DEVICES``); the loaders' use of the injector is
tested with the loaders (tests of wt-injwire's wiring)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dali_lens import injection as inj
from dali_lens.choices import OptionRangeError
from dali_lens.data import synthetic as syn
from dali_lens.data.synthetic import profiles, simulator

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIGMA = torch.tensor([4.0, 5.0, 7.0])


def _params_from_simulator(p: dict, ps: float, device="cpu") -> dict:
    """The simulator's draws (pixels and arcsec) as the injector's parameters (arcsec), with its per-sample
    source fluxes and PSF FWHMs."""
    t = lambda v: torch.as_tensor(np.asarray(v, dtype=np.float64), device=device)  # noqa: E731
    return {"theta_e": t(p["theta_e"]), "lens_q": t(p["q"]), "lens_phi": t(p["phi"]), "g1": t(p["g1"]),
            "g2": t(p["g2"]), "x0": t(p["x0"] * ps), "y0": t(p["y0"] * ps), "source_x": t(p["s_dx"] * ps),
            "source_y": t(p["s_dy"] * ps), "source_re": t(p["s_re"]), "sersic_n": t(p["s_n"]),
            "source_q": t(p["s_q"]), "source_phi": t(p["s_phi"]), "flux": t(p["flux"]),
            "psf_fwhm": t(p["fwhm_pix"] * ps)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("psf,survey,bands", [("gaussian", "ground", ("g", "r", "i")), ("moffat", "space", ("vis",))])
def test_arc_on_blank_image_is_the_simulators_lensed_source(device, psf, survey, bands):
    """Planted on an all-zero image, the injector's arc for the simulator's parameters is the simulator's
    lensed-source image pixel for pixel; and that image is what simulate adds to the deflector's light."""
    size, ss, n = 40, 2, 12
    want, p = simulator.lensed_source_model(n, size, bands, seed=7, psf=psf, survey=survey, supersample=ss)
    ps = syn.SURVEYS[survey]["pixel_scale"]
    settings = inj.InjectionSettings(pixel_scale=ps, supersample=ss, psf_profile=psf)
    blank = torch.zeros((n, len(bands), size, size), device=device)
    got = blank + inj.lensed_images(_params_from_simulator(p, ps, device), size, len(bands), settings)
    assert got.device.type == device and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-4, atol=1e-5 * want.max())
    assert want.max() > 1.0                                   # not trivially all-zero
    # the same image is the difference of simulate's lens and non-lens of the same (seed, index)
    # (where neither has a companion: lenses and non-lenses draw their companions differently)
    lens, cl = syn.simulate(n, size, bands, seed=7, is_lens=True, psf=psf, survey=survey, supersample=ss,
                            noise=False)
    plain, cp = syn.simulate(n, size, bands, seed=7, is_lens=False, psf=psf, survey=survey, supersample=ss,
                             noise=False)
    same = (cl["companion"] == 0) & (cp["companion"] == 0)
    assert same.sum() >= 2
    np.testing.assert_allclose((lens - plain)[same], want[same], atol=2e-6 * np.abs(lens).max())


@pytest.mark.parametrize("device", DEVICES)
def test_arcs_are_the_lensed_images_scaled_and_zero_where_not_injected(device):
    s = inj.InjectionSettings(probability=0.5, seed=3)
    idx = torch.arange(40, device=device)
    arc, inject, cat = inj.arcs(s, 3, 32, idx, 2, SIGMA)
    assert arc.shape == (40, 3, 32, 32) and arc.device.type == device
    assert 5 < int(inject.sum()) < 35
    assert torch.equal(inject, cat["inject"]) and torch.equal(inject, inj.draw(s, 3, idx, 2)["inject"])
    assert (arc[~inject] == 0).all() and (arc[inject].amax(dim=(1, 2, 3)) > 0).all()
    for k in inj.CATALOGUE[1:]:
        assert cat[k].shape == (40,) and (cat[k][~inject] == 0).all(), k
    eligible = torch.arange(40, device=device) % 3 > 0                  # e.g. real lenses are never painted
    arc_e, inject_e, cat_e = inj.arcs(s, 3, 32, idx, 2, SIGMA, eligible=eligible)
    assert torch.equal(inject_e, inject & eligible) and (arc_e[~eligible] == 0).all()
    torch.testing.assert_close(arc_e[inject_e], arc[inject_e], rtol=0, atol=1e-5 * float(arc.abs().max()))
    assert torch.equal(cat_e["theta_e"][inject_e], cat["theta_e"][inject_e])
    p = {k: v[inject] for k, v in inj.draw(s, 3, idx, 2).items()}
    unit = inj.lensed_images(p, 32, 3, s)
    scaled = unit * cat["source_flux"][inject].to(torch.float32)[:, None, None, None]
    torch.testing.assert_close(arc[inject], scaled, rtol=1e-5, atol=1e-6 * float(scaled.max()))
    # a periodic convolution keeps the flux: band c sums to magnification x source flux x colour c
    colours = torch.tensor(inj.default_colours(3), dtype=torch.float64, device=device)
    total = (cat["magnification"] * cat["source_flux"])[inject][:, None] * colours
    torch.testing.assert_close(arc[inject].sum(dim=(2, 3), dtype=torch.float64), total, rtol=1e-4, atol=1e-3)
    # strongly lensed: the source is magnified (sources of >= 1.5 px, 2 x 2 rays per pixel: little sampling error)
    big = inj.InjectionSettings(probability=1.0, source_re=(0.3, 0.4), supersample=2)
    assert (inj.arcs(big, 3, 48, idx, 0, SIGMA)[2]["magnification"] > 1.2).all()
    for k, (lo, hi) in (("theta_e", s.theta_e), ("source_re", s.source_re), ("sersic_n", s.sersic_n)):
        assert (cat[k][inject] >= lo).all() and (cat[k][inject] <= hi).all(), k
    assert (torch.hypot(cat["x0"], cat["y0"]) <= s.offset).all()


@pytest.mark.parametrize("device", DEVICES)
def test_snr_is_the_generators_flux_in_sigma_over_all_bands(device):
    """The arc's S/N measured against the noise (pixels above 1 sigma, their flux in sigma, summed over the
    bands) is the drawn one (up to one pixel at the threshold); with one band this is the generator's
    flux_lensed_image_in_sigma."""
    s = inj.InjectionSettings(probability=1.0, snr=(5.0, 80.0), seed=1)
    idx = torch.arange(100, 164, device=device)
    for sigma in (SIGMA.to(device), torch.rand(64, 3, device=device) * 10 + 1):
        arc, _, cat = inj.arcs(s, 3, 32, idx, 0, sigma)
        npix, measured = profiles.flux_in_sigma(arc, sigma)
        drawn = inj.draw(s, 3, idx, 0)["snr"]
        torch.testing.assert_close(measured, cat["snr"], rtol=1e-5, atol=1e-4)
        assert torch.equal(npix.to(torch.float64), cat["npix"])
        assert ((measured - drawn).abs() <= 0.5 + 1e-4 * drawn).all()    # exact, or the nearer end of a jump
        assert torch.isclose(measured, drawn, rtol=1e-4).any()
    # five bands: two have the same default colour, so their pixels cross the threshold together (ties)
    s5 = inj.InjectionSettings(probability=1.0, snr=(1.0, 60.0), seed=2)
    sig5 = torch.full((5,), 3.0, device=device)
    arc, _, cat = inj.arcs(s5, 5, 24, torch.arange(300, device=device), 0, sig5)
    npix, measured = profiles.flux_in_sigma(arc, sig5)
    torch.testing.assert_close(measured, cat["snr"], rtol=1e-5, atol=1e-4)
    assert torch.equal(npix.to(torch.float64), cat["npix"])
    assert ((measured - inj.draw(s5, 5, torch.arange(300, device=device), 0)["snr"]).abs() <= 1 + 1e-3).all()
    # the generator's own catalogue value is the same measure on its detection band
    images, p = simulator.lensed_source_model(8, 32, ("g", "r", "i"), seed=2, source_mag=(20, 22))
    _, cat = syn.simulate(8, 32, ("g", "r", "i"), seed=2, is_lens=True, source_mag=(20, 22), noise=False)
    sigma_det = float(cat["noise_sigma"][0])
    npix, fsig = profiles.flux_in_sigma(torch.from_numpy(images[:, 1:2]), torch.tensor([sigma_det]))
    np.testing.assert_allclose(fsig.numpy(), cat["flux_lensed_image_in_sigma"], rtol=1e-4)
    np.testing.assert_array_equal(npix.numpy(), cat["numb_pix_lensed_image"])


def test_draws_depend_only_on_seed_epoch_and_index():
    """Same (seed, epoch, index): the same arc whatever the batch, its order and split (so any number of
    workers, ranks or a mid-epoch resume repeat it); another epoch or seed: another arc."""
    s = inj.InjectionSettings(probability=0.7, seed=5)
    idx = torch.arange(24)
    whole, inject, cat = inj.arcs(s, 3, 32, idx, 4, SIGMA)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    parts = [perm[:5], perm[5:6], perm[6:17], perm[17:]]
    for part in parts:
        arc, inj_part, cat_part = inj.arcs(s, 3, 32, part, 4, SIGMA)
        assert torch.equal(inj_part, inject[part])
        # (the parameters bit for bit; the pixels to float rounding: two samples share a complex FFT)
        torch.testing.assert_close(arc, whole[part], rtol=0, atol=1e-5 * float(whole.abs().max()))
        for k in inj.CATALOGUE[1:]:
            torch.testing.assert_close(cat_part[k], cat[k][part], rtol=1e-5, atol=1e-9)
    again, _, _ = inj.arcs(s, 3, 32, idx, 4, SIGMA)
    assert torch.equal(again, whole)                                   # the same batch: bit for bit
    u = inj.uniforms(5, 4, idx)
    for part in parts:
        assert torch.equal(inj.uniforms(5, 4, part), u[part])          # bit for bit
    assert not torch.equal(inj.uniforms(5, 5, idx), u) and not torch.equal(inj.uniforms(6, 4, idx), u)
    other, inject2, _ = inj.arcs(s, 3, 32, idx, 5, SIGMA)
    assert not torch.equal(inject2, inject) or not torch.allclose(other, whole)
    big = inj.uniforms(5, 4, torch.tensor([2 ** 40 + 3, 3]))            # 64-bit indices: the high word counts
    assert not torch.equal(big[0], big[1]) and torch.equal(big[1], u[3])
    # uniform and independent enough: means ~1/2, slots uncorrelated
    uu = inj.uniforms(0, 0, torch.arange(20000))
    assert (uu.mean(dim=0) - 0.5).abs().max() < 0.01
    corr = torch.corrcoef(uu.T) - torch.eye(uu.shape[1], dtype=uu.dtype)
    assert corr.abs().max() < 0.04


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_draws_equal_cpu_draws():
    s = inj.InjectionSettings(probability=0.5, seed=9)
    idx = torch.arange(64)
    assert torch.equal(inj.uniforms(9, 3, idx), inj.uniforms(9, 3, idx.cuda()).cpu())
    a, m, _ = inj.arcs(s, 3, 48, idx, 3, SIGMA)
    b, mb, _ = inj.arcs(s, 3, 48, idx.cuda(), 3, SIGMA.cuda())
    assert torch.equal(m, mb.cpu())
    torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-4 * float(a.max()))


def _gaussian_kernel(fwhm_pix: float, k: int) -> np.ndarray:
    r = np.arange(k) - k // 2
    sig = fwhm_pix / (2 * np.sqrt(2 * np.log(2)))
    g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sig ** 2)
    return g / g.sum()


def test_psf_images_equal_the_gaussian_fwhm_path():
    """PSF images of Gaussians (any size, one per band or one for all) give the arcs of --psf-fwhm."""
    fwhm = (0.9, 0.8, 1.1)
    gauss = inj.InjectionSettings(probability=1.0, psf_fwhm=fwhm, seed=2)
    idx = torch.arange(12)
    want, _, _ = inj.arcs(gauss, 3, 48, idx, 0, SIGMA)
    kernels = np.stack([_gaussian_kernel(f / 0.2, 41) * 7.0 for f in fwhm])     # any normalisation
    got, _, _ = inj.arcs(inj.InjectionSettings(probability=1.0, psf=kernels, seed=2), 3, 48, idx, 0, SIGMA)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * float(want.max()))
    one = inj.InjectionSettings(probability=1.0, psf_fwhm=(0.9,), seed=2)
    want1, _, _ = inj.arcs(one, 3, 48, idx, 0, SIGMA)
    got1, _, _ = inj.arcs(inj.InjectionSettings(probability=1.0, psf=_gaussian_kernel(4.5, 31), seed=2), 3, 48,
                          idx, 0, SIGMA)
    torch.testing.assert_close(got1, want1, rtol=0, atol=2e-3 * float(want1.max()))
    # a kernel larger than the cutout wraps around; a delta kernel is no PSF at all (odd and even sizes)
    for k in (1, 4, 5, 70):
        delta = np.zeros((k, k))
        delta[k // 2, k // 2] = 1.0
        torch.testing.assert_close(profiles.kernel_otf(torch.from_numpy(delta), 32),
                                   torch.ones(32, 17, dtype=torch.complex64))


@pytest.mark.parametrize("kw,flag", [
    (dict(probability=1.5), "--inject "), (dict(probability=-0.1), "--inject "),
    (dict(theta_e=(-0.5, 1.0)), "--inject-theta-e"), (dict(theta_e=(2.0, 1.0)), "--inject-theta-e"),
    (dict(theta_e="x"), "--inject-theta-e"), (dict(source_re=(0.0, 0.3)), "--inject-source-re"),
    (dict(sersic_n=(0.1, 2.0)), "--inject-sersic-n"), (dict(snr=(0.0, 10.0)), "--inject-snr"),
    (dict(snr=(20.0, float("nan"))), "--inject-snr"), (dict(offset=-1.0), "--inject-offset"),
    (dict(pixel_scale=0.0), "--pixel-scale"), (dict(psf_fwhm=(1.0, -1.0)), "--psf-fwhm"),
    (dict(psf_fwhm=()), "--psf-fwhm"), (dict(colours=(1.0, 0.0)), "--inject-colours"),
    (dict(seed=-1), "--inject-seed"), (dict(supersample=0), "--inject-supersample"),
    (dict(psf_profile="airy"), "--psf-profile"),
    (dict(psf=np.ones((3, 5))), "--psf"), (dict(psf=np.full((5, 5), np.nan)), "--psf"),
    (dict(psf=-np.ones((5, 5))), "--psf"), (dict(psf=np.zeros((2, 5, 5))), "--psf"),
    (dict(psf=np.ones((5, 5)), psf_fwhm=(1.0,)), "--psf"),
])
def test_bad_settings_name_the_option(kw, flag):
    with pytest.raises(OptionRangeError) as err:
        inj.InjectionSettings(**kw)
    assert str(err.value).startswith(flag.strip()), str(err.value)
    assert "\n" not in str(err.value)


def test_band_counts_are_checked_and_defaults():
    s = inj.InjectionSettings(psf=np.ones((2, 5, 5)))
    with pytest.raises(OptionRangeError, match=r"^--psf: 2 PSF images for 3 bands"):
        inj.arcs(s, 3, 16, torch.arange(4), 0, SIGMA)
    with pytest.raises(OptionRangeError, match=r"^--psf-fwhm: 2 values for 3 bands"):
        inj.draw(inj.InjectionSettings(psf_fwhm=(1.0, 1.1)), 3, torch.arange(4), 0)
    with pytest.raises(OptionRangeError, match=r"^--inject-colours"):
        inj.draw(inj.InjectionSettings(colours=(1.0, 1.1)), 3, torch.arange(4), 0)
    import pickle

    s = inj.InjectionSettings(psf=np.ones((3, 5, 5)), seed=4)               # loader workers get a pickled copy
    t = pickle.loads(pickle.dumps(s))
    assert t == s and hash(t) == hash(s) and np.array_equal(t.psf, s.psf)
    s = inj.InjectionSettings(theta_e="0.5,1.5", psf_fwhm="0.9", probability=1)
    assert s.theta_e == (0.5, 1.5) and s.fwhm(3) == (0.9, 0.9, 0.9) and s.probability == 1.0
    assert inj.InjectionSettings().fwhm(2) == (inj.DEFAULT_PSF_FWHM,) * 2
    # the default colours are the generator's blue source: brighter in the blue (first) band than in the red
    c = inj.default_colours(3)
    assert c[0] > c[-1] and inj.default_colours(1) == (1.0,)
    props = syn.band_properties(["b0", "b1", "b2"])
    np.testing.assert_allclose(c, 10 ** (-0.4 * props["source"]))
    assert inj.InjectionSettings(theta_e=(0.0, 0.0)).theta_e == (0.0, 0.0)   # theta_E = 0 (unlensed) is valid
    # an arc (almost) all outside the cutout is not injected, rather than its rounding noise scaled to the S/N
    wide = inj.InjectionSettings(theta_e=(2.0, 2.0), probability=1.0, source_re=(0.1, 0.1), offset=0.0)
    arc, inject, cat = inj.arcs(wide, 3, 8, torch.arange(200), 0, SIGMA)
    assert 0 < int((~inject).sum()) and (arc[~inject] == 0).all() and (cat["snr"][~inject] == 0).all()
    assert (cat["magnification"][inject] >= inj.MIN_FLUX_IN_CUTOUT).all()
    flat = inj.InjectionSettings(theta_e=(0.0, 0.0), probability=1.0, source_re=(0.4, 0.4), supersample=4)
    arc, _, cat = inj.arcs(flat, 3, 32, torch.arange(4), 0, SIGMA)          # shear alone: magnification ~1
    # (less by a few per cent: the 0.3 px softened core and the wings beyond the cutout, as in the generator)
    assert ((cat["magnification"] > 0.9) & (cat["magnification"] < 1.01)).all()
