"""Issue 18, data side: corrupt files refused everywhere, native decoder crashes avoided, packed-set checks,
strict labels, NaN named, duplicates, a split that does not depend on row order, clear messages.

Reproducers of native crashes run in a subprocess, so that a crash fails the test instead of killing pytest.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zlib

import numpy as np
import pytest

from conftest import smooth_images, write_dataset
from dali_lens.data import DataError, discover
from dali_lens.pipelines import build_loader

HERE = os.path.dirname(os.path.abspath(__file__))


def _run_script(code: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


def _jpeg(x: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(x).save(b, "JPEG", quality=95)
    return b.getvalue()


def silently_corrupt_jpeg(path: str) -> None:
    """Overwrite ``path`` with a JPEG whose entropy-coded data is corrupt (40 random middle bytes) but which
    Pillow still decodes without an error: libjpeg only warns ("Corrupt JPEG data: bad Huffman code")."""
    from PIL import Image

    good = open(path, "rb").read()
    rng = np.random.default_rng(1)
    for _ in range(50):
        d = bytearray(good)
        m = (good.rfind(b"\xff\xda") + len(good)) // 2  # the middle of the entropy-coded data
        d[m - 20:m + 20] = rng.integers(0, 256, 40, dtype=np.uint8).tobytes()
        try:
            with Image.open(io.BytesIO(bytes(d))) as im:
                im.load()
        except OSError:
            continue
        open(path, "wb").write(bytes(d))
        return
    raise AssertionError("no silently corrupt variant found")


def corrupt_png_idat(path: str) -> None:
    """Rewrite the IDAT of ``path`` with invalid filter bytes and a valid CRC (libpng: "bad adaptive filter
    value"; torchvision's decoder segfaulted on it)."""
    d = open(path, "rb").read()
    i = d.find(b"IDAT")
    n = int.from_bytes(d[i - 4:i], "big")
    raw = bytearray(zlib.decompress(d[i + 4:i + 4 + n]))
    raw[0] = 9
    comp = zlib.compress(bytes(raw), 9)
    chunk = len(comp).to_bytes(4, "big") + b"IDAT" + comp + zlib.crc32(b"IDAT" + comp).to_bytes(4, "big")
    open(path, "wb").write(d[:i - 4] + chunk + d[i + 8 + n:])


def bad_png_crc(path: str) -> None:
    d = bytearray(open(path, "rb").read())
    i = d.find(b"IDAT")
    n = int.from_bytes(d[i - 4:i], "big")
    d[i + 4 + n] ^= 0xFF  # the IDAT chunk's CRC: Pillow decodes it, libpng refuses it
    open(path, "wb").write(bytes(d))


# --- item 4: a corrupt file is refused by every backend and by pack -------------------------------------------

@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
@pytest.mark.parametrize("how", ["jpeg-data", "png-crc"])
def test_silently_corrupt_image_refused_by_every_backend(tmp_path, backend, how):
    fmt = "jpeg" if how == "jpeg-data" else "png"
    root = write_dataset(str(tmp_path / "d"), fmt, n_per_class=3, size=64, splits=("test",))
    victim = os.path.join(root, "test", "lens", "lens001." + ("jpg" if fmt == "jpeg" else "png"))
    (silently_corrupt_jpeg if how == "jpeg-data" else bad_png_crc)(victim)
    proc = _loader_in_subprocess(root, backend)  # torchvision's libpng segfaulted on some of these
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DataError:" in proc.stdout and victim in proc.stdout


def _loader_in_subprocess(data: str, backend: str) -> subprocess.CompletedProcess:
    """One epoch of the test split in a fresh process; prints the DataError instead of raising it."""
    return _run_script(f"""
from dali_lens.data import DataError, discover
from dali_lens.pipelines import build_loader
ds = discover({data!r})["test"]
try:
    for _ in build_loader(ds, backend={backend!r}, scales=(32,), batch_size=4, num_workers=0):
        pass
except DataError as exc:
    print("DataError:", exc)
""")


def test_check_reports_silently_corrupt_jpeg(tmp_path, capsys):
    from dali_lens.check import main

    root = write_dataset(str(tmp_path / "d"), "jpeg", n_per_class=3, size=64, splits=("test",))
    victim = os.path.join(root, "test", "nonlens", "nonlens002.jpg")
    silently_corrupt_jpeg(victim)
    assert main([root]) == 2
    out = capsys.readouterr().out
    assert victim in out and "corrupt JPEG data" in out


def test_pack_refuses_or_skips_corrupt_images(tmp_path, capsys):
    from dali_lens.pack import main as pack_main

    src = write_dataset(str(tmp_path / "src"), "png", n_per_class=4, size=32)
    bad = [os.path.join(src, "train", "lens", "lens001.png"), os.path.join(src, "test", "nonlens", "nonlens002.png")]
    corrupt_png_idat(bad[0])
    bad_png_crc(bad[1])
    assert pack_main([src, str(tmp_path / "a"), "--no-progress", "--val-fraction", "0"]) == 2
    assert bad[0] in capsys.readouterr().err
    assert pack_main([src, str(tmp_path / "b"), "--skip-bad", "--no-progress", "--val-fraction", "0"]) == 0
    m = json.load(open(tmp_path / "b" / "manifest.json"))
    assert sorted(k["file"] for k in m["skipped"]) == sorted(bad)
    assert m["total_samples"] == 16 - 2


# --- items 12 and 13: native decoder crashes --------------------------------------------------------------------

def test_greyscale_jpeg_through_dali_cpu_does_not_crash(tmp_path):
    """ANY_DATA on a one-band JPEG corrupted DALI's heap (free(): invalid next size, exit 134/139)."""
    root = write_dataset(str(tmp_path / "grey"), "jpeg", n_per_class=4, size=32, bands=1, splits=("test",))
    proc = _run_script(f"""
from dali_lens.data import discover
from dali_lens.pipelines import build_loader
ds = discover({root!r})["test"]
n = 0
for _ in range(2):
    for b in build_loader(ds, backend="dali-cpu", scales=(32,), batch_size=4):
        assert b["image"][32].shape[1] == 1
        n += len(b["index"])
print("samples", n)
""")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "samples 16" in proc.stdout


@pytest.mark.parametrize("where", ["loose", "packed"])
def test_corrupt_png_data_named_not_a_segfault_in_torchvision(tmp_path, where):
    """torchvision's libpng decoder segfaulted on a corrupt IDAT ("bad adaptive filter value", exit 139)."""
    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=4, size=32, splits=("test",))
    victim = os.path.join(root, "test", "lens", "lens002.png")
    data = root
    if where == "packed":  # a shard edited after packing (its checksum no longer matches; loaders do not re-hash)
        from dali_lens.data.shards import split_member_path
        from dali_lens.pack import pack

        data = str(tmp_path / "packed")
        pack(root, data, fsync=False, log=lambda *a: None)
        ds = discover(data)["test"]
        s = next(s for s in ds.samples if s.id == "lens002")
        tar, member = split_member_path(s.path)
        corrupt_png_idat(victim)
        from dali_lens.data.shards import shard_index

        off, size = shard_index(tar)[member.split(".")[0]]["png"]
        new = open(victim, "rb").read()
        assert len(new) <= size
        raw = bytearray(open(tar, "rb").read())
        raw[off:off + size] = new + b"\0" * (size - len(new))  # the member keeps its size (zeros after IEND)
        open(tar, "wb").write(bytes(raw))
        victim = s.path
    else:
        corrupt_png_idat(victim)
    proc = _loader_in_subprocess(data, "torchvision")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DataError:" in proc.stdout and victim in proc.stdout


