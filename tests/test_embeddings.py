"""``predict --embeddings`` (each member's pooled features beside the scores) and ``inspect --similar``.

Real generated cutouts copied into one folder with one cutout duplicated under another name, a checkpoint in
the trainers' format, both CPU backends; no mocks.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import command_module
from test_predict import make_checkpoint, read

from dali_lens.data.synthetic import generate_dataset
from dali_lens.embeddings import NpyRows, ids_path
from dali_lens.inference import load_ensemble
from dali_lens.prediction_parts import shard_path
from dali_lens.scoring import pooled_layer

P = command_module("predict")
I = command_module("inspect")
N = 40
SIZE = 32
DUP = "zz_duplicate"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    gen = str(root / "gen")
    generate_dataset(gen, n=N, size=SIZE, seed=7)
    data = root / "cutouts"
    data.mkdir()
    for split in ("train", "val", "test"):
        for cls in ("lens", "nonlens"):
            folder = os.path.join(gen, split, cls)
            for name in os.listdir(folder) if os.path.isdir(folder) else []:
                shutil.copy(os.path.join(folder, name), data / name)
    first = sorted(os.listdir(data))[0]
    shutil.copy(data / first, data / f"{DUP}.png")
    ckpt = make_checkpoint(str(root / "ens.pt"), members=(("small_cnn", 32, 0), ("small_cnn", 24, 1)))
    runs = {}
    for backend in ("dali-cpu", "torchvision"):
        runs[backend] = str(root / f"emb-{backend}.csv")
        assert P.main(_args(ckpt, str(data), runs[backend], "--embeddings", backend=backend)) == 0
    return {"root": root, "data": str(data), "ckpt": ckpt, "runs": runs, "query": first.rsplit(".", 1)[0]}


def _args(ckpt, data, out, *extra, backend="dali-cpu"):
    return ["--checkpoint", ckpt, data, "--out", out, "--backend", backend, "--no-progress", "--batch-size", "16",
            "--workers", "1", *extra]


def read_ids(out: str) -> list[list[str]]:
    with open(ids_path(out), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def _vectors(out: str) -> list[np.ndarray]:
    with open(out + ".meta.json") as fh:
        layout = json.load(fh)["embeddings"]
    return [np.load(out + e["file"]) for e in layout], layout


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_embeddings_are_the_classifier_inputs(env, backend):
    """Each member's score is sigmoid(its final Linear applied to its embedding): the vectors are what the
    classifier saw (with ids in the CSV's order), on both CPU backends."""
    out = env["runs"][backend]
    head, rows = read(out)
    assert read_ids(out) == [r[:2] for r in rows] and len(rows) == N + 1
    vecs, layout = _vectors(out)
    ens = load_ensemble(env["ckpt"], "cpu")
    assert [e["member"] for e in layout] == ens.names and [e["dim"] for e in layout] == [128, 128]
    for m, v in zip(ens.members, vecs):
        assert v.dtype == np.float32 and v.shape == (N + 1, 128) and np.isfinite(v).all() and v.std() > 0
        fc = pooled_layer(m.model)
        with torch.no_grad():
            p = torch.sigmoid(fc(torch.from_numpy(v)).reshape(-1)).numpy()
        np.testing.assert_allclose(p, [float(r[head.index(f"score_{m.name}")]) for r in rows], atol=2e-6)


def test_backends_agree(env):
    a, _ = _vectors(env["runs"]["dali-cpu"])
    b, _ = _vectors(env["runs"]["torchvision"])
    for x, y in zip(a, b):  # the same vectors up to the backends' resampling differences
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        assert cos.min() > 0.999 and np.abs(x - y).max() < 0.05


def test_tta_embeddings_average_the_views(env, tmp_path):
    out = str(tmp_path / "tta.csv")
    assert P.main(_args(env["ckpt"], env["data"], out, "--embeddings", "--tta", "--limit", "16")) == 0
    head, rows = read(out)
    vecs, _ = _vectors(out)
    ens = load_ensemble(env["ckpt"], "cpu")
    plain = dict(zip([r[0] for r in read(env["runs"]["dali-cpu"])[1]], _vectors(env["runs"]["dali-cpu"])[0][0]))
    assert not np.allclose(vecs[0], [plain[r[0]] for r in rows], atol=1e-4)  # 8 views, not one
    for m, v in zip(ens.members, vecs):  # the mean of the views' logits = the classifier of the mean vector
        with torch.no_grad():
            p = torch.sigmoid(pooled_layer(m.model)(torch.from_numpy(v)).reshape(-1)).numpy()
        np.testing.assert_allclose(p, [float(r[head.index(f"score_{m.name}")]) for r in rows], atol=2e-6)


def test_resume_cuts_an_interrupted_batch_and_appends(env, tmp_path, capsys):
    out = str(tmp_path / "r.csv")
    args = _args(env["ckpt"], env["data"], out, "--embeddings")
    assert P.main(args + ["--limit", "16"]) == 0
    vecs, layout = _vectors(out)
    for e in layout:  # an interrupted batch: its vectors written, its rows not
        rows = NpyRows(out + e["file"], e["dim"])
        rows.append(np.ones((3, e["dim"]), np.float32))
        rows.close()
    with open(ids_path(out), "a") as fh:
        fh.write('["x.png", "x"]\n["y.png", "y"]\n["z.png", "z')  # the last line cut off
    assert np.load(out + layout[0]["file"]).shape == (19, 128)
    capsys.readouterr()
    assert P.main(args) == 0
    assert "removed 2 embedding row(s)" in capsys.readouterr().err
    ref_rows = read(env["runs"]["dali-cpu"])[1]
    ref = dict(zip([r[0] for r in ref_rows], _vectors(env["runs"]["dali-cpu"])[0][1]))
    _, rows = read(out)
    got = _vectors(out)[0][1]
    assert read_ids(out) == [r[:2] for r in rows] and len(got) == len(rows) == N + 1
    np.testing.assert_allclose(got, [ref[r[0]] for r in rows], atol=1e-5)
    # a rerun without --embeddings onto it, or with it onto scores without: refused, one line
    assert P.main(args[:-1]) == 2
    plain = str(tmp_path / "plain.csv")
    assert P.main(_args(env["ckpt"], env["data"], plain, "--limit", "4")) == 0
    capsys.readouterr()
    assert P.main(_args(env["ckpt"], env["data"], plain, "--embeddings")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [e for e in err if e.startswith("error:")] == err[-1:] and "--embeddings: False then, True now" in err[-1]


def test_shard_parts_merge_their_embeddings(env, tmp_path):
    out = str(tmp_path / "s.csv")
    for i in range(3):
        assert P.main(_args(env["ckpt"], env["data"], out, "--embeddings", "--shard", f"{i}/3")) == 0
        assert os.path.isfile(shard_path(out, i, 3) + ".embeddings.1.npy")
    assert P.main(["--merge", "--out", out]) == 0
    assert not [f for f in os.listdir(tmp_path) if ".shard-" in f]
    _, rows = read(out)
    ref_rows = read(env["runs"]["dali-cpu"])[1]
    ref = _vectors(env["runs"]["dali-cpu"])[0]
    got = _vectors(out)[0]
    pos = {r[0]: k for k, r in enumerate(ref_rows)}
    assert read_ids(out) == [r[:2] for r in rows] and sorted(pos) == sorted(r[0] for r in rows)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r[[pos[x[0]] for x in rows]], atol=1e-5)


def test_similar_finds_itself_then_its_duplicate(env, tmp_path, capsys):
    preds = env["runs"]["torchvision"]
    look = str(tmp_path / "look")
    assert I.main([preds, env["data"], "--similar", env["query"], "--top", "5", "--out", look]) == 0
    err = capsys.readouterr().err
    near = err.split("(cosine similarity): ", 1)[1].splitlines()[0].split(", ")
    (first, s1), (second, s2) = near[0].split(), near[1].split()
    assert first == env["query"] and float(s1) == pytest.approx(1.0, abs=1e-3)
    assert second == DUP and float(s2) == pytest.approx(1.0, abs=1e-3)
    assert len(near) == 5 and all(float(x.split()[1]) <= float(s2) + 1e-6 for x in near[2:])
    assert os.path.isfile(os.path.join(look, "gallery.png")) and os.path.isfile(os.path.join(look, "index.html"))
    with open(os.path.join(look, "index.html")) as fh:
        assert f"nearest to {env['query']}" in fh.read()


def test_nearest_is_chunked_brute_force():
    from dali_lens.inspection.similar import nearest

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 16)).astype(np.float32), rng.normal(size=(1000, 5)).astype(np.float32)
    rows, sims = nearest([a, b], 17, 10, chunk=64)
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b)]
    full = np.mean([u @ u[17] for u in unit], axis=0)
    assert rows[0] == 17 and np.array_equal(rows, np.argsort(-full, kind="stable")[:10])
    np.testing.assert_allclose(sims, np.sort(full)[::-1][:10], rtol=1e-5)


