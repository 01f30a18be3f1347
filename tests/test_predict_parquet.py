"""``predict --out X.parquet`` (issue 26, items 1 and 4): Parquet parts with the catalogue columns and the
provenance in the schema metadata, resume, the own-file refusals, ``--top K`` with the score histogram, and
``inspect`` reading the Parquet. Real generated cutouts, a hand-written catalogue manifest, real checkpoints in
the trainers' format, both CPU backends; no mocks.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq
import pytest

from dali_lens._version import __version__
from dali_lens.commands import predict as P
from dali_lens.data.shards import file_sha256
from dali_lens.data.synthetic import generate_dataset
from dali_lens.inspection.candidates import read_predictions
from dali_lens.prediction_table import histogram, merge_top, score_histogram
from test_predict import make_checkpoint

N_TRAIN = 42  # the generator's train split of n=60


def write_catalogue(path: str, data: str, rows: list[dict], start: int = 0) -> str:
    """A manifest of the generated cutouts with survey catalogue columns: ra, dec (floats), tile (text), objid
    (a 61-bit integer that float64 would round) and a column named like ours, ``score``."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["filepath", "label", "ra", "dec", "tile", "objid", "score"])
        for k, r in enumerate(rows, start=start):
            w.writerow([os.path.join(data, r["filepath"]), r["label"], f"{150 + k * 0.001:.6f}",
                        f"{-2.5 + k * 1e-4:.6f}", f"T{k % 4:02d}" if k % 5 else "", 2 ** 60 + k, k % 7])
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("pq")
    data = str(root / "data")
    generate_dataset(data, n=60, size=32, seed=5)
    with open(os.path.join(data, "train.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_TRAIN
    cat = write_catalogue(str(root / "cat.csv"), data, rows)
    half_a = write_catalogue(str(root / "a.csv"), data, rows[:20])
    half_b = write_catalogue(str(root / "b.csv"), data, rows[20:], start=20)
    ckpt = make_checkpoint(str(root / "ens.pt"), temperatures=[0.8, 1.5])
    other = make_checkpoint(str(root / "other.pt"), members=(("small_cnn", 32, 7), ("small_cnn", 24, 8)))
    ref = str(root / "ref.csv")
    assert P.main(args(ckpt, cat, ref, "dali-cpu")) == 0
    return {"root": root, "data": data, "cat": cat, "a": half_a, "b": half_b, "ckpt": ckpt, "other": other,
            "ref": ref, "rows": rows}


def args(ckpt, data, out, backend="dali-cpu", *more):
    return ["--checkpoint", ckpt, data, "--out", out, "--backend", backend, "--no-progress", "--batch-size", "8",
            *more]


def csv_rows(path):
    with open(path, newline="") as fh:
        return {r["file"]: r for r in csv.DictReader(fh)}


def one_error_line(capsys, *names):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: "), err
    assert all(n in err[-1] for n in names), err[-1]
    assert not any("Traceback" in line for line in err)
    return err[-1]


def snapshot(path):
    return {n: os.path.getsize(os.path.join(path, n)) for n in sorted(os.listdir(path))} if os.path.isdir(path) \
        else open(path, "rb").read()


def test_parquet_matches_csv_in_pandas_and_pyarrow(env, tmp_path, capsys):
    out = str(tmp_path / "scores.parquet")
    assert P.main(args(env["ckpt"], env["cat"], out, "dali-cpu")) == 0
    err = capsys.readouterr().err
    assert "catalogue column 'score' is written as 'cat_score'" in err  # renamed and logged
    assert os.path.isdir(out) and all(n.startswith("part-") for n in os.listdir(out))
    ref = csv_rows(env["ref"])
    table = pds.dataset(out, format="parquet").to_table()
    frame = pd.read_parquet(out)
    assert table.num_rows == len(frame) == len(ref) == N_TRAIN
    names = ["small_cnn@32#0", "small_cnn@24#1"]
    s = table.schema
    assert s.names == (["file", "id", "label", "score"] + [f"score_{n}" for n in names]
                       + ["member_std", "ra", "dec", "objid", "cat_score", "tile"])  # first-seen order
    assert s.field("label").type == pa.int64() and s.field("score").type == pa.float64()
    assert s.field("ra").type == pa.float64() and s.field("tile").type == pa.string()
    assert s.field("objid").type == pa.int64() and s.field("cat_score").type == pa.int64()
    by_file = frame.set_index("file")
    assert set(by_file.index) == set(ref) and frame["file"].is_unique
    cat = {os.path.join(env["data"], r["filepath"]): k for k, r in enumerate(env["rows"])}
    tiles = dict(zip(table.column("file").to_pylist(), table.column("tile").to_pylist()))
    for f, r in ref.items():
        row = by_file.loc[f]
        assert row["id"] == r["id"] and int(row["label"]) == int(r["label"])
        for c in ["score", "member_std"] + [f"score_{n}" for n in names]:
            assert abs(float(row[c]) - float(r[c])) <= 1e-6 * max(1.0, abs(float(r[c]))), (f, c)
        k = cat[f]
        assert int(row["objid"]) == 2 ** 60 + k  # exact: not through a float
        assert row["ra"] == pytest.approx(150 + k * 0.001) and int(row["cat_score"]) == k % 7
        assert tiles[f] == (f"T{k % 4:02d}" if k % 5 else None)  # an empty cell is a null
    # pyarrow reads the same rows as pandas
    assert sorted(table.column("file").to_pylist()) == sorted(frame["file"])
    np.testing.assert_array_equal(np.sort(table.column("score").to_numpy()), np.sort(frame["score"].to_numpy()))
    # provenance in the schema metadata, no side file
    meta = json.loads(pq.read_schema(os.path.join(out, sorted(os.listdir(out))[0])).metadata[b"dali_lens"])
    assert meta["written_by"] == "dali_lens.predict" and meta["version"] == __version__
    assert [c["sha256"] for c in meta["provenance"]["checkpoints"]] == [file_sha256(env["ckpt"])]
    assert meta["provenance"]["tta"] is False and meta["provenance"]["fusion"] == "mean_prob"
    assert not os.path.exists(out + ".meta.json")
    np.testing.assert_array_equal(histogram(out), score_histogram(frame["score"]))
    # inspect's reader: the same candidates from the Parquet as from the CSV
    a = {c.file: c for c in read_predictions(out)}
    b = {c.file: c for c in read_predictions(env["ref"])}
    assert set(a) == set(b)
    for f in a:
        assert (a[f].id, a[f].label) == (b[f].id, b[f].label) and a[f].score == pytest.approx(b[f].score, abs=1e-6)
        assert set(a[f].members) == set(b[f].members)


def test_resume_appends_only_missing_rows_torchvision(env, tmp_path, capsys):
    out = str(tmp_path / "s.parquet")
    assert P.main(args(env["ckpt"], env["cat"], out, "torchvision", "--limit", "10")) == 0
    first = snapshot(out)
    assert len(first) == 1 and pd.read_parquet(out).shape[0] == 10
    # what an interrupted write leaves: a temporary file, which readers and predict skip
    junk = os.path.join(out, ".part-00001.parquet.999.0.tmp")
    open(junk, "wb").write(b"PAR1 half a part")
    assert P.main(args(env["ckpt"], env["cat"], out, "torchvision")) == 0
    assert "10 already scored, 32 to score now" in capsys.readouterr().err
    frame = pd.read_parquet(out)
    assert len(frame) == N_TRAIN and frame["file"].is_unique
    after = snapshot(out)
    assert {k: after[k] for k in first} == first  # the first part untouched
    assert P.main(args(env["ckpt"], env["cat"], out, "torchvision")) == 0
    assert "is complete" in capsys.readouterr().err
    ref_tv = str(tmp_path / "tv.csv")  # one uninterrupted run of the same backend into a CSV
    assert P.main(args(env["ckpt"], env["cat"], ref_tv, "torchvision")) == 0
    ref = csv_rows(ref_tv)
    assert set(frame["file"]) == set(ref)
    for f, score in zip(frame["file"], frame["score"]):
        assert abs(score - float(ref[f]["score"])) <= 1e-6


def test_refusals_exit_2_one_line(env, tmp_path, capsys):
    out = str(tmp_path / "s.parquet")
    assert P.main(args(env["ckpt"], env["cat"], out, "torchvision", "--limit", "8")) == 0
    capsys.readouterr()
    before = snapshot(out)
    # another model onto it
    assert P.main(args(env["other"], env["cat"], out, "torchvision")) == 2
    one_error_line(capsys, out, "another model", "checkpoints")
    assert snapshot(out) == before
    # a folder holding someone else's file
    other_dir = tmp_path / "theirs.parquet"
    other_dir.mkdir()
    (other_dir / "notes.txt").write_text("mine")
    assert P.main(args(env["ckpt"], env["cat"], str(other_dir), "torchvision")) == 2
    one_error_line(capsys, str(other_dir), "notes.txt")
    # Parquet parts written by another tool (pandas), named like ours
    foreign = tmp_path / "foreign.parquet"
    foreign.mkdir()
    pd.DataFrame({"file": ["a"], "score": [0.5]}).to_parquet(foreign / "part-00000.parquet")
    assert P.main(args(env["ckpt"], env["cat"], str(foreign), "torchvision")) == 2
    one_error_line(capsys, "part-00000.parquet", "not written by dali_lens.predict")
    # a single Parquet file (not a folder of parts)
    single = tmp_path / "single.parquet"
    pd.DataFrame({"x": [1]}).to_parquet(single)
    data_before = single.read_bytes()
    assert P.main(args(env["ckpt"], env["cat"], str(single), "torchvision")) == 2
    one_error_line(capsys, str(single), "not a folder")
    assert single.read_bytes() == data_before
    # --top: a count, and a Parquet --out
    for bad in ("0", "-3", "x"):
        with pytest.raises(SystemExit) as exc:
            P.main(args(env["ckpt"], env["cat"], str(tmp_path / "t.parquet"), "torchvision", "--top", bad))
        assert exc.value.code == 2
        one_error_line(capsys, "--top")
    assert P.main(args(env["ckpt"], env["cat"], str(tmp_path / "t.csv"), "torchvision", "--top", "3")) == 2
    one_error_line(capsys, "--top 3", "Parquet")
    # a --top output is not a full table, and the other way round
    assert P.main(args(env["ckpt"], env["cat"], out, "torchvision", "--top", "3")) == 2
    one_error_line(capsys, "--top 3")
    assert snapshot(out) == before


def test_top_k_resumed_and_merged(env, tmp_path, capsys):
    full = str(tmp_path / "all.parquet")
    assert P.main(args(env["ckpt"], env["cat"], full, "dali-cpu")) == 0
    every = pd.read_parquet(full).sort_values(["score", "file"], ascending=[False, True])
    k = 7
    top = str(tmp_path / "top.parquet")
    assert P.main(args(env["ckpt"], env["cat"], top, "dali-cpu", "--top", str(k), "--limit", "15")) == 0
    assert pd.read_parquet(top).shape[0] == k
    assert P.main(args(env["ckpt"], env["cat"], top, "dali-cpu", "--top", str(k))) == 0
    assert "15 already scored, 27 to score now" in capsys.readouterr().err
    assert len([n for n in os.listdir(top) if n.startswith("part-")]) == 1  # merged into one part
    got = pd.read_parquet(top)
    assert list(got["file"]) == list(every["file"][:k])  # sorted, best first
    np.testing.assert_allclose(got["score"], every["score"][:k], atol=1e-6)
    assert list(got.columns) == list(every.columns)  # the catalogue columns too
    hist = histogram(top)
    assert hist.sum() == N_TRAIN  # every score, not only the K kept
    np.testing.assert_array_equal(hist, score_histogram(every["score"]))
    assert P.main(args(env["ckpt"], env["cat"], top, "dali-cpu", "--top", str(k))) == 0
    assert "is complete" in capsys.readouterr().err
    # job-array style: two parts of the data, each with its own --top output, merged
    pa_, pb = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    assert P.main(args(env["ckpt"], env["a"], pa_, "dali-cpu", "--top", str(k))) == 0
    assert P.main(args(env["ckpt"], env["b"], pb, "dali-cpu", "--top", str(k))) == 0
    merged = merge_top([pa_, pb])
    assert merged.column("file").to_pylist() == list(every["file"][:k])
    meta = json.loads(merged.schema.metadata[b"dali_lens"])
    assert meta["scored"] == N_TRAIN and meta["top"] == k
    np.testing.assert_array_equal(meta["histogram"], score_histogram(every["score"]))
    # the top output reads in inspect like any predictions
    assert [c.file for c in read_predictions(top)] == list(every["file"][:k])


def test_catalogue_text_columns_and_evaluate_numeric_columns(env):
    from dali_lens.data.inputs import gather_inputs
    from dali_lens.evaluation import numeric_columns

    ds = gather_inputs([env["cat"]])
    s = ds.samples[1]
    assert s.meta["tile"] == "T01" and s.meta["objid"] == 2 ** 60 + 1 and isinstance(s.meta["ra"], float)
    assert "tile" not in ds.samples[0].meta  # an empty cell
    cols = numeric_columns(ds, np.array(ds.labels))
    assert "tile" not in cols and "ra" in cols


def test_two_processes_torchrun_top_merges_rank_parts(env, tmp_path):
    """torchrun --nproc_per_node 2 (gloo) onto a --top output begun by one process: each rank writes its own
    parts (named by rank), rank 0 merges them; with K above N every cutout is there exactly once."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = str(tmp_path / "dist.parquet")
    base = args(env["ckpt"], env["cat"], out, "dali-cpu", "--top", "1000")
    assert P.main(base + ["--limit", "11"]) == 0
    envv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dali_lens.predict"] + base
    res = subprocess.run(cmd, cwd=repo, env=envv, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr and "31 to score now" in res.stderr and "merged 3 part file(s)" in res.stderr
    assert len(os.listdir(out)) == 1
    got = pd.read_parquet(out)
    assert len(got) == N_TRAIN and got["file"].is_unique
    ref = csv_rows(env["ref"])
    assert set(got["file"]) == set(ref)
    for f, score in zip(got["file"], got["score"]):
        assert abs(score - float(ref[f]["score"])) <= 1e-6
    assert list(got["score"]) == sorted(got["score"], reverse=True)
    assert histogram(out).sum() == N_TRAIN


def test_packed_set_keeps_catalogue_columns(env, tmp_path):
    """A packed set keeps the manifest's catalogue columns (text and exact integers too): its Parquet has them."""
    from dali_lens.data.packing import pack

    packed = str(tmp_path / "packed")
    pack(env["cat"], packed, fsync=False, val_fraction=0.0, log=lambda *a, **k: None)
    out = str(tmp_path / "p.parquet")
    assert P.main(args(env["ckpt"], packed, out, "dali-cpu")) == 0
    got = pds.dataset(out, format="parquet").to_table()
    assert got.num_rows == N_TRAIN
    assert got.schema.field("objid").type == pa.int64() and got.schema.field("tile").type == pa.string()
    ids = set(got.column("objid").to_pylist())
    assert ids == {2 ** 60 + k for k in range(N_TRAIN)}
    ref = {r["id"]: float(r["score"]) for r in csv_rows(env["ref"]).values()}
    for i, score in zip(got.column("id").to_pylist(), got.column("score").to_pylist()):
        assert abs(score - ref[i]) <= 1e-6


def test_merge_only_parquet(env, tmp_path, capsys):
    """--merge on a Parquet output: a plain one is left as it is; --top parts left by ranks are merged."""
    import shutil

    out = str(tmp_path / "m.parquet")
    assert P.main(args(env["ckpt"], env["a"], out, "torchvision", "--top", "5")) == 0
    assert P.main(args(env["ckpt"], env["b"], str(tmp_path / "n.parquet"), "torchvision", "--top", "5")) == 0
    other = os.path.join(str(tmp_path / "n.parquet"), os.listdir(str(tmp_path / "n.parquet"))[0])
    shutil.copy(other, os.path.join(out, "part-00007-1of2.parquet"))  # what a second rank leaves
    capsys.readouterr()
    assert P.main(["--merge", "--out", out]) == 0
    assert "merged 2 part file(s)" in capsys.readouterr().err
    got = pd.read_parquet(out)
    assert len(os.listdir(out)) == 1 and len(got) == 5 and list(got["score"]) == sorted(got["score"], reverse=True)
    meta = json.loads(pq.read_schema(os.path.join(out, os.listdir(out)[0])).metadata[b"dali_lens"])
    assert meta["scored"] == N_TRAIN and meta["provenance"]["checkpoints"][0]["sha256"] == file_sha256(env["ckpt"])
    assert P.main(["--merge", "--out", str(tmp_path / "none.parquet")]) == 2
    one_error_line(capsys, "none.parquet")


def test_parts_of_a_fixed_row_count_hold_every_column_of_the_one_part_run(env, tmp_path, monkeypatch):
    """The writer's row buffer (allocated once, filled batch by batch) splits batches across parts: with 10 rows
    per part and batches of 8, the parts hold 10, 10, 10, 10 and 2 rows, and their rows are the one-part run's in
    every column (non-ASCII file names and ids, null labels and catalogue cells, 61-bit integers, the members'
    scores, the embeddings); a --top run that prunes its buffer mid-batch keeps the same K best rows."""
    import shutil

    from dali_lens import prediction_table

    src = [os.path.join(env["data"], r["filepath"]) for r in env["rows"]]
    names = []
    for k, p in enumerate(src):  # every third file renamed: multi-byte UTF-8 of different lengths
        q = str(tmp_path / "cut" / (f"Ω{k}-λé✓{'ü' * (k % 4)}" + os.path.splitext(p)[1])) if k % 3 == 0 else p
        if q != p:
            os.makedirs(os.path.dirname(q), exist_ok=True)
            shutil.copy(p, q)
        names.append(q)
    rows = [dict(r, filepath=q, label=r["label"] if k % 4 else "") for k, (r, q) in enumerate(zip(env["rows"], names))]
    cat = write_catalogue(str(tmp_path / "cat.csv"), env["data"], rows)
    one = str(tmp_path / "one.parquet")
    assert P.main(args(env["ckpt"], cat, one, "dali-cpu", "--embeddings")) == 0
    assert len(os.listdir(one)) == 1
    monkeypatch.setattr(prediction_table, "ROWS_PER_PART", 10)
    split = str(tmp_path / "split.parquet")
    assert P.main(args(env["ckpt"], cat, split, "dali-cpu", "--embeddings")) == 0
    parts = sorted(os.listdir(split))
    assert [pq.ParquetFile(os.path.join(split, n)).metadata.num_rows for n in parts] == [10, 10, 10, 10, 2]
    a = pds.dataset(one, format="parquet").to_table().replace_schema_metadata(None)
    b = pds.dataset(split, format="parquet").to_table().replace_schema_metadata(None)
    assert a.schema.equals(b.schema) and "emb_small_cnn@32#0" in a.schema.names
    assert a.column("file").to_pylist() == b.column("file").to_pylist()  # the same rows in the same order
    for c in a.schema.names:
        if c.startswith(("score", "member_std", "emb_")):  # batches of 8 either way: the same numbers
            assert a.column(c).equals(b.column(c)), c
        else:
            assert a.column(c).to_pylist() == b.column(c).to_pylist(), c
    files = a.column("file").to_pylist()
    assert sum("Ω" in f for f in files) == 14 and set(files) == set(names)
    labels = dict(zip(files, a.column("label").to_pylist()))
    assert all((labels[q] is None) == (k % 4 == 0) for k, q in enumerate(names))
    assert a.column("objid").to_pylist() == [2 ** 60 + names.index(f) for f in files]
    # --top 4 with 10 rows per part: the buffer (10 rows) is pruned inside batches
    top = str(tmp_path / "top.parquet")
    assert P.main(args(env["ckpt"], cat, top, "dali-cpu", "--top", "4")) == 0
    best = a.to_pandas().sort_values(["score", "file"], ascending=[False, True])
    got = pd.read_parquet(top)
    assert list(got["file"]) == list(best["file"][:4])
    assert list(got["objid"]) == list(best["objid"][:4]) and list(got["tile"]) == list(best["tile"][:4])