# --- item 5: check on a packed set ---------------------------------------------------------------------------

@pytest.fixture
def packed(tmp_path):
    from dali_lens.pack import pack

    src = write_dataset(str(tmp_path / "src"), "png", n_per_class=6, size=16)
    out = str(tmp_path / "packed")
    pack(src, out, shard_size="8K", fsync=False, log=lambda *a: None)
    return out


def _check(path, capsys) -> tuple[int, str]:
    from dali_lens.check import main

    rc = main([path])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def test_check_packed_finds_edited_labels(packed, capsys):
    assert _check(packed, capsys)[0] == 0
    m = json.load(open(os.path.join(packed, "manifest.json")))
    side = os.path.join(packed, m["shards"][0]["samples"])
    info = json.load(open(side))
    info["labels"] = [1 - v for v in info["labels"]]  # flipped labels: what the loaders train on
    json.dump(info, open(side, "w"))
    rc, out = _check(packed, capsys)
    assert rc == 2 and side in out and "label" in out


def test_check_packed_finds_a_shard_dropped_from_the_manifest(packed, capsys):
    path = os.path.join(packed, "manifest.json")
    m = json.load(open(path))
    gone = m["shards"].pop(1)
    info = m["splits"][gone["split"]]
    info["samples"] -= gone["count"]
    info["shards"] -= 1
    m["total_samples"] -= gone["count"]
    json.dump(m, open(path, "w"))
    rc, out = _check(packed, capsys)
    assert rc == 2 and os.path.join(packed, gone["path"]) in out and "orphan" in out