def test_similar_bad_inputs_are_one_line(env, tmp_path, capsys):
    preds = env["runs"]["dali-cpu"]
    assert I.main([preds, env["data"], "--similar", "no-such-object", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --similar no-such-object: no such id")
    plain = str(tmp_path / "plain.csv")
    assert P.main(_args(env["ckpt"], env["data"], plain, "--limit", "4")) == 0
    capsys.readouterr()
    assert I.main([plain, env["data"], "--similar", env["query"], "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no embeddings" in err[0] and plain in err[0]


def test_parquet_embedding_columns_and_similar(env, tmp_path, capsys):
    """Parquet --out: one fixed_size_list<float32>[D] column per member, the same vectors as beside the CSV;
    resumable; inspect --similar reads them."""
    import pyarrow as pa

    from dali_lens.prediction_table import read_table

    out = str(tmp_path / "e.parquet")
    args = _args(env["ckpt"], env["data"], out, "--embeddings")
    assert P.main(args + ["--limit", "16"]) == 0
    assert P.main(args) == 0
    t = read_table(out)
    ens = load_ensemble(env["ckpt"], "cpu")
    cols = [f"emb_{n}" for n in ens.names]
    assert all(t.schema.field(c).type == pa.list_(pa.float32(), 128) for c in cols)
    assert t.num_rows == N + 1 and len(set(t.column("file").to_pylist())) == N + 1
    ref_rows = read(env["runs"]["dali-cpu"])[1]
    ref = _vectors(env["runs"]["dali-cpu"])[0]
    pos = {r[0]: k for k, r in enumerate(ref_rows)}
    order = [pos[f] for f in t.column("file").to_pylist()]
    for c, r in zip(cols, ref):
        v = np.asarray(t.column(c).to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(v, r[order], atol=1e-5)
    capsys.readouterr()
    assert I.main([out, env["data"], "--similar", env["query"], "--top", "3", "--out", str(tmp_path / "look")]) == 0
    near = capsys.readouterr().err.split("(cosine similarity): ", 1)[1].splitlines()[0].split(", ")
    assert [x.split()[0] for x in near[:2]] == [env["query"], DUP]


def test_similar_benchmark_quick(tmp_path):
    """`python -m benchmarks.bench_similar --quick` runs and writes its JSON (not a speed test)."""
    import subprocess
    import sys

    out = tmp_path / "similar.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_similar", "--quick", "--out", str(out)], cwd=root,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "similar" and doc["runs"][0]["rows"] == 20000 and doc["machine"]["git_commit"]


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "vit_tiny_patch16_224"])
def test_pooled_features_of_timm_models_are_their_pre_logits(name):
    """scoring.pooled_layer finds any timm model's classifier: the captured vectors are exactly timm's
    forward_head(..., pre_logits=True), and the logits are unchanged by the capture."""
    import timm

    from dali_lens.scoring import member_logits

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1, **({"img_size": 64} if "vit" in name else {}))
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    feats: list = []
    with torch.no_grad():
        z = member_logits(model, {64: x}, (64,), torch.device("cpu"), features=feats)
        ref = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(z, model(x).reshape(-1))
    torch.testing.assert_close(feats[0], ref)
