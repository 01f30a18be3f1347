"""Packed WebDataset shards: ``python -m dali_lens.pack``, reading them (DALI CPU, torchvision), check, predict.

Real data written by ``conftest.write_dataset``, real packing, the real DALI CPU backend and the webdataset
streaming loader; no mocks.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from conftest import BACKENDS, collect, resume_after, write_dataset
from dali_lens.data import DataError, discover
from dali_lens.data.shards import read_member_bytes, split_member_path
from dali_lens.pack import main as pack_main
from dali_lens.pack import pack
from dali_lens.pipelines import build_loader

SCALES = (24, 40, 56)  # native size 40: a downscale, the identity and an upscale


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """PNG and .npy datasets (train 16 / val 4 / test 20 samples of 40 px) and their packed versions, with
    shard sizes that give several shards per split."""
    root = tmp_path_factory.mktemp("shards")
    out = {}
    for fmt, size in (("png", "24K"), ("npy", "96K")):
        src = write_dataset(str(root / fmt), fmt, n_per_class=10, size=40, bands=3, seed=7)
        packed = str(root / f"{fmt}-packed")
        pack(src, packed, shard_size=size, fsync=False, log=lambda *a: None)
        out[fmt] = (src, packed)
    return out


def by_id(ds, loader):
    idx, lab, imgs = collect(loader)
    ids = [ds.samples[i].id for i in sorted(idx.tolist())]
    return {i: (int(lab[k]), {s: imgs[s][k] for s in imgs}) for k, i in enumerate(ids)}


def source_of(sample) -> str:
    """The original file a packed sample came from (its ``json`` member)."""
    tar, member = split_member_path(sample.path)
    key = member.split(".")[0]
    return json.loads(read_member_bytes(f"{tar}#{key}.json"))["source"]


# --------------------------------------------------------------------------------------------- format

def test_manifest_index_and_members(sets):
    import wds2idx  # DALI's own index tool (needs GNU tar)

    src, packed = sets["png"]
    with open(os.path.join(packed, "manifest.json")) as fh:
        m = json.load(fh)
    assert m["complete"] and m["kind"] == "image" and m["image_ext"] == ["png"] and m["bands"] == 3
    assert m["shape"] == [40, 40] and m["total_samples"] == 40
    assert {s: v["samples"] for s, v in m["splits"].items()} == {"train": 16, "val": 4, "test": 20}
    assert all(v["shards"] >= 2 for v in m["splits"].values() if v["samples"] > 4)
    assert sum(e["count"] for e in m["shards"]) == 40 and all(len(e["sha256"]) == 64 for e in m["shards"])
    entry = next(e for e in m["shards"] if e["split"] == "test")
    tar = os.path.join(packed, entry["path"])
    ref = os.path.join(os.path.dirname(packed), "wds2idx-ref.idx")
    with wds2idx.IndexCreator(tar, ref, verbose=False) as ic:
        ic.create_index()
    assert open(ref).read() == open(os.path.join(packed, entry["index"])).read(), "index differs from wds2idx"
    with tarfile.open(tar) as tf:
        names = tf.getnames()
        first = names[0].split(".")[0]
        assert names[:4] == [f"{first}.{e}" for e in ("png", "cls", "idx", "json")]
        info = json.loads(tf.extractfile(f"{first}.json").read())
        assert tf.extractfile(f"{first}.cls").read() in (b"0", b"1")
        png = tf.extractfile(f"{first}.png").read()
    assert png == open(os.path.join(src, info["source"]), "rb").read(), "images are copied, not re-encoded"
    # the training split is shuffled at packing time (mixed classes in every shard), the others keep order
    train = discover(packed)["train"]
    assert 0 < np.mean(train.labels[:8]) < 1
    test = discover(packed)["test"]
    assert [s.id for s in test.samples] == [s.id for s in discover(src)["test"].samples]


def test_fits_packed_as_float32_npy(tmp_path):
    src = write_dataset(str(tmp_path / "fits"), "fits", n_per_class=3, size=24, bands=4)
    packed = str(tmp_path / "packed")
    m = pack(src, packed, shard_size="64K", fsync=False, log=lambda *a: None)
    assert m["kind"] == "npy" and m["source_kind"] == "fits" and m["bands"] == 4
    loose, ds = discover(src)["test"], discover(packed)["test"]
    kw = dict(scales=(24,), batch_size=4, mean=(100.0,) * 4, std=(300.0,) * 4)
    a, b = by_id(loose, build_loader(loose, backend="dali-cpu", **kw)), by_id(ds, build_loader(ds, backend="dali-cpu", **kw))
    assert a.keys() == b.keys() and len(a) == 6
    assert max(float((a[k][1][24] - b[k][1][24]).abs().max()) for k in a) < 1e-5


# --------------------------------------------------------------------------------------------- reading

@pytest.mark.parametrize("fmt", ["png", "npy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_tensors_match_loose_files(sets, fmt, backend):
    src, packed = sets[fmt]
    loose, ds = discover(src)["test"], discover(packed)["test"]
    assert ds.kind == "shards" and ds.pixel_kind == ("image" if fmt == "png" else "npy") and ds.shape == (40, 40)
    kw = dict(scales=SCALES, batch_size=6, num_workers=0)
    if fmt == "npy":
        kw.update(mean=(100.0,) * 3, std=(300.0,) * 3)
    idx, _, _ = collect(build_loader(ds, backend=backend, **kw))
    assert idx.tolist() == list(range(len(ds))), "eval keeps order"
    a = by_id(loose, build_loader(loose, backend=backend, **kw))
    b = by_id(ds, build_loader(ds, backend=backend, **kw))
    assert a.keys() == b.keys() and len(b) == 20
    for k in a:
        assert a[k][0] == b[k][0], "labels"
        for s in SCALES:
            assert b[k][1][s].shape == (3, s, s) and b[k][1][s].dtype == torch.float32
            diff = (a[k][1][s] - b[k][1][s]).abs()
            assert diff.max() < 0.02 and diff.mean() < 2e-3, (k, s, float(diff.max()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_sample_exactly_once_across_ranks(sets, backend, world):
    ds = discover(sets["png"][1])["test"]  # 20 samples in several shards: not divisible by 3
    seen, train_seen, lengths = [], [], set()
    for rank in range(world):
        ev = build_loader(ds, backend=backend, scales=(40,), batch_size=3, shard_id=rank, num_shards=world,
                          num_workers=0)
        batches = list(ev)
        assert len(batches) == len(ev)
        seen.append([i for b in batches for i in b["index"].tolist()])
        tr = build_loader(ds, backend=backend, scales=(40,), batch_size=3, shard_id=rank, num_shards=world,
                          train=True, seed=5, num_workers=0)
        batches = list(tr)
        lengths.add((len(tr), len(batches)))
        train_seen.append([i for b in batches for i in b["index"].tolist()])
    flat = [i for part in seen for i in part]
    assert sorted(flat) == list(range(20)), "eval shards must cover every sample exactly once"
    if world == 1:
        assert flat == list(range(20))
    tflat = [i for part in train_seen for i in part]
    assert len(tflat) == len(set(tflat)), "training ranks must be disjoint within an epoch"
    assert len(lengths) == 1 and lengths.pop()[0] == (20 // world) // 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_shuffles_and_resumes_mid_epoch(sets, backend):
    ds = discover(sets["png"][1])["train"]  # 16 samples
    opts = dict(scales=(40,), batch_size=4, train=True, seed=2, num_workers=0)
    full = build_loader(ds, backend=backend, **opts)
    assert len(full) == 4
    epochs = [[b["index"].tolist() for b in full] for _ in range(2)]
    for batches in epochs:
        assert len(batches) == 4 and sorted(i for b in batches for i in b) == list(range(16))
    assert epochs[0] != epochs[1], "each epoch is reshuffled"
    first = next(iter(build_loader(ds, backend=backend, **opts)))
    assert 0 < first["label"].float().mean() < 1, "first batch must hold both classes"

    head, state, tail = resume_after(lambda: build_loader(ds, backend=backend, **opts), 2)
    assert state["epoch"] == 1 and state["batches_done"] == 2
    assert head + tail == epochs[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_subset_of_packed_samples(sets, backend):
    """Subsets (resumed predictions, --skip-bad, a val split cut from train) read just their samples."""
    ds = discover(sets["npy"][1])["test"]
    kw = dict(scales=(40,), batch_size=4, num_workers=0, mean=(100.0,) * 3, std=(300.0,) * 3)
    _, _, full = collect(build_loader(ds, backend=backend, **kw))
    pick = [1, 2, 5, 11, 12, 19]
    sub = ds.subset(pick)
    idx, lab, imgs = collect(build_loader(sub, backend=backend, **kw))
    assert idx.tolist() == list(range(len(pick)))
    assert lab.tolist() == [ds.labels[i] for i in pick]
    assert torch.equal(imgs[40], full[40][pick])


def test_torchvision_workers_keep_order_and_resume(sets):
    """Several streaming workers: eval batches still arrive in dataset order; train resume skips ahead."""
    ds = discover(sets["npy"][1])["test"]
    kw = dict(scales=(40,), batch_size=3, num_workers=2, mean=(100.0,) * 3, std=(300.0,) * 3)
    ev = build_loader(ds, backend="torchvision", **kw)
    for _ in range(2):
        batches = list(ev)
        assert [len(b["index"]) for b in batches] == [3] * 6 + [2]
        assert torch.cat([b["index"] for b in batches]).tolist() == list(range(20))
    tr = build_loader(ds, backend="torchvision", train=True, seed=4, **kw)
    epochs = [[b["index"].tolist() for b in tr] for _ in range(2)]
    assert len(epochs[0]) == 6 and len({i for b in epochs[0] for i in b}) == 18
    tr.load_state_dict({"epoch": 1, "batches_done": 4})  # the persistent workers learn the resume point
    assert [b["index"].tolist() for b in tr] == epochs[1][4:]


# --------------------------------------------------------------------------------------------- packing

def _shard_files(packed: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(packed):
        for n in names:
            if n.startswith("shard-"):
                p = os.path.join(dirpath, n)
                out[os.path.relpath(p, packed)] = open(p, "rb").read()
    return out


def test_interrupted_pack_resumes_to_identical_shards(tmp_path):
    src = write_dataset(str(tmp_path / "src"), "png", n_per_class=8, size=40, seed=3)
    ref = str(tmp_path / "ref")
    pack(src, ref, shard_size="16K", fsync=False, log=lambda *a: None)
    ref_files = _shard_files(ref)
    assert sum(n.endswith(".tar") for n in ref_files) >= 6

    out = str(tmp_path / "out")
    # 1. a bad file stops the run with its name; complete shards stay, the set is not usable yet
    victim = os.path.join(src, "test", "nonlens", "nonlens003.png")
    good = open(victim, "rb").read()
    open(victim, "wb").write(good[: len(good) // 2])
    with pytest.raises(DataError, match="nonlens003.png"):
        pack(src, out, shard_size="16K", fsync=False, log=lambda *a: None)
    with pytest.raises(DataError, match="incomplete"):
        discover(out)
    assert any(n.startswith("train/") for n in _shard_files(out))
    # 2. fixed and rerun: continues after the last complete shard, same bytes as an uninterrupted run
    open(victim, "wb").write(good)
    notes = []
    pack(src, out, shard_size="16K", fsync=False, log=notes.append)
    assert any("resuming" in n for n in notes)
    assert _shard_files(out) == ref_files
    # 3. killed while writing a shard: its temporary file is left and its .tar never renamed into place
    with open(os.path.join(out, "manifest.json")) as fh:
        m = json.load(fh)
    m["complete"] = False
    with open(os.path.join(out, "manifest.json"), "w") as fh:
        json.dump(m, fh)
    os.unlink(os.path.join(out, "train", "shard-000001.tar"))
    open(os.path.join(out, "train", ".shard-000001.tar.4242.tmp"), "wb").write(b"partial")
    pack(src, out, shard_size="16K", fsync=False, log=lambda *a: None)
    assert _shard_files(out) == ref_files
    assert not [n for n in os.listdir(os.path.join(out, "train")) if n.endswith(".tmp")]
    with open(os.path.join(out, "manifest.json")) as fh:
        assert json.load(fh)["shards"] == json.load(open(os.path.join(ref, "manifest.json")))["shards"]
    # 4. a different shard size is refused instead of mixing two packs
    assert pack_main([src, out, "--shard-size", "32K", "--no-progress"]) == 2


def test_bad_input_stops_or_is_skipped_and_listed(tmp_path, capsys):
    src = write_dataset(str(tmp_path / "src"), "png", n_per_class=6, size=40)
    bad = [os.path.join(src, "train", "lens", "lens002.png"), os.path.join(src, "test", "nonlens", "nonlens001.png")]
    data = open(bad[0], "rb").read()
    open(bad[0], "wb").write(data[: len(data) // 2])
    open(bad[1], "wb").close()
    assert pack_main([src, str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lens002.png" in err and "--skip-bad" in err
    assert pack_main([src, str(tmp_path / "b"), "--skip-bad", "--shard-size", "16K", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert all(b in err for b in bad)
    with open(tmp_path / "b" / "manifest.json") as fh:
        m = json.load(fh)
    assert sorted(k["file"] for k in m["skipped"]) == sorted(bad)
    assert m["total_samples"] == 24 - 2
    assert sum(len(d) for d in discover(str(tmp_path / "b")).values()) == 22


def test_check_verifies_and_names_a_corrupt_shard(sets, tmp_path, capsys):
    from dali_lens.check import main as check_main

    packed = str(tmp_path / "packed")
    shutil.copytree(sets["png"][1], packed)
    assert check_main([packed]) == 0
    out = capsys.readouterr().out
    assert "no problems found" in out and "test: 20 packed image samples" in out
    with open(os.path.join(packed, "manifest.json")) as fh:
        entry = json.load(fh)["shards"][2]
    victim = os.path.join(packed, entry["path"])
    raw = bytearray(open(victim, "rb").read())
    raw[700] ^= 0xFF  # one byte inside the first member's image data
    open(victim, "wb").write(bytes(raw))
    assert check_main([packed]) == 2
    out = capsys.readouterr().out
    assert victim in out and "checksum mismatch" in out


# --------------------------------------------------------------------------------------------- commands

def _rows(path: str) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))[1:]


def test_predict_on_packed_data(sets, tmp_path):
    import importlib

    from test_predict import make_checkpoint

    P = importlib.import_module("dali_lens.commands.predict")

    src, packed = sets["png"]
    ckpt = make_checkpoint(str(tmp_path / "m.pt"), members=(("small_cnn", 32, 0),))
    loose_csv, csv_a, csv_b = (str(tmp_path / f"{n}.csv") for n in ("loose", "dali", "tv"))
    common = ["--checkpoint", ckpt, "--no-progress", "--batch-size", "8", "--workers", "1"]
    assert P.main(common + [src, "--out", loose_csv, "--backend", "dali-cpu"]) == 0
    assert P.main(common + [packed, "--out", csv_a, "--backend", "dali-cpu", "--limit", "11"]) == 0
    assert len(_rows(csv_a)) == 11
    assert P.main(common + [packed, "--out", csv_a, "--backend", "dali-cpu"]) == 0  # resumes: the other 29
    assert P.main(common + [packed, "--out", csv_b, "--backend", "torchvision"]) == 0
    loose = {os.path.relpath(r[0], src): float(r[3]) for r in _rows(loose_csv)}
    datasets = discover(packed)
    samples = {s.path: s for d in datasets.values() for s in d.samples}
    # DALI reads the very same bytes with the same decoder and resize as for the loose files; torchvision's
    # antialiased resize (40 -> 32 px here) differs from DALI's by a fraction of a grey level
    for path, tol in ((csv_a, 1e-5), (csv_b, 5e-3)):
        rows = _rows(path)
        assert len(rows) == len({r[0] for r in rows}) == 40, "one row per sample"
        for file, ident, label, score in rows:
            assert samples[file].id == ident and label == str(samples[file].label)
            assert abs(float(score) - loose[source_of(samples[file])]) < tol, (path, file)


def test_train_on_packed_data(sets, tmp_path):
    from dali_lens.commands.train import main as train_main

    run = str(tmp_path / "run")
    assert train_main(["--data-root", sets["npy"][1], "--epochs", "1", "--batch-size", "8", "--img-size", "32",
                       "--out", run, "--backend", "dali-cpu", "--workers", "1", "--no-progress"]) == 0
    state = torch.load(os.path.join(run, "best.pt"), weights_only=True)
    assert state["kind"] == "npy" and state["bands"] == 3
    with open(os.path.join(run, "metrics.json")) as fh:
        assert json.load(fh)


def test_evaluate_on_packed_data_keeps_catalogue_columns(tmp_path):
    from test_predict import make_checkpoint

    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.evaluate import main as evaluate_main

    src, packed = str(tmp_path / "data"), str(tmp_path / "packed")
    generate_dataset(src, n=80, size=32, seed=2)
    pack(src, packed, shard_size="16K", fsync=False, log=lambda *a: None)
    ckpt = make_checkpoint(str(tmp_path / "m.pt"), members=(("small_cnn", 32, 0),))
    results = []
    for data in (src, packed):
        out = str(tmp_path / f"eval-{os.path.basename(data)}")
        assert evaluate_main([data, "-c", ckpt, "--out", out, "--backend", "dali-cpu", "--n-boot", "0",
                              "--no-progress", "--workers", "1"]) == 0
        with open(os.path.join(out, "metrics.json")) as fh:
            m = json.load(fh)
        results.append((m, {r[1]: float(r[3]) for r in _rows(os.path.join(out, "predictions.csv"))}))
    (m_loose, s_loose), (m_packed, s_packed) = results
    assert s_loose.keys() == s_packed.keys() and len(s_packed) == m_packed["n"] > 0
    assert max(abs(s_loose[k] - s_packed[k]) for k in s_loose) < 1e-5
    assert m_packed["ensemble"]["roc_auc"] == pytest.approx(m_loose["ensemble"]["roc_auc"])
    assert "einstein_area" in m_packed["completeness"] and m_packed["completeness"].keys() == m_loose["completeness"].keys()


def test_packed_listing_is_the_manifests_samples(tmp_path):
    """A packed set's samples (a compact view, ``PackedSamples``) are exactly those its sample lists describe,
    read here straight from the JSON: paths, labels, ids (non-ASCII too) and catalogue columns, in order; its
    slices, subsets and splits concatenated by a scoring command's input gathering are the same samples."""
    from dali_lens.data.dataset import Sample
    from dali_lens.data.inputs import gather_inputs
    from dali_lens.data.shards import PackedSamples, member_path

    src, packed = str(tmp_path / "data"), str(tmp_path / "packed")
    os.makedirs(os.path.join(src, "img"))
    rows = ["file,label,objid,ra,tile"]
    for i in range(30):
        np.save(os.path.join(src, "img", f"c{i}-\u00e9\u4e2d.npy"), np.full((1, 8, 8), i, np.float32))
        label = "" if i % 7 == 3 else str(i % 2)
        rows.append(f"img/c{i}-\u00e9\u4e2d.npy,{label},{10 ** 17 + i},{150 + i / 8},{'T' + str(i % 3) if i % 5 else ''}")
    with open(os.path.join(src, "test.csv"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows) + "\n")
    with open(os.path.join(src, "train.csv"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(rows[:1] + rows[1:12]) + "\n")
    pack(src, packed, shard_size="8K", fsync=False, val_fraction=0.0, log=lambda *a: None)
    with open(os.path.join(packed, "manifest.json")) as fh:
        m = json.load(fh)
    expected: dict[str, list] = {}
    for entry in m["shards"]:
        with open(os.path.join(packed, entry["samples"]), encoding="utf-8") as fh:
            info = json.load(fh)
        tar = os.path.join(packed, entry["path"])
        for j, key in enumerate(info["keys"]):
            ext = (info.get("exts") or [info["ext"]] * len(info["keys"]))[j]
            meta = (info.get("meta") or [None] * len(info["keys"]))[j] or {}
            expected.setdefault(entry["split"], []).append(
                (member_path(tar, f"{key:0{m['key_width']}d}", ext),
                 None if info["labels"][j] < 0 else info["labels"][j], str(info["ids"][j]), meta))
    assert sum(e["split"] == "test" for e in m["shards"]) >= 3, "want several shards"
    splits = discover(packed, val_fraction=0.0)
    assert set(splits) == set(expected)
    for split, ds in splits.items():
        assert isinstance(ds.samples, PackedSamples)
        got = [(s.path, s.label, s.id, dict(s.meta)) for s in ds.samples]
        assert got == expected[split]
        assert ds.labels == [-1 if e[1] is None else e[1] for e in expected[split]]
        assert ds.samples == [Sample(p, lab, i, meta=mt) for p, lab, i, mt in expected[split]]
    test = splits["test"]
    assert any(s.label is None for s in test.samples) and "\u4e2d" in test.samples[4].id
    assert test.samples[-1].path == expected["test"][-1][0] and test.samples[2:5] == test.samples.take([2, 3, 4])
    sub = test.subset([9, 0, 17])
    assert isinstance(sub.samples, PackedSamples) and [s.id for s in sub.samples] == [
        expected["test"][k][2] for k in (9, 0, 17)]
    assert sub.samples[1].meta.get("ra") == pytest.approx(150.0) and sub.samples[1].meta["objid"] == 10 ** 17
    every = gather_inputs([packed])  # train then test, one compact view
    assert isinstance(every.samples, PackedSamples)
    assert [s.path for s in every.samples] == [e[0] for e in expected["train"] + expected["test"]]
    twice = gather_inputs([packed, packed])  # the same set twice: scored once
    assert [s.path for s in twice.samples] == [s.path for s in every.samples]


def test_a_sample_list_with_bad_labels_is_one_error_naming_it(tmp_path, capsys):
    """A packed set's sample list edited by hand (a label that is not 1, 0 or -1, a key that is not a number):
    the scoring command stops with one `error:` line naming the list."""
    from test_predict import make_checkpoint

    from conftest import command_module

    from dali_lens.data.synthetic import generate_dataset

    predict_main = command_module("predict").main
    src, packed = str(tmp_path / "data"), str(tmp_path / "packed")
    generate_dataset(src, n=20, size=16, seed=4)
    pack(src, packed, fsync=False, val_fraction=0.0, log=lambda *a: None)
    ckpt = make_checkpoint(str(tmp_path / "m.pt"), members=(("small_cnn", 16, 0),))
    with open(os.path.join(packed, "manifest.json")) as fh:
        listed = os.path.join(packed, json.load(fh)["shards"][0]["samples"])
    with open(listed) as fh:
        good = json.load(fh)
    for field, value in (("labels", 7), ("keys", "x")):
        info = json.loads(json.dumps(good))
        info[field][0] = value
        with open(listed, "w") as fh:
            json.dump(info, fh)
        capsys.readouterr()
        assert predict_main(["-c", ckpt, packed, "--out", str(tmp_path / "s.csv"), "--backend", "dali-cpu",
                             "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and listed in err and "malformed sample list" in err, err
        assert not os.path.exists(tmp_path / "s.csv")