@pytest.mark.parametrize("edit", [lambda m: m.update(shards=None), lambda m: m["shards"][0].pop("count"),
                                  lambda m: m.update(bands="three"), lambda m: m["shards"].append(7)])
def test_malformed_manifest_one_clear_line(packed, capsys, edit):
    path = os.path.join(packed, "manifest.json")
    m = json.load(open(path))
    edit(m)
    json.dump(m, open(path, "w"))
    rc, out = _check(packed, capsys)
    assert rc == 2 and "Traceback" not in out and f"{path}: malformed manifest" in out
    with pytest.raises(DataError, match="malformed manifest"):
        discover(packed)


# --- item 6: challenge is_lens is 0 or 1 -------------------------------------------------------------------------

def _challenge(root: str, labels: list[str], planes: dict | None = None, nan: tuple | None = None) -> str:
    """A tiny ground-track challenge layout: 8x8 px, one FITS file per band per object."""
    from astropy.io import fits

    rows = ["ID,is_lens,einstein_area"]
    for oid, lab in enumerate(labels, start=100):
        rows.append(f"{oid},{lab},1.5")
        for b, band in enumerate(("R", "I", "G", "U")):
            d = os.path.join(root, "Public", f"Band{b + 1}")
            os.makedirs(d, exist_ok=True)
            x = np.random.default_rng(oid * 10 + b).random((8, 8)).astype(np.float32)
            if planes and planes.get((oid, b)):
                x = np.stack([x] * planes[(oid, b)])
            if nan == (oid, b):
                x[2, 3] = np.nan
            fits.PrimaryHDU(x).writeto(os.path.join(d, f"imageSDSS_{band}-{oid}.fits"))
    open(os.path.join(root, "classifications.csv"), "w").write("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("bad", ["-1", "2", "yes", "0.5"])
def test_challenge_is_lens_must_be_0_or_1(tmp_path, bad, capsys):
    from dali_lens.check import main

    root = _challenge(str(tmp_path / "c"), ["1", "0", bad, "1", "0"])
    catalogue = os.path.join(root, "classifications.csv")
    with pytest.raises(DataError, match=f"line 4.*{bad!r}.*not 0 or 1") as err:
        discover(root)
    assert catalogue in str(err.value)
    assert main([root]) == 2 and "Traceback" not in capsys.readouterr().err
    ok = discover(_challenge(str(tmp_path / "ok"), ["1", "0", "1.0", "0.0", ""]), val_fraction=0)["train"]
    assert ok.labels == [1, 0, 1, 0, -1]


def test_challenge_band_file_with_two_planes_and_nan_in_band3_named(tmp_path):
    from dali_lens.data.readers import read_sample

    root = _challenge(str(tmp_path / "c"), ["1", "0", "1", "0"], planes={(101, 1): 2}, nan=(102, 2))
    ds = discover(root, val_fraction=0)["train"]
    assert ds.shape == (8, 8) and ds.bands == 4
    with pytest.raises(DataError, match="2 image planes") as err:
        read_sample(ds.samples[1], ds)
    assert ds.samples[1].band_paths[1] in str(err.value)
    with pytest.raises(DataError, match="NaN") as err:
        read_sample(ds.samples[2], ds)
    assert ds.samples[2].band_paths[2] in str(err.value) and "Band1" not in str(err.value)


# --- item 9 and wrong band counts: the file is named by compute_stats --------------------------------------------

@pytest.mark.parametrize("how", ["nan", "rgba", "four-band-npy"])
def test_compute_stats_names_the_bad_file(tmp_path, how):
    from PIL import Image

    from dali_lens.pipelines import LoaderOptions, compute_stats

    fmt = "npy" if how != "rgba" else "png"
    root = write_dataset(str(tmp_path / "d"), fmt, n_per_class=4, size=16, splits=("train",))
    victim = os.path.join(root, "train", "nonlens", f"nonlens002.{fmt}")
    if how == "nan":
        x = np.load(victim)
        x[1, 2, 3] = np.nan
        np.save(victim, x)
    elif how == "four-band-npy":
        np.save(victim, np.zeros((4, 16, 16), np.float32))
    else:
        Image.fromarray(np.zeros((16, 16, 4), np.uint8)).save(victim)
    ds = discover(root, val_fraction=0)["train"]
    with pytest.raises(DataError) as err:
        compute_stats(ds, LoaderOptions(scales=(16,)))
    assert victim in str(err.value)
    if how == "nan":  # masked pixels are expected with a mask value: no error, finite statistics
        mean, std = compute_stats(ds, LoaderOptions(scales=(16,), mask_value=-99.0))
        assert np.isfinite(mean).all() and np.isfinite(std).all()


# --- item 10: duplicates -----------------------------------------------------------------------------------------

def test_check_reports_duplicate_paths_and_content_across_splits(tmp_path, capsys):
    from dali_lens.check import main

    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=4, size=16)
    leaked = os.path.join(root, "test", "lens", "lens000.png")
    shutil.copy(os.path.join(root, "train", "lens", "lens001.png"), leaked)  # a training file in test
    rows = ["filepath,label"] + [f"train/{c}/{c}{i:03d}.png,{int(c == 'lens')}"
                                 for c in ("lens", "nonlens") for i in range(4)]
    rows.append("train/nonlens/nonlens003.png,0")  # the same row twice
    open(os.path.join(root, "train.csv"), "w").write("\n".join(rows) + "\n")
    open(os.path.join(root, "test.csv"), "w").write(
        "filepath,label\n" + "".join(f"test/{c}/{c}{i:03d}.png,{int(c == 'lens')}\n"
                                     for c in ("lens", "nonlens") for i in range(4)))
    assert main([root]) == 2
    out = capsys.readouterr().out
    assert "nonlens003.png: listed 2 times" in out
    assert "identical content across test and train" in out and leaked in out


