"""Tests of the physics-based synthetic lens generator (dali_lens.data.synthetic, python -m dali_lens.generate)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from dali_lens.data import synthetic as syn
from dali_lens.data.synthetic import profiles, simulator, writer
from dali_lens.data.io import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ simulator

def test_deterministic_and_chunk_independent():
    a, ca = syn.simulate(12, size=32, seed=5)
    b, cb = syn.simulate(12, size=32, seed=5)
    assert np.array_equal(a, b)
    for k in ca:
        assert np.array_equal(ca[k], cb[k]), k
    c, _ = syn.simulate(12, size=32, seed=6)
    assert not np.array_equal(a, c)
    # samples 7..11 on their own (different chunking) are identical to the same samples in the big run
    d, cd = syn.simulate(5, size=32, seed=5, start=7, is_lens=ca["is_lens"][7:])
    assert np.array_equal(d, a[7:])
    assert np.array_equal(cd["index"], np.arange(7, 12))


def test_threads_do_not_change_results():
    n = simulator._SUBCHUNK + 6  # more than one block, so the thread pool really splits the work
    a, _ = syn.simulate(n, size=16, seed=2, workers=1)
    b, _ = syn.simulate(n, size=16, seed=2, workers=2)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("bands,size", [(("r",), 64), (("g", "r", "i"), 101), (("u", "g", "r", "i", "z"), 33)])
def test_shapes_and_dtypes(bands, size):
    im, cat = syn.simulate(6, size=size, bands=bands, seed=1)
    assert im.shape == (6, len(bands), size, size)
    assert im.dtype == np.float32
    assert np.isfinite(im).all()
    for k in ("is_lens", "einstein_radius", "einstein_area", "numb_pix_lensed_image",
              "flux_lensed_image_in_sigma", "source_mag", "seeing"):
        assert cat[k].shape == (6,), k


def test_labels_and_catalogue():
    lab = np.array([1, 0] * 10, dtype=bool)
    _, cat = syn.simulate(20, size=48, seed=3, is_lens=lab, source_mag=(20, 21))
    assert np.array_equal(cat["is_lens"], lab.astype(int))
    assert (cat["einstein_area"][~lab] == 0).all() and (cat["einstein_radius"][~lab] == 0).all()
    assert (cat["numb_pix_lensed_image"][~lab] == 0).all()
    ps = syn.SURVEYS["ground"]["pixel_scale"]
    np.testing.assert_allclose(cat["einstein_area"][lab], np.pi * (cat["einstein_radius"][lab] / ps) ** 2)
    lo, hi = syn.DEFAULT_DIFFICULTY["einstein_radius"]
    assert ((cat["einstein_radius"][lab] >= lo) & (cat["einstein_radius"][lab] <= hi)).all()
    # bright sources are visible: many pixels above the noise, magnified (SIE magnification > 1)
    assert (cat["numb_pix_lensed_image"][lab] > 0).all()
    assert (cat["flux_lensed_image_in_sigma"][lab] > 0).all()
    assert (cat["magnification"][lab] > 1).all()
    # random labels follow lens_fraction
    _, c2 = syn.simulate(200, size=16, seed=0, lens_fraction=0.25)
    assert 0.15 < c2["is_lens"].mean() < 0.35


def test_lens_has_extra_flux_over_same_deflector():
    n = 16
    lens, cl = syn.simulate(n, size=48, seed=9, is_lens=True, noise=False)
    plain, cn = syn.simulate(n, size=48, seed=9, is_lens=False, noise=False)
    same = (cl["companion"] == 0) & (cn["companion"] == 0)  # same deflector and field galaxies: diff = source
    assert same.sum() >= 3
    diff = (lens - plain)[same]
    assert (diff > -1e-3 * np.abs(plain[same]).max()).all()          # the source only adds light
    assert (diff.sum(axis=(1, 2, 3)) > 0).all()
    # the added light is the magnified source flux (flux conservation of the PSF, counts per band)
    r = 1  # r band
    expected = cl["magnification"][same] * 10 ** (-0.4 * (cl["source_mag"][same] - 30.0))
    np.testing.assert_allclose(diff[:, r].sum(axis=(1, 2)), expected, rtol=0.15)


def test_colours_deflector_redder_than_source():
    lens, cl = syn.simulate(30, size=48, seed=4, is_lens=True, noise=False)
    plain, cn = syn.simulate(30, size=48, seed=4, is_lens=False, noise=False)
    keep = (cn["companion"] == 0) & (cn["n_field"] == 0) & (cl["companion"] == 0)
    assert keep.sum() >= 2
    defl = plain[keep].sum(axis=(2, 3))                     # (k, bands g, r, i)
    src = (lens - plain)[keep].sum(axis=(2, 3))
    defl_ratio = defl[:, -1] / defl[:, 0]
    src_ratio = src[:, -1] / src[:, 0]
    assert (defl_ratio > 3).all()                           # red elliptical: i >> g
    assert (src_ratio < 1.5).all()                          # blue source
    assert (defl_ratio > 2 * src_ratio).all()


def test_unknown_band_names_fall_back_by_index():
    props = syn.band_properties(["b1", "b2", "b3", "b4"])
    assert np.all(np.diff(props["wavelength"]) > 0)
    assert props["deflector"][0] > props["deflector"][-1]    # fainter in the first (bluest) band
    assert syn.band_properties(["SDSS_R"])["wavelength"][0] == syn.SED_TABLE["r"][0]
    assert syn.band_properties(["HSC-G"])["wavelength"][0] == syn.SED_TABLE["g"][0]
    im, _ = syn.simulate(3, size=24, bands=("b1", "b2", "b3", "b4"), seed=0)
    assert im.shape == (3, 4, 24, 24)


def test_sie_deflection_physics():
    """q -> 1 is a singular isothermal sphere (|alpha| = theta_E); div(alpha) = 2 kappa for q < 1."""
    import torch

    t = torch.from_numpy
    x = np.linspace(-20, 20, 81, dtype=np.float32)
    X, Y = np.meshgrid(x, x)
    X, Y = X[None] + 0.37, Y[None] + 0.21
    one = torch.ones(1, dtype=torch.float64)
    ax, ay = profiles.sie_deflection(t(X), t(Y), 7.0 * one, 0.9999 * one, 0.0 * one, 0.0 * one, 0.0 * one)
    np.testing.assert_allclose(np.hypot(ax.numpy(), ay.numpy()), 7.0, rtol=2e-3)
    q, b, phi = 0.6, 5.0, 0.4
    x64 = np.linspace(-10, 10, 401) + 0.013
    X, Y = np.meshgrid(x64, x64)
    ax, ay = profiles.sie_deflection(t(X[None].astype(np.float32)), t(Y[None].astype(np.float32)), b * one,
                                     q * one, phi * one, 0 * one, 0 * one)
    ax, ay = ax.numpy(), ay.numpy()
    h = x64[1] - x64[0]
    div = np.gradient(ax[0].astype(np.float64), h, axis=1) + np.gradient(ay[0].astype(np.float64), h, axis=0)
    c, s = np.cos(phi), np.sin(phi)
    xr, yr = X * c + Y * s, Y * c - X * s
    kappa = b / (2 * np.sqrt(q ** 2 * xr ** 2 + yr ** 2))
    far = np.hypot(X, Y) > 3
    np.testing.assert_allclose(div[far][::50], 2 * kappa[far][::50], rtol=0.02)


def test_moffat_psf_and_space_survey():
    a, _ = syn.simulate(4, size=40, seed=1, psf="moffat", noise=False)
    b, _ = syn.simulate(4, size=40, seed=1, psf="gaussian", noise=False)
    assert not np.allclose(a, b)
    np.testing.assert_allclose(a.sum(axis=(2, 3)), b.sum(axis=(2, 3)), rtol=1e-3)   # both conserve flux
    im, cat = syn.simulate(4, size=50, bands=("vis",), seed=1, survey="space")
    assert im.shape == (4, 1, 50, 50)
    assert (cat["seeing"] < 0.3).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="einstein_radius"):
        syn.simulate(2, einstein_radius=(2, 1))
    with pytest.raises(ValueError, match="psf"):
        syn.simulate(2, psf="airy")
    with pytest.raises(ValueError, match="is_lens"):
        syn.simulate(3, is_lens=[True, False])


# ------------------------------------------------------------------------------------------------ writers

@pytest.mark.parametrize("fmt", ["png", "jpeg", "fits", "npy"])
def test_standard_layout_roundtrip(tmp_path, fmt):
    out = tmp_path / "ds"
    s = syn.generate_dataset(out, n=40, size=32, fmt=fmt, seed=1)
    assert s["n"] == 40 and s["lens"] == 20 and s["nonlens"] == 20
    expected = {"train": (28, 14), "val": (6, 3), "test": (6, 3)}
    header = ["filepath", "label"] + list(syn.CATALOGUE_COLUMNS)
    seen = set()
    for split, (n_split, n_lens) in expected.items():
        with open(out / f"{split}.csv", newline="") as fh:
            assert next(csv.reader(fh)) == header
        rows = _read_csv(out / f"{split}.csv")
        assert len(rows) == n_split
        assert sum(r["label"] == "1" for r in rows) == n_lens                # exact and stratified
        for r in rows:
            cls = "lens" if r["label"] == "1" else "nonlens"
            assert r["filepath"].startswith(f"{split}/{cls}/")
            assert os.path.isfile(out / r["filepath"])
            float(r["einstein_area"])
            seen.add(r["filepath"])
    assert len(seen) == 40
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert not [f for f in files if f.endswith(".tmp")]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["bands"] == ["g", "r", "i"] and meta["n"] == 40 and meta["seed"] == 1
    assert meta["splits"]["train"] == {"n": 28, "lens": 14, "nonlens": 14}

    row = _read_csv(out / "train.csv")[0]
    path = out / row["filepath"]
    idx = int(os.path.basename(row["filepath"]).split(".")[0])
    ref, _ = syn.simulate(1, size=32, seed=1, start=idx, is_lens=row["label"] == "1")
    if fmt in ("png", "jpeg"):
        from PIL import Image

        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (32, 32)
            arr = np.asarray(im).transpose(2, 0, 1)
        expect = syn.stretch_to_uint8(ref[0])
        tol = 0 if fmt == "png" else 40
        assert np.abs(arr.astype(int) - expect.astype(int)).max() <= tol
        assert meta["stretch"]["kind"] == "asinh"
    elif fmt == "fits":
        from astropy.io import fits

        with fits.open(path) as hdul:
            hdul.verify("exception")
            assert hdul[0].data is None
            assert [h.name for h in hdul[1:]] == ["G", "R", "I"]
            arr = np.stack([h.data for h in hdul[1:]])
        assert arr.dtype.kind == "f" and arr.dtype.itemsize == 4
        np.testing.assert_array_equal(arr, ref[0])
    else:
        arr = np.load(path)
        assert arr.dtype == np.float32 and arr.shape == (3, 32, 32)
        np.testing.assert_array_equal(arr, ref[0])


def test_greyscale_png_and_same_seed_same_files(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    syn.generate_dataset(a, n=10, size=24, bands="r", fmt="png", seed=3)
    syn.generate_dataset(b, n=10, size=24, bands=("r",), fmt="png", seed=3)
    from PIL import Image

    rows = _read_csv(a / "train.csv")
    with Image.open(a / rows[0]["filepath"]) as im:
        assert im.mode == "L"
    for name in ("train.csv", "val.csv", "test.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    for r in rows:
        assert (a / r["filepath"]).read_bytes() == (b / r["filepath"]).read_bytes()


def test_png_with_five_bands_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="5 bands.*fits"):
        syn.generate_dataset(tmp_path / "x", n=4, bands="u,g,r,i,z", fmt="png")
    assert not (tmp_path / "x").exists()                      # nothing written
    s = syn.generate_dataset(tmp_path / "y", n=4, size=16, bands="u,g,r,i,z", fmt="npy")
    assert s["bands"] == ["u", "g", "r", "i", "z"]


def test_refuses_non_empty_output_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    syn.generate_dataset(out, n=20, size=16, fmt="npy", seed=0)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        syn.generate_dataset(out, n=10, size=16, fmt="npy")
    syn.generate_dataset(out, n=10, size=16, fmt="npy", overwrite=True)
    files = [f for _, _, fs in os.walk(out) for f in fs if f.endswith(".npy")]
    assert len(files) == 10                                    # stale files of the first run are gone
    assert (out / "notes.txt").read_text() == "mine"           # other files are kept


@pytest.mark.parametrize("track", ["ground", "space"])
def test_challenge_layout(tmp_path, track):
    from astropy.io import fits

    out = tmp_path / track
    n = 30
    s = syn.generate_dataset(out, n=n, layout="challenge", track=track, seed=2)
    assert s["lens"] == 15
    with open(out / "classifications.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(syn.CHALLENGE_COLUMNS)
    rows = _read_csv(out / "classifications.csv")
    ids = [int(r["ID"]) for r in rows]
    assert ids == list(range(100000, 100000 + n))
    assert sum(int(r["is_lens"]) for r in rows) == 15
    for r in rows:
        if r["is_lens"] == "0":
            assert float(r["einstein_area"]) == 0
    if track == "space":
        dirs = [("EUC_VIS", "imageEUC_VIS")]
    else:
        assert syn.CHALLENGE_GROUND_BANDS == ("R", "I", "G", "U")
        dirs = [("Band1", "imageSDSS_R"), ("Band2", "imageSDSS_I"), ("Band3", "imageSDSS_G"),
                ("Band4", "imageSDSS_U")]
    n_masked = 0
    for ident in ids:
        masked = False
        for d, prefix in dirs:
            path = out / "Public" / d / f"{prefix}-{ident}.fits"
            with fits.open(path) as hdul:
                hdul.verify("exception")
                assert len(hdul) == 1
                data = hdul[0].data
            assert data.shape == (101, 101) and data.dtype.itemsize == 4
            sentinel = data == syn.CHALLENGE_MASK_VALUE
            masked |= bool(sentinel.any())
            good = data[~sentinel]
            assert np.abs(good).max() < 1e-6                      # raw-flux scale
            assert 1e-13 < np.std(good) < 1e-9
        n_masked += masked
    assert 1 <= n_masked <= n // 2                                # a small fraction is masked
    assert (out / "generator.json").is_file()
    assert sorted(os.listdir(out / "Public")) == sorted(d for d, _ in dirs)


# ------------------------------------------------------------------------------------------------ CLI, io

def test_cli(tmp_path, capsys):
    from dali_lens import generate

    rc = generate.main([str(tmp_path / "c"), "--n", "12", "--size", "20", "--format", "npy", "--seed", "4",
                        "--einstein-radius", "0.8,1.5", "--source-mag", "22,23", "--psf", "moffat", "--quiet"])
    assert rc == 0
    line = capsys.readouterr().out
    assert "wrote 12 images" in line and "cutouts/s" in line and "train 8" in line
    meta = json.loads((tmp_path / "c" / "dataset.json").read_text())
    assert meta["einstein_radius"] == [0.8, 1.5] and meta["psf"] == "moffat"
    # non-empty OUT: refused with exit status 2
    assert generate.main([str(tmp_path / "c"), "--n", "4", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert generate.main([str(tmp_path / "d"), "--n", "4", "--bands", "u,g,r,i,z", "--quiet"]) == 2
    assert "5 bands" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        generate.main(["--help"])
    assert exc.value.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--n", "--size", "--bands", "--format", "--layout", "--track", "--seed", "--lens-fraction",
                 "--einstein-radius", "--source-mag", "--psf", "--overwrite", "example"):
        assert flag in helptext


def test_atomic_writes(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(p, "wb") as fh:
            fh.write(b"partial")
            raise RuntimeError("interrupted")
    assert p.read_bytes() == b"old"                            # untouched by the failed write
    assert os.listdir(tmp_path) == ["f.bin"]                    # no temporary file left behind
    atomic_write_text(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "j.json", {"a": np.float32(1.5), "b": np.arange(2)})
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": 1.5, "b": [0, 1]}


@pytest.mark.parametrize("n,n_lens", [(6000, 3000), (10, 5), (11, 3), (7, 0), (7, 7), (1, 1)])
def test_split_counts_exact_and_stratified(n, n_lens):
    counts = writer._split_counts(n, n_lens, (0.7, 0.15, 0.15))
    assert sum(s for s, _ in counts) == n and sum(l for _, l in counts) == n_lens
    assert all(0 <= l <= s for s, l in counts)
    assert [s for s, _ in counts] == list(writer._largest_remainder(n, np.array([0.7, 0.15, 0.15])))
    labels, split = writer._plan(n, n_lens / n, (0.7, 0.15, 0.15), seed=0)
    assert labels.sum() == n_lens
    for k, (s, l) in enumerate(counts):
        assert (split == k).sum() == s and labels[split == k].sum() == l
