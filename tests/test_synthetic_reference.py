"""The synthetic generator's output is pinned: physics, encoders and layouts against committed references.

``tests/data/synthetic_reference.npz`` holds the images and catalogues of a few tiny simulations, and
``tests/data/synthetic_reference.json`` the bytes of the encoders (sha256 of fixed inputs) and of the layouts
(file names, dataset.json / generator.json, challenge labels and masked pixels), all written by the generator
as it was before ``dali_lens/data/synthetic.py`` was split into a package. A change of the physics, of an
encoder or of a layout fails here. The simulations are compared with a tolerance far below the noise (a
different CPU may round float32 transcendental functions differently), everything else byte for byte.

To regenerate after an intended change: ``python tests/test_synthetic_reference.py`` (and say why in the
commit message: every data set generated before differs).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest

from dali_lens.data import synthetic as syn

HERE = os.path.dirname(os.path.abspath(__file__))
NPZ = os.path.join(HERE, "data", "synthetic_reference.npz")
JSON = os.path.join(HERE, "data", "synthetic_reference.json")

#: name -> simulate() keyword arguments (tiny: 12-16 px)
SIMULATIONS = {
    "ground": dict(n=6, size=16, bands=("g", "r", "i"), seed=11, is_lens=[1, 0, 1, 0, 1, 0]),
    "moffat": dict(n=4, size=12, bands=("u", "z", "foo"), seed=2, is_lens=True, psf="moffat", supersample=3,
                   source_mag=(20.0, 21.0), einstein_radius=(0.6, 1.0)),
    "space": dict(n=4, size=16, bands=("vis",), seed=3, survey="space", start=5),
    "noiseless": dict(n=3, size=12, bands=("r",), seed=4, is_lens=True, noise=False, seeing=(0.5, 0.6)),
}

#: name -> generate_dataset() keyword arguments of the pinned layouts
LAYOUTS = {
    "png": dict(n=8, size=16, fmt="png", seed=1),
    "jpeg-1band": dict(n=8, size=16, fmt="jpeg", bands="r", seed=1),
    "fits-ugriz": dict(n=8, size=16, fmt="fits", bands="u,g,r,i,z", seed=2, splits=(0.5, 0.25, 0.25)),
    "npy": dict(n=8, size=16, fmt="npy", seed=3, lens_fraction=0.25),
    "challenge-ground": dict(n=12, size=16, layout="challenge", track="ground", seed=5),
    "challenge-space": dict(n=12, size=16, layout="challenge", track="space", seed=6),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fixed_planes() -> np.ndarray:
    """A fixed float32 (3, 8, 8) input for the encoders (no floating-point functions involved)."""
    return (np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8) * np.float32(37.25) - np.float32(500.0))


def _png_content(data: bytes) -> bytes:
    """Signature, IHDR and the decompressed IDAT of a PNG (independent of the zlib build's byte stream)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, parts = 8, [data[:8]]
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        parts.append(tag + (zlib.decompress(body) if tag == b"IDAT" else body))
        pos += 12 + length
    return b"".join(parts)


def encoder_hashes() -> dict[str, str]:
    planes = _fixed_planes()
    u8 = (np.arange(3 * 8 * 8).reshape(3, 8, 8) * 5 % 256).astype(np.uint8)
    return {
        "fits_extensions": _sha(syn.fits_bytes(planes, ["g", "r", "i"])),
        "fits_primary": _sha(syn.fits_bytes(planes[1])),
        "png_rgb": _sha(_png_content(syn.png_bytes(u8))),
        "png_grey": _sha(_png_content(syn.encode_image(u8[:1], "png"))),
        "npy": _sha(syn.npy_bytes(planes)),
    }


def layout_pins(root: str, kw: dict) -> dict:
    """What is pinned of one generated set: every file name, the JSON record, and for the challenge layout
    the labels and the number of masked pixels of every file."""
    files = sorted(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/")
                   for d, _, fs in os.walk(root) for f in fs)
    record = "generator.json" if kw.get("layout") == "challenge" else "dataset.json"
    pins = {"files": files, record: _sha(open(os.path.join(root, record), "rb").read())}
    if kw.get("layout") == "challenge":
        from astropy.io import fits

        rows = open(os.path.join(root, "classifications.csv")).read().splitlines()
        pins["labels"] = [",".join(r.split(",")[:2]) for r in rows]
        pins["masked"] = {f: int((fits.getdata(os.path.join(root, f)) == syn.CHALLENGE_MASK_VALUE).sum())
                          for f in files if f.endswith(".fits")}
    return pins


def _simulate(kw: dict):
    kw = dict(kw)
    return syn.simulate(kw.pop("n"), **kw)


def test_simulations_match_reference():
    ref = np.load(NPZ)
    for name, kw in SIMULATIONS.items():
        images, cat = _simulate(kw)
        want = ref[f"{name}/images"]
        assert images.shape == want.shape, name
        np.testing.assert_allclose(images, want, rtol=1e-4, atol=1e-3, err_msg=name)
        for col in ("index", "is_lens") + syn.CATALOGUE_COLUMNS:
            atol = 1 if col == "numb_pix_lensed_image" else 1e-6  # a pixel at the 1-sigma threshold may flip
            np.testing.assert_allclose(cat[col], ref[f"{name}/{col}"], rtol=1e-4, atol=atol,
                                       err_msg=f"{name}: {col}")


def test_encoders_match_reference():
    assert encoder_hashes() == json.load(open(JSON))["encoders"]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layouts_match_reference(tmp_path, name):
    kw = LAYOUTS[name]
    syn.generate_dataset(tmp_path / name, workers=1, **kw)
    assert layout_pins(str(tmp_path / name), kw) == json.load(open(JSON))["layouts"][name]


def _write_references() -> None:  # pragma: no cover - run by hand after an intended change
    import tempfile

    arrays = {}
    for name, kw in SIMULATIONS.items():
        images, cat = _simulate(kw)
        arrays[f"{name}/images"] = images
        for col in ("index", "is_lens") + syn.CATALOGUE_COLUMNS:
            arrays[f"{name}/{col}"] = cat[col]
    np.savez_compressed(NPZ, **arrays)
    layouts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in LAYOUTS.items():
            syn.generate_dataset(os.path.join(tmp, name), workers=1, **kw)
            layouts[name] = layout_pins(os.path.join(tmp, name), kw)
    with open(JSON, "w") as fh:
        json.dump({"encoders": encoder_hashes(), "layouts": layouts}, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"wrote {NPZ} and {JSON}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    _write_references()