def test_train_warns_about_duplicates_across_splits(tmp_path):
    from dali_lens.trainers import TrainConfig, run

    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=8, size=16)
    leaked = os.path.join(root, "test", "nonlens", "nonlens000.png")
    shutil.copy(os.path.join(root, "train", "nonlens", "nonlens005.png"), leaked)
    said = []
    run(TrainConfig(data_root=root, out=str(tmp_path / "run"), epochs=1, batch_size=8, img_size=16,
                    progress=False, workers=1, backend="dali-cpu"), log=lambda *a, **k: said.append(" ".join(map(str, a))))
    assert any("warning" in line and leaked in line for line in said)


# --- item 11: the held-out split does not depend on row order ----------------------------------------------------

def test_val_split_same_through_csv_in_any_order_and_folders(tmp_path):
    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=20, size=16, splits=("train",))
    by_folder = discover(root, val_fraction=0.2, seed=3)
    rows = [f"train/{c}/{c}{i:03d}.png,{int(c == 'lens')}" for c in ("lens", "nonlens") for i in range(20)]
    np.random.default_rng(0).shuffle(rows)
    open(os.path.join(root, "train.csv"), "w").write("filepath,label\n" + "\n".join(rows) + "\n")
    by_csv = discover(root, val_fraction=0.2, seed=3)
    assert sorted(s.path for s in by_csv["val"].samples) == sorted(s.path for s in by_folder["val"].samples)
    assert by_csv["val"].counts() == {"lens": 4, "nonlens": 4, "unlabelled": 0}
    other_seed = discover(root, val_fraction=0.2, seed=4)
    assert sorted(s.path for s in other_seed["val"].samples) != sorted(s.path for s in by_csv["val"].samples)


