"""One decoding policy per format, held on every backend and in ``check``: the odd variants of a format give
the pixels the plain file with the same content gives (or are refused by name, on every backend alike)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conftest import BACKENDS, DALI_BACKENDS, collect
from dali_lens.data import DataError, discover
from dali_lens.data.readers import read_sample
from dali_lens.data.validate import scan
from dali_lens.pipelines import build_loader

SIZE = 24


def batches(ds, backend, **kw):
    opts = dict(scales=(SIZE,), batch_size=4, num_workers=1)
    opts.update(kw)
    return collect(build_loader(ds, backend=backend, **opts))[2][SIZE]


def blobs(n: int, bands: int = 2) -> list[np.ndarray]:
    """Integer-valued float32 cutouts (bands, SIZE, SIZE) in 0..255, exact in every dtype used below."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return [np.stack([np.rint(200 * np.exp(-((yy - 8 - i) ** 2 + (xx - 11) ** 2) / 30.0)) + 10 * b + i
                      for b in range(bands)]).astype(np.float32) for i in range(n)]


NPY_VARIANTS = {  # the stored form of a float32 array, by name; every one must give the same pixels
    "f4": lambda a: a, "f4_big_endian": lambda a: a.astype(">f4"), "f2": lambda a: a.astype(np.float16),
    "u2": lambda a: a.astype(np.uint16), "u2_big_endian": lambda a: a.astype(">u2"),
    "f8": lambda a: a.astype(np.float64), "i4": lambda a: a.astype(np.int32), "u1": lambda a: a.astype(np.uint8),
    "fortran": lambda a: np.asfortranarray(a),
}


def _npy_folder(root, variants) -> str:
    arrays = blobs(len(NPY_VARIANTS))
    for k, (name, to) in enumerate(variants.items()):
        cls = ("lens", "nonlens")[k % 2]
        os.makedirs(os.path.join(root, "test", cls), exist_ok=True)
        np.save(os.path.join(root, "test", cls, f"{k:02d}_{name}.npy"), to(arrays[k]))
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_npy_of_mixed_dtypes_gives_the_float32_pixels_on_every_backend(tmp_path, backend):
    """Big-endian, float16, uint16, Fortran-order ... .npy among float32 files: DALI's numpy reader asserted
    ("Critical error in pipeline") while check passed and torchvision read them exactly. Now each gives the
    pixels its float32 copy gives, on every backend and in check."""
    ref = discover(_npy_folder(str(tmp_path / "ref"), {k: NPY_VARIANTS["f4"] for k in NPY_VARIANTS}))["test"]
    mixed = discover(_npy_folder(str(tmp_path / "mixed"), NPY_VARIANTS))["test"]
    assert scan(mixed) == {}
    for s, r in zip(mixed.samples, ref.samples):
        assert np.array_equal(read_sample(s, mixed), read_sample(r, ref))
    kw = dict(mean=(100.0, 100.0), std=(50.0, 50.0))
    assert torch.equal(batches(mixed, backend, **kw), batches(ref, backend, **kw))


