"""Dataset discovery: folders, CSV manifests, FITS, .npy, the challenge layout; splits; clear errors."""
from __future__ import annotations

import os

import numpy as np
import pytest

from dali_lens.data import DataError, discover
from dali_lens.data.readers import read_sample
from dali_lens.data.sources import stratified_split


def test_split_folders(make_dataset):
    splits = discover(make_dataset("png", n_per_class=10), val_fraction=0.2, seed=1)
    assert set(splits) == {"train", "val", "test"}
    train, val, test = splits["train"], splits["val"], splits["test"]
    assert (len(train), len(val), len(test)) == (16, 4, 20)
    assert val.counts() == {"lens": 2, "nonlens": 2, "unlabelled": 0}  # stratified
    assert not {s.path for s in train.samples} & {s.path for s in val.samples}
    assert train.kind == "image" and train.bands == 3 and train.shape == (40, 40)
    again = discover(make_dataset("png", n_per_class=10), val_fraction=0.2, seed=1)
    assert [s.path for s in again["val"].samples] == [s.path for s in val.samples]  # seeded


def test_csv_manifests_relative_paths_and_metadata(make_dataset):
    root = make_dataset("npy", n_per_class=4)
    rows = ["filepath,label,einstein_area"]
    for cls, lab in (("lens", 1), ("nonlens", 0)):
        for i in range(4):
            rows.append(f"train/{cls}/{cls}{i:03d}.npy,{lab},{1.5 * i}")
    open(os.path.join(root, "train.csv"), "w").write("\n".join(rows) + "\n")
    splits = discover(root, val_fraction=0.25)
    assert set(splits) == {"train", "val"}
    s = splits["train"].samples[0]
    assert os.path.isabs(s.path) and "einstein_area" in s.meta
    assert splits["train"].kind == "npy"


def test_fits_bands_by_hdu_index_and_extname(make_dataset):
    root = make_dataset("fits", bands=3, n_per_class=3)
    by_default = discover(root)["test"]
    by_name = discover(root, hdus=("B2", "B0"))["test"]
    by_index = discover(root, hdus=(3, 1))["test"]
    assert by_default.bands == 3 and by_name.bands == 2
    a = read_sample(by_default.samples[0], by_default)
    b = read_sample(by_name.samples[0], by_name)
    c = read_sample(by_index.samples[0], by_index)
    np.testing.assert_array_equal(b, a[[2, 0]])
    np.testing.assert_array_equal(c, a[[2, 0]])


def test_fits_single_3d_hdu(tmp_path):
    from astropy.io import fits

    for cls in ("lens", "nonlens"):
        os.makedirs(tmp_path / cls)
        for i in range(3):
            fits.PrimaryHDU(np.random.rand(4, 16, 16).astype(np.float32)).writeto(tmp_path / cls / f"{i}.fits")
    ds = discover(str(tmp_path), val_fraction=0)["train"]
    assert ds.bands == 4 and ds.shape == (16, 16)


def test_unlabelled_folder_is_a_predict_split(make_dataset):
    root = make_dataset("png", n_per_class=2)
    ds = discover(os.path.join(root, "test", "lens"))
    assert list(ds) == ["predict"] and ds["predict"].labels == [-1, -1]


@pytest.mark.parametrize("problem,match", [
    ("missing-file", "file not found"),
    ("bad-label", "unknown label 'maybe'"),
    ("empty-class", "class folder is empty"),
    ("unknown-class-folder", "unknown class folder"),
    ("mixed-bands", "band"),
    ("no-filepath-column", "no 'filepath' column"),
])
def test_clear_errors(make_dataset, problem, match):
    root = make_dataset("png", n_per_class=3)
    if problem == "missing-file":
        open(os.path.join(root, "train.csv"), "w").write("filepath,label\ntrain/lens/nope.png,1\n")
    elif problem == "bad-label":
        open(os.path.join(root, "train.csv"), "w").write("filepath,label\ntrain/lens/lens000.png,maybe\n")
    elif problem == "no-filepath-column":
        open(os.path.join(root, "train.csv"), "w").write("name,label\ntrain/lens/lens000.png,1\n")
    elif problem == "empty-class":
        for f in os.listdir(os.path.join(root, "train", "lens")):
            os.remove(os.path.join(root, "train", "lens", f))
    elif problem == "unknown-class-folder":
        os.makedirs(os.path.join(root, "train", "maybe"))
    elif problem == "mixed-bands":
        from tests.conftest import write_dataset

        write_dataset(os.path.join(root, "grey"), "png", n_per_class=2, bands=1, splits=("test",))
        import shutil

        shutil.rmtree(os.path.join(root, "test"))
        os.rename(os.path.join(root, "grey", "test"), os.path.join(root, "test"))
    with pytest.raises(DataError, match=match) as err:
        discover(root)
    if problem in ("missing-file", "bad-label"):
        assert "train.csv" in str(err.value)


def test_stratified_split_keeps_class_balance():
    from dali_lens.data import Sample

    samples = [Sample(f"/x/{i}.png", int(i < 30), str(i)) for i in range(100)]
    keep, held = stratified_split(samples, 0.2, seed=0)
    assert len(held) == 20 and sum(s.label for s in held) == 6
    assert not set(keep) & set(held)