# --- unclear messages ------------------------------------------------------------------------------------------

def test_truncated_first_file_is_reported_not_taken_as_reference(tmp_path, capsys):
    from dali_lens.check import main

    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=4, size=16, splits=("train",))
    first = os.path.join(root, "train", "lens", "lens000.png")
    second = os.path.join(root, "train", "nonlens", "nonlens002.png")
    for v in (first, second):
        data = open(v, "rb").read()
        open(v, "wb").write(data[: len(data) // 2])
    ds = discover(root, val_fraction=0)["train"]
    assert ds.samples[0].path == first and ds.bands == 3 and ds.shape == (16, 16)
    assert main([root]) == 2
    out = capsys.readouterr().out
    assert first in out and second in out and "2 problem(s)" in out
    from dali_lens.data.validate import drop_bad

    assert len(drop_bad(ds, log=lambda *a: None)) == 6


def test_skip_bad_skips_missing_manifest_rows(tmp_path, capsys):
    from dali_lens.check import main

    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=3, size=16, splits=("train",))
    rows = ["filepath,label", "train/lens/gone.png,1"] + [f"train/{c}/{c}{i:03d}.png,{int(c == 'lens')}"
                                                          for c in ("lens", "nonlens") for i in range(3)]
    open(os.path.join(root, "train.csv"), "w").write("\n".join(rows) + "\n")
    gone = os.path.join(root, "train", "lens", "gone.png")
    ds = discover(root, val_fraction=0)["train"]
    from dali_lens.data.validate import drop_bad

    logged = []
    assert len(drop_bad(ds, log=logged.append)) == 6 and any(gone in line for line in logged)
    with pytest.raises(DataError, match="file not found") as err:
        build_loader(ds, backend="dali-cpu", scales=(16,), batch_size=2)
    assert gone in str(err.value)
    assert main([root]) == 2 and gone in capsys.readouterr().out


def test_split_smaller_than_the_number_of_ranks_is_a_clear_error(tmp_path):
    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=1, size=16, splits=("test",))
    ds = discover(root)["test"]
    with pytest.raises(DataError, match="2 sample.*4 processes"):
        build_loader(ds, backend="dali-cpu", scales=(16,), batch_size=1, num_shards=4, shard_id=3)


def test_empty_manifest_and_foreign_tar_files_get_a_hint(tmp_path):
    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=2, size=16, splits=("train",))
    open(os.path.join(root, "train.csv"), "w").close()
    with pytest.raises(DataError, match="empty manifest"):
        discover(root)
    tars = tmp_path / "tars"
    tars.mkdir()
    (tars / "shard-000.tar").write_bytes(b"\0" * 1024)
    with pytest.raises(DataError, match="dali_lens.pack"):
        discover(str(tars))