@pytest.mark.parametrize("dali", DALI_BACKENDS)
def test_npy_of_one_big_endian_dtype_reads_on_dali(tmp_path, dali):
    """A data set of big-endian float32 only (DALI's reader refuses the byte order): read through numpy."""
    ref = discover(_npy_folder(str(tmp_path / "ref"), {k: NPY_VARIANTS["f4"] for k in NPY_VARIANTS}))["test"]
    big = discover(_npy_folder(str(tmp_path / "big"), {k: NPY_VARIANTS["f4_big_endian"] for k in NPY_VARIANTS}))
    kw = dict(mean=(100.0, 100.0), std=(50.0, 50.0))
    assert torch.equal(batches(big["test"], dali, **kw), batches(ref, dali, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_npy_of_complex_dtype_is_refused_by_name(tmp_path, backend):
    variants = {k: NPY_VARIANTS["f4"] for k in list(NPY_VARIANTS)[:4]}
    root = _npy_folder(str(tmp_path / "c"), variants)
    bad = os.path.join(root, "test", "lens", "zz_complex.npy")
    np.save(bad, blobs(1)[0].astype(np.complex64))
    ds = discover(root)["test"]
    assert [m for m in scan(ds).values()] == [f"{bad}: unsupported .npy dtype '<c8' (dali-lens reads bool, "
                                              "integer and float16/32/64 arrays)"]
    with pytest.raises(DataError, match="zz_complex.npy: unsupported .npy dtype"):
        batches(ds, backend)


# ============================================================================================ PNG / JPEG

def _rgb(i: int) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: smooth, different per i."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    return np.stack([(120 + 100 * np.sin((xx + 3 * i + 5 * c) / 4.0) * np.cos(yy / 5.0)) for c in range(3)],
                    axis=-1).astype(np.uint8)


def _save(path, i: int, variant: str) -> None:
    from PIL import Image

    rgb = _rgb(i)
    im = {"grey": Image.fromarray(rgb[..., 0]), "la": Image.fromarray(rgb[..., :2].copy(), "LA"),
          "rgba": Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"),
          "palette": Image.fromarray(rgb).quantize(48), "bit1": Image.fromarray(rgb[..., 0] > 120),
          "bit16": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
          "cmyk": Image.fromarray(rgb).convert("CMYK"), "tiff": Image.fromarray(rgb)}.get(variant)
    im = im or Image.fromarray(rgb)
    kw = {"jpeg420": dict(format="JPEG", quality=85, subsampling=2),
          "jpeg_progressive": dict(format="JPEG", quality=85, progressive=True),
          "jpeg_grey": dict(format="JPEG", quality=85), "cmyk": dict(format="JPEG"),
          "palette_transparent": dict(format="PNG", transparency=5), "tiff": dict(format="TIFF")}.get(variant, {})
    if variant == "palette_transparent":
        im = im.quantize(48)
    if variant == "jpeg_grey":
        im = im.convert("L")
    if variant == "jpeg_exif_rotated":
        exif = Image.Exif()
        exif[0x0112] = 6  # "rotate 90 CW to display": the pixels as stored are the policy
        kw = dict(format="JPEG", quality=85, subsampling=0, exif=exif.tobytes())
    im.save(path, **(kw or dict(format="PNG")))


def _image_folder(root: str, variant: str, n: int = 4, start: int = 0) -> str:
    os.makedirs(root, exist_ok=True)
    ext = "jpg" if variant.startswith("jpeg") or variant == "cmyk" else "png"
    for i in range(start, start + n):
        _save(os.path.join(root, f"{variant}_{i}.{ext}"), i, variant)
    return root


def _as_png_folder(ds, root: str) -> str:
    """The pixels ``check`` reads (read_sample) of each file of ``ds``, as plain 8-bit PNGs."""
    from dali_lens.data.kinds.image import png_bytes

    os.makedirs(root)
    for k, s in enumerate(ds.samples):
        with open(os.path.join(root, f"ref_{k}.png"), "wb") as fh:
            fh.write(png_bytes(read_sample(s, ds)))
    return root


ACCEPTED = ["grey", "rgba", "palette", "palette_transparent", "jpeg420", "jpeg_progressive", "jpeg_grey",
            "jpeg_exif_rotated"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ACCEPTED)
def test_image_variants_give_checks_pixels_on_every_backend(tmp_path, variant, backend):
    """Each accepted variant gives, on every backend, the batch its pixels as check reads them (stored as plain
    PNG) give. Failed before for EXIF-rotated JPEG on DALI (its decoder applied the orientation: pixels
    rotated, while check, Pillow and torchvision keep them as stored)."""
    ds = discover(_image_folder(str(tmp_path / variant), variant))["predict"]
    assert scan(ds) == {}
    ref = discover(_as_png_folder(ds, str(tmp_path / "ref")))["predict"]
    assert (ds.bands, ds.shape) == (ref.bands, ref.shape)
    assert torch.equal(batches(ds, backend), batches(ref, backend))


REFUSED = {"bit1": "1-bit PNG: dali-lens reads 8-bit PNG/JPEG", "bit16": "16-bit PNG: dali-lens reads 8-bit",
           "cmyk": "JPEG with 4 colour components (CMYK/YCCK)", "tiff": "not a PNG or JPEG file"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", sorted(REFUSED))
def test_image_variants_decoders_disagree_on_are_refused_by_name(tmp_path, variant, backend):
    """16-bit PNG (uint16 from Pillow/torchvision, uint8 from DALI), 1-bit PNG (0/1 against 0/255), CMYK JPEG (4
    bands from torchvision, 3 from Pillow and DALI) and other formats under a .png name (decoded by Pillow and
    DALI, refused by torchvision): refused by name, the same on every backend and in check."""
    root = _image_folder(str(tmp_path / "d"), "rgb", n=3)
    ext = "jpg" if variant == "cmyk" else "png"
    bad = os.path.join(root, f"zz_{variant}.{ext}")
    _save(bad, 9, variant)
    ds = discover(root)["predict"]
    problems = list(scan(ds).values())
    assert len(problems) == 1 and problems[0].startswith(f"{bad}: {REFUSED[variant]}"), problems
    with pytest.raises(DataError, match=f"zz_{variant}"):
        batches(ds, backend)


@pytest.mark.parametrize("dali", DALI_BACKENDS)
def test_grey_alpha_png_is_refused_by_name_on_dali(tmp_path, dali):
    """DALI's image decoder fails on grey + alpha PNG ("Failed to decode sample"); torchvision reads it."""
    ds = discover(_image_folder(str(tmp_path / "la"), "la"))["predict"]
    assert ds.bands == 2 and scan(ds) == {}
    assert batches(ds, "torchvision").shape == (4, 2, SIZE, SIZE)
    with pytest.raises(DataError, match=r"la_0.png: grey \+ alpha PNG \(2 bands\): DALI's image decoder cannot"):
        batches(ds, dali)


# ============================================================================================ decompression bomb

@pytest.fixture(scope="module")
def bomb_folder(tmp_path_factory):
    """lens/ and nonlens/ of small PNGs, plus a constant 13,500 x 13,500 px PNG (~0.5 MB on disk) in lens/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("bomb")
    for k, cls in enumerate(("lens", "nonlens")):
        _image_folder(str(root / cls), "rgb", n=3, start=3 * k)
    bomb = root / "lens" / "bomb.png"
    Image.new("L", (13500, 13500), 7).save(bomb)
    return str(root), str(bomb)


def _cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300)


def test_decompression_bomb_is_one_line_in_check_and_skipped_with_skip_bad(bomb_folder, tmp_path):
    """A 13,500 x 13,500 px PNG stopped check, predict, pack and even --skip-bad with Pillow's
    DecompressionBombError traceback; it is over the documented pixel limit, refused from its header."""
    from dali_lens.data.readers import MAX_IMAGE_PIXELS
    from dali_lens.data.validate import drop_bad, validate

    root, bomb = bomb_folder
    assert 13500 ** 2 > MAX_IMAGE_PIXELS >= 224 ** 2
    want = f"{bomb}: image is 13500x13500 px, over dali-lens's limit of {MAX_IMAGE_PIXELS} px"
    res = _cli("dali_lens.check", root)
    assert res.returncode == 2 and "Traceback" not in res.stderr + res.stdout, res.stderr
    assert [ln for ln in res.stdout.splitlines() if "problem:" in ln] == [f"  problem: {want} (4096x4096; cutouts "
                                                                          "are 64-224 px): not a cutout, or a "
                                                                          "decompression bomb"]
    res = _cli("dali_lens.pack", root, str(tmp_path / "packed"), "--no-progress")
    assert res.returncode == 2 and "Traceback" not in res.stderr and want in res.stderr, res.stderr
    res = _cli("dali_lens.pack", root, str(tmp_path / "packed2"), "--no-progress", "--skip-bad", "--val-fraction", "0")
    assert res.returncode == 0 and "Traceback" not in res.stderr and want in res.stderr + res.stdout, res.stderr
    ds = discover(root, val_fraction=0)["train"]
    with pytest.raises(DataError, match="bomb.png: image is 13500x13500 px"):
        validate(ds)  # what every loader runs first (predict, evaluate, train)
    kept = drop_bad(ds, log=lambda *a: None)  # --skip-bad of predict, evaluate and train
    assert len(kept) == len(ds) - 1 and bomb not in {s.path for s in kept.samples}


# ============================================================================================ FITS

def _fits_variants(arr: np.ndarray) -> dict:
    """HDU lists storing the integer-valued float32 ``arr`` (bands, H, W) in odd ways astropy reads back exactly."""
    from astropy.io import fits

    def scaled(a):  # int16 with BSCALE 2, BZERO 1000 (a - 1000 is even below)
        h = fits.ImageHDU(a.astype(np.float64))
        h.scale("int16", bscale=2.0, bzero=1000.0)
        return h

    return {
        "float32.fits": [fits.ImageHDU(b) for b in arr],
        "bscale_bzero.fits": [scaled(b) for b in arr],
        "uint16.fits": [fits.ImageHDU(b.astype(np.uint16)) for b in arr],  # int16 + BZERO 32768
        "int32.fits": [fits.ImageHDU(b.astype(np.int32)) for b in arr],
        "uint8.fits": [fits.ImageHDU(b.astype(np.uint8)) for b in arr],
        "float64.fits": [fits.ImageHDU(b.astype(np.float64)) for b in arr],
        "rice.fits.fz": [fits.CompImageHDU(b.astype(np.int16), compression_type="RICE_1") for b in arr],
        "gzip.fits.gz": [fits.ImageHDU(b) for b in arr],
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_fits_variants_give_astropys_scaled_values_on_every_backend(tmp_path, backend):
    """BSCALE/BZERO, unsigned 16-bit (BZERO 32768), integer and double BITPIX, Rice tiles, gzip: each file gives
    the values astropy scales it to (the policy), on every backend and in check."""
    from astropy.io import fits

    arrays = [2 * np.rint(a / 2) for a in blobs(8)]  # even, 0..220: exact in every variant
    root, ref_root = tmp_path / "v", tmp_path / "ref"
    for k, arr in enumerate(arrays):
        name, hdus = list(_fits_variants(arr).items())[k]
        for where, h in ((root, hdus), (ref_root, [fits.ImageHDU(b) for b in arr])):
            os.makedirs(where / "test" / ("lens", "nonlens")[k % 2], exist_ok=True)
            fits.HDUList([fits.PrimaryHDU()] + h).writeto(where / "test" / ("lens", "nonlens")[k % 2] / f"{k}_{name}")
    ds, ref = discover(str(root), hdus=(1, 2))["test"], discover(str(ref_root), hdus=(1, 2))["test"]
    assert scan(ds) == {}
    for s, r in zip(ds.samples, ref.samples):
        assert np.array_equal(read_sample(s, ds), read_sample(r, ref)), s.path
    kw = dict(mean=(100.0, 100.0), std=(50.0, 50.0), scaling="none")
    assert torch.equal(batches(ds, backend, **kw), batches(ref, backend, **kw))


def test_dali_gpu_fits_reader_is_not_given_scaled_files(tmp_path):
    """DALI's GPU FITS reader returns the stored integers, ignoring BSCALE/BZERO: an unsigned 16-bit FITS (int16 +
    BZERO 32768) or a BSCALE/BZERO file was handed to it as a plain HDU (its pixels off by 32768 on the GPU).
    Scaled files are read by astropy; unscaled ones still go to DALI."""
    from astropy.io import fits

    from dali_lens.data.kinds.fits import fits_hdu_numbers

    arr = 2 * np.rint(blobs(1)[0] / 2)
    for name, hdus in _fits_variants(arr).items():
        if name.endswith(".gz"):
            continue
        folder = tmp_path / name
        os.makedirs(folder)
        fits.HDUList([fits.PrimaryHDU()] + hdus).writeto(folder / f"a_{name}")
        ds = discover(str(folder), hdus=(1, 2))["predict"]
        want = None if name in ("bscale_bzero.fits", "uint16.fits") else [2, 3]
        assert fits_hdu_numbers(ds) == want, name


def test_fits_over_the_pixel_limit_and_missing_hdus_are_one_line(tmp_path):
    """A 5000 x 5000 px band in a 25 kB .fits.gz (astropy decompressed all of it) is refused from its header,
    like an image over the limit; an HDU index the file lacks (--hdus 99: an IndexError traceback) is named."""
    from astropy.io import fits

    from dali_lens.data.readers import MAX_IMAGE_PIXELS

    root = tmp_path / "f"
    os.makedirs(root)
    for i, a in enumerate(blobs(3)):
        fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(b) for b in a]).writeto(root / f"{i}.fits")
    big = root / "big.fits.gz"
    fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU(np.zeros((5000, 5000), np.uint8))] * 2).writeto(big)
    assert os.path.getsize(big) < 100_000 and 5000 ** 2 > MAX_IMAGE_PIXELS
    ds = discover(str(root))["predict"]
    assert list(scan(ds).values()) == [f"{big}: HDU 1 is 5000x5000 px, over dali-lens's limit of "
                                       f"{MAX_IMAGE_PIXELS} px per band (4096x4096; cutouts are 64-224 px): not a "
                                       "cutout, or a decompression bomb"]
    with pytest.raises(DataError, match=r"0.fits: --hdus 99: no such HDU \(its HDUs: 0 PRIMARY, 1, 2\)$"):
        discover(str(root), hdus=(1, 99))
