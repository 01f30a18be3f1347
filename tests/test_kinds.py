"""Data kinds as objects (``dali_lens/data/kinds/``): nothing outside the kinds compares kind names, and a
sixth kind registered in a test alone is discovered, read, checked, loaded by every CPU backend and packed."""
from __future__ import annotations

import ast
import os
import struct

import numpy as np
import pytest
import torch

from conftest import collect, smooth_images
from dali_lens.data import DataError, discover
from dali_lens.data.kinds import Kind, get_kind, kind_names, register_kind, unregister_kind
from dali_lens.data.readers import read_sample
from dali_lens.pipelines import build_loader, dali_backend, resolve_backend

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dali_lens")
KINDS_DIR = os.path.join(PKG, "data", "kinds")
BUILT_IN = ("image", "npy", "fits", "fits-bands", "shards")


# ============================================================================================ no kind names outside

def _kind_key(node: ast.AST) -> str:
    """The key of ``x["kind"]`` or ``x.get("kind", ...)``, else ''."""
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
        return node.slice.value if isinstance(node.slice.value, str) else ""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return ""


def _is_kind_expr(node: ast.AST) -> bool:
    """``x.kind``, ``kind``, ``x.pixel_kind``, ``member_kind``, ``state["kind"]``, ``cfg.get("kind")``, ...:
    something that holds a kind's name."""
    name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else _kind_key(node)
    return name == "kind" or name.endswith("_kind")


def _kind_literals(node: ast.AST, names) -> list[str]:
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [i.value for i in items if isinstance(i, ast.Constant) and i.value in names]


