"""Lens-finding-challenge data: per-band FITS stacking, masks, flux scaling, crop/pad, TTA, backends agree."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from astropy.io import fits

from conftest import BACKENDS, DALI_BACKENDS, collect
from dali_lens.data import DataError, discover
from dali_lens.data.readers import read_sample
from dali_lens.data.synthetic import CHALLENGE_MASK_VALUE, generate_dataset
from dali_lens.pipelines import LoaderOptions, build_loader, compute_stats
from dali_lens.pipelines.batch import dihedral8
from dali_lens.pipelines.options import prescale


@pytest.fixture(scope="module")
def ground(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("challenge") / "ground")
    generate_dataset(root, n=40, layout="challenge", track="ground", seed=4)
    return root


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("challenge") / "space")
    generate_dataset(root, n=20, layout="challenge", track="space", seed=5)
    return root


def test_layout_recognised_and_bands_stacked_in_order(ground, space):
    ds = discover(ground, val_fraction=0)["train"]
    assert ds.kind == "fits-bands" and ds.bands == 4 and ds.shape == (101, 101) and len(ds) == 40
    s = ds.samples[0]
    assert [os.path.basename(os.path.dirname(p)) for p in s.band_paths] == ["Band1", "Band2", "Band3", "Band4"]
    assert {"einstein_area", "numb_pix_lensed_image", "flux_lensed_image_in_sigma"} <= set(s.meta)
    x = read_sample(s, ds, check=False)
    for b, path in enumerate(s.band_paths):
        np.testing.assert_array_equal(x[b], fits.getdata(path).astype(np.float32))
    assert 1e-13 < np.median(np.abs(x[x != CHALLENGE_MASK_VALUE])) < 1e-8  # raw-flux-like values
    sp = discover(space, val_fraction=0)["train"]
    assert sp.bands == 1 and sp.kind == "fits-bands"


def test_missing_band_file_names_the_object(ground, tmp_path):
    import shutil

    root = str(tmp_path / "broken")
    shutil.copytree(ground, root)
    ds = discover(root, val_fraction=0)["train"]
    victim = ds.samples[3]
    os.remove(victim.band_paths[2])
    # kept in the listing (so that --skip-bad can skip it), named as missing by the check and the loaders
    ds = discover(root, val_fraction=0)["train"]
    assert ds.samples[3].band_paths[2] == victim.band_paths[2]
    from dali_lens.data.validate import drop_bad

    logged = []
    assert len(drop_bad(ds, log=logged.append)) == len(ds) - 1
    assert any(victim.band_paths[2] in line and "file not found" in line for line in logged)
    with pytest.raises(DataError, match="file not found") as err:
        build_loader(ds, backend="torchvision", scales=(64,), batch_size=4)
    assert victim.band_paths[2] in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_scaling_and_mask_channel(ground, backend):
    ds = discover(ground, val_fraction=0)["train"]
    raws = [read_sample(s, ds, check=False) for s in ds.samples]
    masked = [i for i, r in enumerate(raws) if (r == CHALLENGE_MASK_VALUE).any()]
    assert masked, "the generator masks some cutouts"
    opts = dict(scales=(101,), batch_size=8, mask_value=CHALLENGE_MASK_VALUE, scaling="asinh", scale_a=1e11,
                mask_channel=True)
    _, _, imgs = collect(build_loader(ds, backend=backend, **opts))
    x = imgs[101]
    assert x.shape == (40, 5, 101, 101) and torch.isfinite(x).all()
    for i in masked[:3]:
        m = raws[i] == CHALLENGE_MASK_VALUE
        assert (x[i, :4][torch.from_numpy(m)] == 0).all(), "masked pixels become 0"
        np.testing.assert_array_equal(x[i, 4].numpy(), m.any(0).astype(np.float32))
        keep = ~m
        expected = np.arcsinh(1e11 * raws[i][keep])
        np.testing.assert_allclose(x[i, :4].numpy()[keep], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dali", DALI_BACKENDS)  # on a GPU also DALI's per-band FITS readers in lock-step
def test_dali_and_torchvision_agree_on_challenge_data(ground, dali):
    ds = discover(ground, val_fraction=0)["train"]
    base = LoaderOptions(mask_value=CHALLENGE_MASK_VALUE, scaling="asinh", scale_a=1e11)
    mean, std = compute_stats(ds, base)
    assert len(mean) == 4 and all(s > 0 for s in std)
    for mode in ("resize", "crop"):
        kw = dict(scales=(64, 101, 128), batch_size=6, mask_value=CHALLENGE_MASK_VALUE, scaling="asinh",
                  scale_a=1e11, mean=mean, std=std, resize_mode=mode)
        ia, _, a = collect(build_loader(ds, backend=dali, **kw))
        ib, _, b = collect(build_loader(ds, backend="torchvision", **kw))
        assert ia.tolist() == ib.tolist() == list(range(40))
        for s in (64, 101, 128):
            assert a[s].shape == (40, 4, s, s)
            diff = (a[s] - b[s]).abs()
            if mode == "resize" and s < 101:
                # DALI's and PyTorch's antialiasing kernels differ slightly at non-integer downscaling ratios:
                # visible on pixel-to-pixel noise, negligible on average
                assert diff.mean() < 5e-3 and diff.max() < 0.3, (mode, s, float(diff.mean()), float(diff.max()))
            else:
                assert diff.max() < 2e-3, (mode, s, float(diff.max()))
    # crop mode takes the central 64 px of the 101 px cutout without resampling
    ref = torch.from_numpy(np.stack([prescale(read_sample(smp, ds, check=False), ds.kind, base) for smp in ds.samples]))
    norm = (ref - torch.tensor(mean).view(1, 4, 1, 1)) / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(b[64], norm[:, :, 19:83, 19:83], atol=1e-5)
    # and zero-pads to 128 px: the 101 px cutout sits at offset 14 (DALI's rounding), the border is 0 before
    # normalisation, i.e. -mean/std after it
    border = (-torch.tensor(mean) / torch.tensor(std)).view(1, 4, 1)
    assert torch.allclose(b[128][:, :, :14, 0], border.expand(40, 4, 14), atol=1e-5)
    assert torch.allclose(b[128][:, :, 14:115, 14:115], norm, atol=1e-5)


def test_tta_equals_mean_over_eight_explicit_transforms(ground):
    """Evaluation with --tta averages the model over the 8 dihedral views produced from one decode."""
    from dali_lens.models import build_model

    ds = discover(ground, val_fraction=0)["train"]
    kw = dict(scales=(64,), batch_size=8, mask_value=CHALLENGE_MASK_VALUE, scaling="asinh", scale_a=1e11)
    plain = next(iter(build_loader(ds, backend="dali-cpu", **kw)))["image"][64]
    tta = next(iter(build_loader(ds, backend="dali-cpu", tta=True, **kw)))["image"][64]
    assert tta.shape == (8, 8, 4, 64, 64)
    explicit = []
    for k in range(4):
        r = torch.rot90(plain, k, dims=(-2, -1))
        explicit += [(k, False, r)]
    for k in range(4):
        explicit += [(k, True, torch.rot90(plain, k, dims=(-2, -1)).transpose(-2, -1))]
    torch.manual_seed(0)
    model = build_model("small_cnn", in_chans=4).eval()
    with torch.no_grad():
        via_pipeline = model(tta.reshape(64, 4, 64, 64)).reshape(8, 8).mean(1)
        by_hand = torch.stack([model(v) for _, _, v in explicit]).mean(0)
    assert torch.allclose(via_pipeline, by_hand, atol=1e-5)
    assert torch.equal(dihedral8(plain)[:, 0], plain)
