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
