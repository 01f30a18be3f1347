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
    assert main([root]) == 1
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
    assert rc == 1 and side in out and "label" in out


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
    assert rc == 1 and os.path.join(packed, gone["path"]) in out and "orphan" in out


@pytest.mark.parametrize("edit", [lambda m: m.update(shards=None), lambda m: m["shards"][0].pop("count"),
                                  lambda m: m.update(bands="three"), lambda m: m["shards"].append(7)])
def test_malformed_manifest_one_clear_line(packed, capsys, edit):
    path = os.path.join(packed, "manifest.json")
    m = json.load(open(path))
    edit(m)
    json.dump(m, open(path, "w"))
    rc, out = _check(packed, capsys)
    assert rc == 1 and "Traceback" not in out and f"{path}: malformed manifest" in out
    with pytest.raises(DataError, match="malformed manifest"):
        discover(packed)