def kind_comparisons(source: str, names=BUILT_IN) -> list[tuple[int, str]]:
    """(line, kind name) of every comparison of a kind expression with a kind name (``dataset.kind == "npy"``,
    ``kind in ("fits", "fits-bands")``, ``"image" != x.pixel_kind``, ``state["kind"] == "image"``);
    ``arr.dtype.kind == "f"`` is not one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(_is_kind_expr(o) for o in operands):
                found += [(node.lineno, k) for o in operands for k in _kind_literals(o, names)]
    return sorted(found)


def test_no_kind_name_comparisons_outside_the_kinds():
    """Kind-specific behaviour lives in the kind objects: a module outside ``data/kinds/`` asks ``dataset.data_kind``
    (or ``get_kind``) instead of comparing kind names."""
    names = set(BUILT_IN) | set(kind_names())
    found = []
    for dirpath, dirs, files in os.walk(PKG):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if os.path.abspath(dirpath).startswith(KINDS_DIR):
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                with open(path, encoding="utf-8") as fh:
                    found += [f"{os.path.relpath(path, PKG)}:{line}: {k!r}" for line, k in
                              kind_comparisons(fh.read(), names)]
    assert not found, f"kind names compared outside data/kinds/ (ask the kind object instead): {found}"


def test_the_comparison_finder_sees_planted_lines():
    planted = ("if dataset.kind == 'fits':\n    pass\n"
               "ok = ds.pixel_kind in ('image', 'npy')\n"
               "other = 'shards' != d.kind\n"
               "fine = arr.dtype.kind == 'f' and kind == 'mse' and a.kind == b.kind\n"
               # (inference.py before #23, which the finder missed: subscripts and .get of a "kind" key)
               "if (mine['kind'] == 'image') != (theirs['kind'] == 'image'):\n    pass\n"
               "npy = state.get('pixel_kind', 'image') in ('npy',)\n"
               "fine = d['kind'] == d['other'] and d['name'] == 'image'\n")
    assert kind_comparisons(planted) == [(1, "fits"), (3, "image"), (3, "npy"), (4, "shards"), (6, "image"),
                                         (6, "image"), (8, "npy")]


# ============================================================================================ a sixth kind

MAGIC = b"F32\0"


class F32Kind(Kind):
    """Raw little-endian float32 cutouts: ``F32\\0``, then bands, H, W as uint32, then the pixels. DALI has no
    reader for it: the DALI backends read it through ``read`` in a per-sample external source."""

    name = "f32"
    exts = (".f32",)

    def read(self, sample, dataset) -> np.ndarray:
        with open(sample.path, "rb") as fh:
            head = fh.read(16)
            if len(head) < 16 or head[:4] != MAGIC:
                raise DataError(f"{sample.path}: not an .f32 file (bad header)")
            shape = struct.unpack("<3I", head[4:])
            data = np.frombuffer(fh.read(), dtype="<f4")
        if data.size != int(np.prod(shape)):
            raise DataError(f"{sample.path}: truncated .f32 ({data.size} values, the header promises "
                            f"{int(np.prod(shape))})")
        return data.reshape(shape).astype(np.float32)

    def quick_problem(self, dataset, i, path, size):
        with open(path, "rb") as fh:
            head = fh.read(16)
        if len(head) < 16 or head[:4] != MAGIC:
            return f"{path}: not an .f32 file (bad header)"
        need = 16 + 4 * int(np.prod(struct.unpack("<3I", head[4:])))
        return None if size >= need else f"{path}: truncated .f32 ({size} bytes, the header promises {need})"

    def encode(self, array: np.ndarray) -> bytes:
        return MAGIC + struct.pack("<3I", *array.shape) + np.ascontiguousarray(array, dtype="<f4").tobytes()


@pytest.fixture
def f32_kind():
    kind = register_kind(F32Kind())
    yield kind
    unregister_kind(kind.name)


def write_f32(root: str, kind: Kind, n_per_class: int = 6, size: int = 16, bands: int = 2) -> dict[str, np.ndarray]:
    """root/<split>/<lens|nonlens>/<name>.f32; returns {path: array}."""
    written, k = {}, 0
    for split in ("train", "test"):
        for cls in ("lens", "nonlens"):
            folder = os.path.join(root, split, cls)
            os.makedirs(folder)
            for i, x in enumerate(smooth_images(n_per_class, size, bands, seed=k) * 100.0):
                path = os.path.join(folder, f"{cls}{i:03d}.f32")
                with open(path, "wb") as fh:
                    fh.write(kind.encode(x))
                written[path] = x
            k += 1
    return written


def test_a_kind_registered_in_a_test_alone_works_everywhere(tmp_path, f32_kind):
    root = str(tmp_path / "f32")
    written = write_f32(root, f32_kind)
    splits = discover(root, val_fraction=0)
    train, test = splits["train"], splits["test"]
    assert test.kind == "f32" and test.data_kind is f32_kind and (test.bands, test.shape) == (2, (16, 16))
    for s in test.samples:
        np.testing.assert_array_equal(read_sample(s, test), written[s.path])
    assert resolve_backend("auto", test) == ("dali" if torch.cuda.is_available() else "torchvision")

    # both CPU backends, several epochs, training and evaluation, the same pixels
    backends = ["torchvision"] + (["dali-cpu"] if dali_backend.available() else [])
    evaluated = {}
    for backend in backends:
        loader = build_loader(train, backend=backend, scales=(16,), batch_size=4, train=True, seed=3)
        for _ in range(3):
            seen = [b["index"] for b in loader]
            assert len(seen) == len(train) // 4 and len(set(torch.cat(seen).tolist())) == len(train) // 4 * 4
        idx, labels, images = collect(build_loader(test, backend=backend, scales=(16,), batch_size=5))
        assert sorted(idx.tolist()) == list(range(len(test)))
        assert labels.tolist() == test.labels
        evaluated[backend] = images[16]
    want = torch.from_numpy(np.stack([written[s.path] for s in test.samples]))
    for backend, images in evaluated.items():
        torch.testing.assert_close(images, want, rtol=0, atol=1e-4, msg=backend)


def test_a_registered_kind_is_checked_and_packed(tmp_path, f32_kind, capsys):
    from dali_lens.check import main as check_main
    from dali_lens.data.validate import quick_scan, validate
    from dali_lens.pack import pack

    root = str(tmp_path / "f32")
    written = write_f32(root, f32_kind)
    assert check_main([root]) == 0
    out = str(tmp_path / "packed")
    manifest = pack(root, out, shard_size="8K", fsync=False, log=lambda *a: None)
    assert manifest["kind"] == "npy" and manifest["source_kind"] == "f32" and manifest["total_samples"] == 24
    packed = discover(out, val_fraction=0)["test"]
    assert packed.kind == "shards" and packed.pixel_kind == "npy"
    originals = {os.path.splitext(os.path.basename(p))[0]: x for p, x in written.items() if "/test/" in p}
    for s in packed.samples:
        np.testing.assert_array_equal(read_sample(s, packed), originals[s.id])

    bad = next(p for p in written if "/train/lens/" in p)
    with open(bad, "r+b") as fh:
        fh.truncate(100)
    train = discover(root, val_fraction=0)["train"]
    problems = quick_scan(train)
    assert list(problems.values()) == [f"{bad}: truncated .f32 (100 bytes, the header promises 2064)"]
    with pytest.raises(DataError, match="truncated .f32"):
        validate(train)
    capsys.readouterr()
    assert check_main([root]) == 2
    assert f"{bad}: truncated .f32" in capsys.readouterr().out


def test_unsupported_files_are_named_with_every_registered_ending(tmp_path, f32_kind):
    """The message for a file no kind reads lists what the registered kinds read, a new kind's ending too."""
    from dali_lens.data import DataError, Sample
    from dali_lens.data.sources import make_dataset

    odd = tmp_path / "cutout.tif"
    odd.write_bytes(b"II*\0")
    with pytest.raises(DataError) as err:
        make_dataset([Sample(str(odd), 1, "cutout")], str(tmp_path), "train")
    msg = str(err.value)
    assert msg.startswith(f"{odd}: unsupported file type") and ".f32" in msg and ".npy" in msg and ".png" in msg, msg


def test_unknown_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown dataset kind 'hdf5'"):
        get_kind("hdf5")
    with pytest.raises(TypeError):
        register_kind("npy")


def test_a_registered_kind_is_a_packed_member_format(f32_kind):
    """The packed member formats are the registry's: a kind registered with ``member_exts`` is found by a
    member's extension (``data.shards.member_kind`` held a fixed ``(IMAGE, NPY)`` and returned None)."""
    from dali_lens.data.shards import member_kind

    assert member_kind("png") is get_kind("image") and member_kind("npy") is get_kind("npy")
    assert member_kind("f32") is None  # F32Kind has no member_exts: not a member format
    f32_kind.member_exts = ("f32",)
    try:
        assert member_kind("F32") is f32_kind
    finally:
        del f32_kind.member_exts
    assert member_kind("f32") is None
