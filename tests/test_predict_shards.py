"""``predict --shard I/N`` (job-array parts without a rendezvous) and ``predict --merge`` of the parts.

Real generated cutouts, loose and packed with ``python -m dali_lens.pack`` into several small tars; one
checkpoint per module; the parts' union is compared with a one-process run of the same data.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import command_module
from test_predict import make_checkpoint, read

from dali_lens.data.synthetic import generate_dataset
from dali_lens.prediction_parts import find_shards, part_positions, shard_path

P = command_module("predict")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 60
SIZE = 32


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    loose = str(root / "loose")
    generate_dataset(loose, n=N, size=SIZE, seed=5)
    packed = str(root / "packed")
    res = subprocess.run([sys.executable, "-m", "dali_lens.pack", loose, packed, "--shard-size", "8kB"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert res.returncode == 0, res.stderr[-2000:]
    with open(os.path.join(packed, "manifest.json")) as fh:
        tars = json.load(fh)["shards"]
    assert len(tars) >= 7, f"want several tars per split, got {len(tars)}"
    ckpt = make_checkpoint(str(root / "ens.pt"), members=(("small_cnn", 32, 0), ("small_cnn", 24, 1)))
    refs = {}
    for name, data in (("loose", loose), ("packed", packed)):
        refs[name] = str(root / f"ref-{name}.csv")
        assert P.main(_args(ckpt, data, refs[name])) == 0
    return {"root": root, "loose": loose, "packed": packed, "ckpt": ckpt, "ref": refs, "tars": tars}


def _args(ckpt, data, out, *extra, backend="dali-cpu"):
    return ["--checkpoint", ckpt, data, "--out", out, "--backend", backend, "--no-progress", "--batch-size", "16",
            "--workers", "1", *extra]


@pytest.mark.parametrize("kind", ["loose", "packed"])
@pytest.mark.parametrize("count,backend", [(1, "dali-cpu"), (3, "dali-cpu"), (7, "dali-cpu"), (3, "torchvision")])
def test_union_of_parts_is_the_one_process_run(env, tmp_path, kind, count, backend, capsys):
    out = str(tmp_path / "scores.csv")
    ref_head, ref_rows = read(env["ref"][kind])
    ref = {r[0]: r for r in ref_rows}
    union: list[list[str]] = []
    for i in range(count):
        assert P.main(_args(env["ckpt"], env[kind], out, "--shard", f"{i}/{count}", backend=backend)) == 0
        part = shard_path(out, i, count)
        head, rows = read(part)
        assert head == ref_head
        union += rows
    if kind == "packed":  # whole tars per part: no tar is read by two parts
        tars = [{r[0].split("#")[0] for r in read(shard_path(out, i, count))[1] if r} for i in range(count)]
        assert sum(len(t) for t in tars) == len({t for ts in tars for t in ts})
    files = [r[0] for r in union]
    assert len(files) == len(set(files)), "a cutout scored in two parts"
    assert set(files) == set(ref), "parts miss cutouts or hold others"
    worst = max(np.abs(np.array(r[3:], float) - np.array(ref[r[0]][3:], float)).max() for r in union)
    assert worst <= (1e-5 if backend == "dali-cpu" else 2e-3), worst  # the reference ran on dali-cpu
    assert [r[:3] for r in sorted(union)] == [r[:3] for r in sorted(ref_rows)]
    capsys.readouterr()
    assert P.main(["--merge", "--out", out]) == 0
    assert f"merged {count} part file(s)" in capsys.readouterr().err
    head, merged = read(out)
    assert head == ref_head and sorted(merged) == sorted(union)
    assert not find_shards(out) and not os.path.exists(shard_path(out, 0, count) + ".meta.json")
    with open(out + ".meta.json") as fh:
        assert json.load(fh)["merged_shards"] == count


def test_parts_are_balanced_and_follow_tar_boundaries(env):
    from dali_lens.data.inputs import gather_inputs

    loose = gather_inputs([env["loose"]])
    for count in (1, 3, 7, 100):
        sizes = [len(part_positions(loose, i, count)) for i in range(count)]
        assert sum(sizes) == len(loose) and max(sizes) - min(sizes) <= 1
    packed = gather_inputs([env["packed"]])
    biggest = max(t["count"] for t in env["tars"])
    for count in (2, 3, 7):
        parts = [part_positions(packed, i, count) for i in range(count)]
        assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(packed)))
        sizes = [len(p) for p in parts]
        assert max(sizes) - min(sizes) <= 2 * biggest, sizes  # balanced in cutouts, to within whole tars
        for p in parts:  # every tar of a part is whole
            tars = {packed.samples[int(k)].path.split("#")[0] for k in p}
            assert sum(t["count"] for t in env["tars"] if os.path.join(env["packed"], t["path"]) in tars) == len(p)


def test_part_resumes_and_merge_refuses_bad_parts(env, tmp_path, capsys):
    data, ckpt = env["loose"], env["ckpt"]
    out = str(tmp_path / "p.csv")
    assert P.main(_args(ckpt, data, out, "--shard", "0/3", "--limit", "5")) == 0
    assert P.main(_args(ckpt, data, out, "--shard", "1/3")) == 0
    capsys.readouterr()
    # part 2 missing, part 0 unfinished: nothing merged, the message names them
    assert P.main(["--merge", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "part(s) 2 of 3 are missing" in err and "--shard 2/3" in err
    assert P.main(_args(ckpt, data, out, "--shard", "2/3")) == 0
    assert P.main(["--merge", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unfinished, 5 of its 20 rows" in err and shard_path(out, 0, 3) in err and not os.path.exists(out)
    # resume part 0: only the missing rows are appended
    with open(shard_path(out, 0, 3), "rb") as fh:
        before = fh.read()
    assert P.main(_args(ckpt, data, out, "--shard", "0/3")) == 0
    assert "5 already scored, 15 to score now" in capsys.readouterr().err
    with open(shard_path(out, 0, 3), "rb") as fh:
        assert fh.read().startswith(before)
    assert len(read(shard_path(out, 0, 3))[1]) == 20
    # a part from other options (TTA): refused by name
    other = str(tmp_path / "q.csv")
    for i in range(2):
        assert P.main(_args(ckpt, data, other, "--shard", f"{i}/2", *(["--tta"] if i else []))) == 0
    capsys.readouterr()
    assert P.main(["--merge", "--out", other]) == 2
    err = capsys.readouterr().err
    assert shard_path(other, 1, 2) in err and "--tta" in err and not os.path.exists(other)
    # parts of two --shard counts side by side: refused
    assert P.main(_args(ckpt, data, out, "--shard", "0/2", "--limit", "1")) == 0
    capsys.readouterr()
    assert P.main(["--merge", "--out", out]) == 2
    assert "several --shard counts (N=2, N=3)" in capsys.readouterr().err
    os.unlink(shard_path(out, 0, 2))
    os.unlink(shard_path(out, 0, 2) + ".meta.json")
    assert P.main(["--merge", "--out", out]) == 0
    assert len(read(out)[1]) == N


def test_overlapping_parts_are_refused(env, tmp_path, capsys):
    """Parts whose DATA changed between tasks overlap: named, nothing merged."""
    out = str(tmp_path / "o.csv")
    for i in range(2):
        assert P.main(_args(env["ckpt"], env["loose"], out, "--shard", f"{i}/2")) == 0
    head, rows = read(shard_path(out, 1, 2))
    with open(shard_path(out, 1, 2), "a", newline="") as fh:
        csv.writer(fh, lineterminator="\n").writerow(read(shard_path(out, 0, 2))[1][0])
    capsys.readouterr()
    assert P.main(["--merge", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "overlapping parts" in err and shard_path(out, 0, 2) in err and not os.path.exists(out)


@pytest.mark.parametrize("bad", ["3/3", "-1/4", "1/0", "x", "2", "1/2/3", "a/b"])
def test_bad_shard_is_one_line(env, tmp_path, capsys, bad):
    out = str(tmp_path / "b.csv")
    with pytest.raises(SystemExit) as exc:
        P.main(_args(env["ckpt"], env["loose"], out, f"--shard={bad}"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --shard") and "I/N with 0 <= I < N" in err[0]
    assert not os.listdir(tmp_path)


def test_library_door_checks_shard(env, tmp_path):
    import dali_lens

    with pytest.raises(ValueError, match="--shard must be I/N"):
        dali_lens.predict(env["ckpt"], env["loose"], str(tmp_path / "x.csv"), shard="4/4")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("top", [None, 5])
def test_parquet_parts_merge(env, tmp_path, capsys, top):
    """Parquet --out: each part is a folder of its own; --merge joins them (the K best of all with --top)."""
    import pyarrow.parquet as pq

    from dali_lens.prediction_table import read_table

    out = str(tmp_path / "scores.parquet")
    extra = ["--top", str(top)] if top else []
    assert P.main(_args(env["ckpt"], env["packed"], out, "--shard", "0/3", "--limit", "3", *extra)) == 0
    for i in (1, 2):
        assert P.main(_args(env["ckpt"], env["packed"], out, "--shard", f"{i}/3", *extra)) == 0
    capsys.readouterr()
    assert P.main(["--merge", "--out", out]) == 2  # part 0 unfinished: nothing merged
    err = capsys.readouterr().err
    assert "unfinished, 3 of its" in err and shard_path(out, 0, 3) in err and not os.path.exists(out)
    assert P.main(_args(env["ckpt"], env["packed"], out, "--shard", "0/3", *extra)) == 0  # resumes
    assert "3 already scored" in capsys.readouterr().err
    for i in range(3):
        assert os.path.isdir(shard_path(out, i, 3))
        assert os.path.basename(shard_path(out, i, 3)) == f"scores.parquet.shard-{i}-of-3.parquet"
    capsys.readouterr()
    assert P.main(["--merge", "--out", out]) == 0
    assert "merged 3 part(s)" in capsys.readouterr().err
    assert not find_shards(out)
    got = read_table(out).to_pandas()
    ref_head, ref_rows = read(env["ref"]["packed"])
    ref = {r[0]: float(r[3]) for r in ref_rows}
    if top:
        best = sorted(ref.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
        assert list(got["file"]) == [f for f, _ in best]
        np.testing.assert_allclose(got["score"], [s for _, s in best], atol=1e-6)
    else:
        assert sorted(got["file"]) == sorted(ref) and got["file"].is_unique
        np.testing.assert_allclose(got.set_index("file").loc[sorted(ref), "score"], [ref[f] for f in sorted(ref)],
                                   atol=1e-6)
    # a plain rerun onto the merged output: complete, nothing to do
    assert P.main(_args(env["ckpt"], env["packed"], out, *extra)) == 0
    assert "is complete" in capsys.readouterr().err
    assert len(read_table(out)) == (top or N)
    assert all(json.loads(pq.read_schema(os.path.join(out, f)).metadata[b"dali_lens"])["provenance"]["merged_shards"]
               == 3 for f in os.listdir(out))


def test_torchrun_ranks_within_a_part(env, tmp_path):
    """--shard under torchrun (2 gloo processes): the part's cutouts split among the ranks, merged into the part
    file with their embeddings; then --merge as usual."""
    out = str(tmp_path / "t.csv")
    envv = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "dali_lens.predict", *_args(env["ckpt"], env["loose"], out, "--shard", "0/2", "--embeddings")]
    res = subprocess.run(cmd, cwd=REPO, env=envv, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr and "--shard 0/2: 30 of the 60 cutouts" in res.stderr
    part = shard_path(out, 0, 2)
    assert not [f for f in os.listdir(tmp_path) if ".part-" in f], "rank parts merged into the part file"
    assert P.main(_args(env["ckpt"], env["loose"], out, "--shard", "1/2", "--embeddings")) == 0
    assert P.main(["--merge", "--out", out]) == 0
    _, rows = read(out)
    ref = {r[0]: r for r in read(env["ref"]["loose"])[1]}
    assert sorted(r[0] for r in rows) == sorted(ref) and len(rows) == N
    with open(out + ".embeddings.ids.jsonl") as fh:
        assert [json.loads(x)[0] for x in fh] == [r[0] for r in rows]
    assert np.load(out + ".embeddings.0.npy").shape == (N, 128) and not os.path.exists(part)


@pytest.mark.parametrize("kind,backend", [("loose", "dali-cpu"), ("packed", "dali-cpu"), ("packed", "torchvision")])
def test_scoring_in_small_chunks_gives_the_one_loader_rows(env, tmp_path, monkeypatch, capsys, kind, backend):
    """predict scores its inputs in chunks of at most SCORE_CHUNK cutouts, a loader each (so memory stays flat at
    survey scale). With chunks of 7 (ends inside tars, a partial last batch in each) the rows, their order and
    their scores are those of the one-loader run; a run stopped by --limit resumes into the same rows, CSV and
    Parquet with --top alike."""
    import dali_lens.predictions as predictions
    from dali_lens.prediction_table import read_table

    from dali_lens.data.inputs import gather_inputs

    monkeypatch.setattr(predictions, "SCORE_CHUNK", 7)
    data = gather_inputs([env[kind]])
    chunks = predictions.score_chunks(data)
    assert chunks[0][0] == 0 and chunks[-1][1] == N and all(b == c for (_, b), (c, _) in zip(chunks, chunks[1:]))
    assert all(0 < b - a <= 7 for a, b in chunks) and len(chunks) >= 9
    if kind == "packed":  # whole tars, unless a tar holds more than 7
        tar_of = [s.path.split("#")[0] for s in data.samples]
        big = {t for t in tar_of if tar_of.count(t) > 7}
        assert all(tar_of[a] != tar_of[a - 1] or tar_of[a] in big for a, _ in chunks[1:])
    ref_head, ref_rows = read(env["ref"][kind])
    tol = 1e-5 if backend == "dali-cpu" else 2e-3  # the reference ran on dali-cpu in one loader
    out = str(tmp_path / "s.csv")
    assert P.main(_args(env["ckpt"], env[kind], out, "--limit", "11", backend=backend)) == 0
    assert P.main(_args(env["ckpt"], env[kind], out, backend=backend)) == 0
    assert "11 already scored, 49 to score now" in capsys.readouterr().err
    head, rows = read(out)
    assert head == ref_head and [r[:3] for r in rows] == [r[:3] for r in ref_rows]
    assert np.abs(np.array([r[3:] for r in rows], float) - np.array([r[3:] for r in ref_rows], float)).max() <= tol
    top = str(tmp_path / "t.parquet")
    assert P.main(_args(env["ckpt"], env[kind], top, "--top", "5", "--limit", "20", backend=backend)) == 0
    assert P.main(_args(env["ckpt"], env[kind], top, "--top", "5", backend=backend)) == 0
    best = sorted(ref_rows, key=lambda r: -float(r[3]))[:5]
    got = read_table(top).to_pydict()
    assert sorted(got["file"]) == sorted(r[0] for r in best)
