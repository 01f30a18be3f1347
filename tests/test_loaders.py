"""The loader contract, checked on the real DALI CPU backend and the torchvision backend."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS, DALI_BACKENDS, collect, resume_after
from dali_lens.data import DataError, discover
from dali_lens.data.readers import read_sample
from dali_lens.pipelines import LoaderOptions, build_loader

SCALES = (24, 40, 56)  # native size 40: a downscale, the identity and an upscale


def eval_tensors(ds, backend, **kw):
    opts = dict(scales=SCALES, batch_size=7, num_workers=2)
    opts.update(kw)
    return collect(build_loader(ds, backend=backend, **opts))


@pytest.mark.parametrize("dali", DALI_BACKENDS)
@pytest.mark.parametrize("fmt,bands", [("png", 3), ("png", 1), ("jpeg", 3), ("npy", 3), ("npy", 5), ("fits", 4)])
def test_dali_matches_torchvision(make_dataset, fmt, bands, dali):
    root = make_dataset(fmt, bands=bands, n_per_class=5)
    ds = discover(root)["test"]
    assert ds.bands == bands and ds.shape == (40, 40)
    kw = {}
    if fmt in ("npy", "fits"):
        kw = dict(mean=(100.0,) * bands, std=(300.0,) * bands)
    a_idx, a_lab, a = eval_tensors(ds, dali, **kw)
    b_idx, b_lab, b = eval_tensors(ds, "torchvision", **kw)
    assert a_idx.tolist() == b_idx.tolist() == list(range(len(ds)))
    assert a_lab.tolist() == b_lab.tolist() == ds.labels
    for s in SCALES:
        assert a[s].shape == b[s].shape == (len(ds), bands, s, s)
        assert a[s].dtype == b[s].dtype == torch.float32
        diff = (a[s] - b[s]).abs()
        # images are in [0, 1] (or ~[0, 3] for float data): a few 8-bit levels at most, far less on average; JPEG
        # too, now that nvJPEG upsamples chroma like libjpeg-turbo (jpeg_fancy_upsampling; was 0.05)
        assert diff.max() < 0.02, (s, float(diff.max()))
        assert diff.mean() < 2e-3, (s, float(diff.mean()))


@pytest.mark.parametrize("dali", DALI_BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "uint16", "int32"])
def test_npy_of_any_numeric_dtype_matches_torchvision(tmp_path, dtype, dali):
    """numpy saves float64 by default: such .npy files crashed DALI's resize/normalize ("Unsupported type:
    double"), found by a journey on hand-written files; they are cast to float32 like the torchvision path.
    The same integer-valued pixels stored as float32 and as ``dtype`` give the same batches on both backends."""
    yy, xx = np.mgrid[:40, :40]
    blob = np.rint(900 * np.exp(-((yy - 20) ** 2 + (xx - 17) ** 2) / 60.0))
    for name, dt in (("f4", "float32"), ("x", dtype)):
        for cls in ("lens", "nonlens"):
            os.makedirs(tmp_path / name / "test" / cls)
            for i in range(4):
                arr = np.stack([blob + 10 * i + 50 * b for b in range(3)])
                np.save(tmp_path / name / "test" / cls / f"o{i}.npy", arr.astype(dt))
    kw = dict(mean=(500.0,) * 3, std=(300.0,) * 3)
    ref = {be: eval_tensors(discover(str(tmp_path / "f4"))["test"], be, **kw)[2] for be in (dali, "torchvision")}
    ds = discover(str(tmp_path / "x"))["test"]
    for be in (dali, "torchvision"):
        got = eval_tensors(ds, be, **kw)[2]
        for s in SCALES:
            assert got[s].dtype == torch.float32 and torch.equal(got[s], ref[be][s]), (be, s)


def write_fits_bands(root: str, n_per_class: int = 6, size: int = 40, bands: int = 3, compressed: bool = False,
                     seed: int = 0) -> str:
    """root/test/<class>/*.fits[.fz]: an empty primary HDU and one int16 image HDU per band, Rice tile-compressed
    (lossless for integers) with ``compressed``."""
    from astropy.io import fits

    from conftest import smooth_images

    for k, cls in enumerate(("lens", "nonlens")):
        d = os.path.join(root, "test", cls)
        os.makedirs(d, exist_ok=True)
        for i, x in enumerate(smooth_images(n_per_class, size, bands, seed + k)):
            planes = (x * 1000).round().astype(np.int16)
            hdu = (lambda a, name: fits.CompImageHDU(a, name=name, compression_type="RICE_1")) if compressed \
                else (lambda a, name: fits.ImageHDU(a, name=name))
            fits.HDUList([fits.PrimaryHDU()] + [hdu(planes[b], f"B{b}") for b in range(bands)]).writeto(
                os.path.join(d, f"{cls}{i:03d}.fits" + (".fz" if compressed else "")))
    return root


@pytest.mark.parametrize("dali", DALI_BACKENDS)  # on a GPU: DALI's FITS reader, decompressing Rice tiles there
@pytest.mark.parametrize("compressed", [False, True])
def test_fits_hdus_by_index_plain_and_rice_compressed(tmp_path, dali, compressed):
    root = write_fits_bands(str(tmp_path / "fits"), compressed=compressed)
    ds = discover(root, hdus=(1, 2, 3))["test"]
    assert ds.kind == "fits" and ds.bands == 3 and len(ds) == 12
    if compressed:
        assert all(s.path.endswith(".fits.fz") for s in ds.samples)
    kw = dict(scales=(32, 40), batch_size=5, mean=(300.0,) * 3, std=(200.0,) * 3)
    a_idx, a_lab, a = collect(build_loader(ds, backend=dali, **kw))
    b_idx, b_lab, b = collect(build_loader(ds, backend="torchvision", **kw))
    assert a_idx.tolist() == b_idx.tolist() == list(range(12))
    assert a_lab.tolist() == b_lab.tolist() == ds.labels
    # the native scale is not resampled: the decompressed integers, exactly
    raw = torch.from_numpy(np.stack([read_sample(smp, ds) for smp in ds.samples]))
    torch.testing.assert_close(a[40], (raw - 300.0) / 200.0)
    assert (a[32] - b[32]).abs().max() < 0.02
    # training: every rank its own samples, each once, classes mixed, a new order each epoch
    orders = []
    for rank in range(2):
        tr = build_loader(ds, backend=dali, scales=(40,), batch_size=3, train=True, seed=2, shard_id=rank,
                          num_shards=2, max_shift=0)
        epochs = [[i for batch in tr for i in batch["index"].tolist()] for _ in range(2)]
        assert all(len(e) == len(set(e)) == 6 for e in epochs) and epochs[0] != epochs[1]
        orders.append(epochs)
    assert not set(orders[0][0]) & set(orders[1][0]) and not set(orders[0][1]) & set(orders[1][1])


def test_fits_hdu_numbers_for_dalis_reader_count_from_one(tmp_path):
    """CFITSIO's HDU numbers (primary = 1) from astropy's (primary = 0); EXTNAMEs and cubes stay with astropy."""
    from astropy.io import fits

    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.data.kinds.fits import fits_hdu_numbers

    plain = write_fits_bands(str(tmp_path / "plain"), n_per_class=1)
    assert fits_hdu_numbers(discover(plain, hdus=(1, 2, 3))["test"]) == [2, 3, 4]
    assert fits_hdu_numbers(discover(plain, hdus=(3, 1))["test"]) == [4, 2]
    assert fits_hdu_numbers(discover(plain, hdus=("B2", "B0"))["test"]) is None
    assert fits_hdu_numbers(discover(plain)["test"]) is None
    for cls in ("lens", "nonlens"):
        (tmp_path / "cube" / "test" / cls).mkdir(parents=True)
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 8, 8), np.float32))]).writeto(
            tmp_path / "cube" / "test" / cls / "a.fits")
    assert fits_hdu_numbers(discover(str(tmp_path / "cube"), hdus=(1,))["test"]) is None
    challenge = str(tmp_path / "challenge")
    generate_dataset(challenge, n=4, layout="challenge", track="ground", seed=1)
    bands = discover(challenge, val_fraction=0)["train"]
    assert bands.kind == "fits-bands" and fits_hdu_numbers(bands) == [1]  # data in the primary HDU
    # a tile-compressed per-band file keeps its image in the first extension (Rice, integers: exact on the GPU)
    for path in (p for s in bands.samples for p in s.band_paths):
        data = fits.getdata(path)
        os.remove(path)
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.round(data * 100).astype(np.int32),
                                                           compression_type="RICE_1")]).writeto(path)
    assert fits_hdu_numbers(discover(challenge, val_fraction=0)["train"]) == [2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_every_sample_exactly_once_and_order_kept(make_dataset, backend):
    ds = discover(make_dataset("png", n_per_class=11))["test"]  # 22 samples, batch 5 -> last batch of 2
    loader = build_loader(ds, backend=backend, scales=(40,), batch_size=5)
    assert len(loader) == 5
    for _ in range(2):  # two epochs
        batches = list(loader)
        assert [len(b["index"]) for b in batches] == [5, 5, 5, 5, 2]
        assert torch.cat([b["index"] for b in batches]).tolist() == list(range(22))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [2, 3])
def test_shards_disjoint_and_complete(make_dataset, backend, world):
    ds = discover(make_dataset("png", n_per_class=11))["test"]  # 22 samples: not divisible by 3
    seen, train_seen, lengths = [], [], set()
    for rank in range(world):
        ev = build_loader(ds, backend=backend, scales=(40,), batch_size=4, shard_id=rank, num_shards=world)
        seen.append([i for b in ev for i in b["index"].tolist()])
        tr = build_loader(ds, backend=backend, scales=(40,), batch_size=3, shard_id=rank, num_shards=world,
                          train=True, seed=5)
        batches = list(tr)
        lengths.add((len(tr), len(batches)))
        train_seen.append([i for b in batches for i in b["index"].tolist()])
    flat = [i for part in seen for i in part]
    assert sorted(flat) == list(range(22)), "eval shards must cover every sample exactly once"
    tflat = [i for part in train_seen for i in part]
    assert len(tflat) == len(set(tflat)), "training shards must be disjoint within an epoch"
    assert len(lengths) == 1, f"every rank must get the same number of batches: {lengths}"
    n_batches = lengths.pop()[0]
    assert n_batches == (22 // world) // 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shuffles_mixed_classes_and_drops_remainder(make_dataset, backend):
    ds = discover(make_dataset("png", n_per_class=20), val_fraction=0)["train"]  # class-sorted files
    loader = build_loader(ds, backend=backend, scales=(40,), batch_size=8, train=True, seed=1)
    assert len(loader) == 5
    epochs = [list(loader) for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 5 and all(len(b["index"]) == 8 for b in batches)
        assert len(set(torch.cat([b["index"] for b in batches]).tolist())) == 40
        assert 0 < batches[0]["label"].float().mean() < 1, "first batch must hold both classes"
    orders = [torch.cat([b["index"] for b in bs]).tolist() for bs in epochs]
    assert orders[0] != orders[1], "each epoch is reshuffled"


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_drawn_once_for_all_scales(make_dataset, backend):
    ds = discover(make_dataset("png", n_per_class=12), val_fraction=0)["train"]
    loader = build_loader(ds, backend=backend, scales=(20, 40), batch_size=8, train=True, seed=3)
    ref = collect(build_loader(ds, backend=backend, scales=(40,), batch_size=8))[2][40]
    moved = 0
    for b in loader:  # a CUDA loader's batches are on the GPU, collect()'s reference on the CPU
        full, small, index = b["image"][40].cpu(), b["image"][20].cpu(), b["index"].cpu()
        down = F.interpolate(full, size=(20, 20), mode="bilinear", antialias=True, align_corners=False)
        assert (down - small).abs().max() < 0.03, "the 20 px view must be the same transform as the 40 px view"
        moved += int(((full - ref[index]).abs().amax(dim=(1, 2, 3)) > 0.05).sum())
    assert moved > 0, "training must augment (random rotations/flips)"


@pytest.mark.parametrize("backend", BACKENDS)  # parametrized so that gpu_check selects the 'dali' case too
def test_dihedral_transforms_are_exact(make_dataset, backend):
    """With shifts off, every augmented training image is one of the 8 rotations/flips of the original."""
    from dali_lens.pipelines.batch import dihedral8

    ds = discover(make_dataset("png", n_per_class=8), val_fraction=0)["train"]
    ref = collect(build_loader(ds, backend="dali-cpu", scales=(40,), batch_size=4))[2][40]
    for b in build_loader(ds, backend=backend, scales=(40,), batch_size=4, train=True, seed=9):
        views = dihedral8(ref[b["index"].cpu()])  # (B, 8, C, H, W), on the CPU like collect()'s reference
        err = (views - b["image"][40].cpu()[:, None]).abs().amax(dim=(2, 3, 4)).amin(dim=1)
        assert err.max() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_continues_where_it_stopped(make_dataset, backend):
    ds = discover(make_dataset("png", n_per_class=16), val_fraction=0)["train"]
    opts = dict(scales=(40,), batch_size=4, train=True, seed=2)
    full = build_loader(ds, backend=backend, **opts)
    first_epoch = [b["index"].tolist() for b in full]
    second_epoch = [b["index"].tolist() for b in full]

    head, state, tail = resume_after(lambda: build_loader(ds, backend=backend, **opts), 3)
    assert state["epoch"] == 1 and state["batches_done"] == 3
    assert head + tail == second_epoch
    assert first_epoch != second_epoch


def test_output_dtypes(make_dataset):
    ds = discover(make_dataset("png", n_per_class=4))["test"]
    for backend in BACKENDS:
        b16 = next(iter(build_loader(ds, backend=backend, scales=(32,), batch_size=4, dtype="float16")))
        assert b16["image"][32].dtype == torch.float16
        u8 = next(iter(build_loader(ds, backend=backend, scales=(32,), batch_size=4, dtype="uint8")))
        assert u8["image"][32].dtype == torch.uint8 and u8["image"][32].max() > 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_output_finished_later_equals_float32(make_dataset, backend):
    """dtype='uint8' + pipelines.options.finish (what trainers and predict do) == the loader's float32 batch."""
    from dali_lens.pipelines.options import finish

    ds = discover(make_dataset("png", n_per_class=5))["test"]
    norm = dict(mean=(0.2, 0.3, 0.4), std=(0.5, 0.25, 0.125))
    _, _, f32 = eval_tensors(ds, backend, **norm)
    _, _, u8 = eval_tensors(ds, backend, dtype="uint8", **norm)
    # DALI resizes 8-bit images in 8 bits for every output dtype: the same numbers; torchvision resizes in
    # float and rounds to 8 bits only for uint8 output: at most half a level apart
    tol = 1e-5 if backend != "torchvision" else 0.5 / 255 / min(norm["std"]) + 1e-5
    for s in SCALES:
        assert u8[s].dtype == torch.uint8
        done = finish(u8[s], **norm)
        assert done.dtype == torch.float32
        torch.testing.assert_close(done, f32[s], atol=tol, rtol=0)
    assert finish(f32[SCALES[0]], **norm) is f32[SCALES[0]]  # float batches are left alone


def test_tta_gives_eight_views(make_dataset):
    ds = discover(make_dataset("png", n_per_class=4))["test"]
    b = next(iter(build_loader(ds, backend="dali-cpu", scales=(32,), batch_size=4, tta=True)))
    assert b["image"][32].shape == (4, 8, 3, 32, 32)
    x = b["image"][32][:, 0]
    assert torch.allclose(b["image"][32][:, 1], torch.rot90(x, 1, dims=(-2, -1)))
    assert torch.allclose(b["image"][32][:, 4], x.transpose(-2, -1))


# --- bad input ---------------------------------------------------------------------------------------------

def _corrupt(root, how):
    victim = os.path.join(root, "test", "lens", "lens002.png")
    if how == "zero-byte":
        open(victim, "wb").close()
    elif how == "truncated":
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) // 2])
    elif how == "garbage":
        open(victim, "wb").write(os.urandom(2000))
    elif how == "wrong-bands":
        from PIL import Image

        Image.fromarray(np.zeros((40, 40), np.uint8)).save(victim)
    elif how == "mixed-size":
        from PIL import Image

        Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(victim)
    return victim


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["zero-byte", "truncated", "garbage", "wrong-bands", "mixed-size"])
def test_bad_image_named_in_error(make_dataset, backend, how):
    root = make_dataset("png", n_per_class=6)
    victim = _corrupt(root, how)
    ds = discover(root)["test"]
    with pytest.raises(DataError) as err:
        for _ in build_loader(ds, backend=backend, scales=(32,), batch_size=4):
            pass
    assert victim in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_npy_named_in_error_or_masked(make_dataset, backend):
    root = make_dataset("npy", n_per_class=6)
    victim = os.path.join(root, "test", "nonlens", "nonlens004.npy")
    x = np.load(victim)
    x[0, 3, 4] = np.nan
    x[1, 5, 5] = np.inf
    np.save(victim, x)
    ds = discover(root)["test"]
    with pytest.raises(DataError, match="NaN/inf") as err:
        for _ in build_loader(ds, backend=backend, scales=(32,), batch_size=4):
            pass
    assert victim in str(err.value)
    # with a mask value, NaN/inf (and the sentinel) become 0 instead
    x[2, 6, 6] = 100.0
    np.save(victim, x)
    _, _, imgs = collect(build_loader(ds, backend=backend, scales=(40,), batch_size=4, mask_value=100.0))
    i = [s.path for s in ds.samples].index(victim)
    assert torch.isfinite(imgs[40]).all()
    assert imgs[40][i, 0, 3, 4] == 0 and imgs[40][i, 1, 5, 5] == 0 and imgs[40][i, 2, 6, 6] == 0


def test_skip_bad_and_check_command(make_dataset, capsys):
    from dali_lens.check import main
    from dali_lens.data.validate import drop_bad

    root = make_dataset("png", n_per_class=6)
    victims = [_corrupt(root, "truncated")]
    other = os.path.join(root, "test", "nonlens", "nonlens001.png")
    open(other, "wb").close()
    victims.append(other)
    ds = discover(root)["test"]
    logged = []
    kept = drop_bad(ds, log=logged.append)
    assert len(kept) == len(ds) - 2
    assert any("skipping 2 bad sample" in line for line in logged)
    assert all(any(v in line for line in logged) for v in victims)
    assert len(collect(build_loader(kept, backend="dali-cpu", scales=(32,), batch_size=4))[0]) == len(ds) - 2
    assert main([root]) == 2
    out = capsys.readouterr().out
    assert all(v in out for v in victims) and "2 problem(s) found" in out


def test_torchvision_worker_processes_after_dali_ran(tmp_path):
    """Worker processes start (spawned, since DALI threads exist here) and cover every sample once."""
    from tests.conftest import write_dataset

    root = write_dataset(str(tmp_path / "many"), "png", n_per_class=130, size=16, splits=("test",))
    ds = discover(root)["test"]
    list(build_loader(ds, backend="dali-cpu", scales=(16,), batch_size=64))  # DALI threads now exist
    loader = build_loader(ds, backend="torchvision", scales=(16,), batch_size=64, num_workers=2)
    assert loader._loader.num_workers == 2
    for _ in range(2):
        assert sorted(i for b in loader for i in b["index"].tolist()) == list(range(260))
