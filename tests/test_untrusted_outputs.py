"""Nothing outside a command's own output is touched, and its outputs read back exactly (issue 22, section 2).

Every case on small data the test makes: a generated set (24 cutouts at 32 px), one real 1-epoch training run
for the checkpoint that predict needs, hand-written .npy cutouts with hostile names, real subprocesses for the
two concurrent predicts.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from dali_lens import generate, pack
from dali_lens.commands import predict, train
from dali_lens.data.synthetic import generate_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def _tree(root) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes (what must be left exactly as it was)."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny real training run (24 cutouts, 32 px, 1 epoch) on generated .npy data: its best.pt."""
    root = tmp_path_factory.mktemp("untrusted")
    data = str(root / "data")
    generate_dataset(data, n=24, size=SIZE, fmt="npy", seed=5)
    out = str(root / "run")
    assert train.main(["--data-root", data, "--out", out, "--epochs", "1", "--batch-size", "8", "--img-size",
                       str(SIZE), "--backend", "torchvision", "--workers", "0", "--no-progress"]) == 0
    return {"root": root, "data": data, "ckpt": os.path.join(out, "best.pt")}


def _cutouts(folder, names, seed=0) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        p = os.path.join(folder, name + ".npy")
        np.save(p, rng.normal(0, 1, (3, SIZE, SIZE)).astype(np.float32))
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------------
# pack --overwrite


def test_pack_overwrite_never_follows_manifest_paths_outside_out(tmp_path, capsys):
    data = str(tmp_path / "data")
    generate_dataset(data, n=24, size=SIZE, fmt="npy", seed=1)
    victim, out = str(tmp_path / "V"), str(tmp_path / "OUT")
    for folder in (victim, out):
        assert pack.main([data, folder, "--no-progress", "--no-fsync"]) == 0
    capsys.readouterr()
    before = _tree(victim)
    path = os.path.join(out, "manifest.json")
    m = json.load(open(path))
    m["splits"]["../V/train"] = m["splits"]["train"]  # an edited manifest naming another pack's split
    json.dump(m, open(path, "w"))
    assert pack.main([data, out, "--overwrite", "--no-progress", "--no-fsync"]) == 2
    assert "../V/train" in _error_line(capsys)
    assert _tree(victim) == before  # the other pack is intact

    m = json.load(open(path))
    del m["splits"]["../V/train"]
    m["shards"][0]["path"] = "../V/train/shard-000000.tar"  # a shard file named outside OUT
    json.dump(m, open(path, "w"))
    assert pack.main([data, out, "--overwrite", "--no-progress", "--no-fsync"]) == 2
    assert "shard" in _error_line(capsys)
    assert _tree(victim) == before

    m["shards"][0]["path"] = "train/shard-000000.tar"
    json.dump(m, open(path, "w"))
    os.makedirs(os.path.join(out, "train", "mine"))
    with open(os.path.join(out, "train", "notes.txt"), "w") as fh:
        fh.write("mine")
    assert pack.main([data, out, "--overwrite", "--no-progress", "--no-fsync"]) == 0  # its own record: replaced
    assert open(os.path.join(out, "train", "notes.txt")).read() == "mine"  # what it never wrote stays
    assert _tree(victim) == before

    capsys.readouterr()
    import shutil

    shutil.rmtree(os.path.join(out, "val"))
    os.symlink(os.path.join(victim, "val"), os.path.join(out, "val"))  # a split folder that leads outside OUT
    assert pack.main([data, out, "--overwrite", "--no-progress", "--no-fsync"]) == 2
    assert "'val'" in _error_line(capsys)
    assert _tree(victim) == before


# ---------------------------------------------------------------------------------------------------------
# two predicts onto one --out


def test_two_predicts_onto_one_out_the_second_stops_naming_the_first(run, tmp_path):
    folder = str(tmp_path / "many")
    paths = _cutouts(folder, [f"c{i:05d}" for i in range(1200)])
    out = str(tmp_path / "scores.csv")
    cmd = [sys.executable, "-m", "dali_lens.predict", "--checkpoint", run["ckpt"], folder, "--out", out,
           "--backend", "torchvision", "--tta", "--batch-size", "8", "--threads", "1", "--workers", "1",
           "--no-progress"]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (os.path.exists(out + ".lock") or os.path.exists(out)) and first.poll() is None \
            and time.time() < deadline:  # until the first run holds its lock (or, unlocked, writes its rows)
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    still_running = first.poll() is None
    first_out, first_err = first.communicate(timeout=600)
    assert still_running, "the first run ended before the second started: no overlap tested"
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second.stderr
    lines = [x for x in second.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), second.stderr
    assert f"pid {first.pid}" in lines[0] and "another predict run" in lines[0]
    with open(out, newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert len(rows) == len(paths) and {r[0] for r in rows} == set(paths)  # no duplicate, none missing
    assert not os.path.exists(out + ".lock")  # the run removed its lock


# ---------------------------------------------------------------------------------------------------------
# generate --overwrite


def test_generate_overwrite_removes_only_what_it_wrote(tmp_path, capsys):
    mine = tmp_path / "mine"
    (mine / "train").mkdir(parents=True)
    (mine / "train.csv").write_text("my,own\n1,2\n")
    (mine / "train" / "notes.txt").write_text("mine")
    before = _tree(mine)
    assert generate.main([str(mine), "--n", "8", "--size", "16", "--format", "npy", "--overwrite", "--quiet"]) == 2
    assert str(mine) in _error_line(capsys)
    assert _tree(mine) == before  # a folder it has no record of is refused, untouched

    ours = tmp_path / "ours"
    assert generate.main([str(ours), "--n", "8", "--size", "16", "--format", "npy", "--quiet"]) == 0
    (ours / "train" / "lens" / "mine.txt").write_text("mine")
    (ours / "notes.txt").write_text("mine")
    assert generate.main([str(ours), "--n", "6", "--size", "16", "--format", "npy", "--overwrite", "--quiet"]) == 0
    assert (ours / "train" / "lens" / "mine.txt").read_text() == "mine"
    assert (ours / "notes.txt").read_text() == "mine"
    npys = [f for _, _, fs in os.walk(ours) for f in fs if f.endswith(".npy")]
    assert len(npys) == 6  # the earlier set's files are replaced
    assert json.load(open(ours / "dataset.json"))["n"] == 6
    assert not [f for f in os.listdir(ours) if f.startswith(".")]  # no record of a set being written is left


# ---------------------------------------------------------------------------------------------------------
# train --out


def test_train_never_reuses_a_users_config_and_a_refused_run_leaves_no_trace(run, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}\n')
    before = _tree(out)
    args = ["--data-root", run["data"], "--out", str(out), "--epochs", "1", "--batch-size", "8", "--img-size",
            str(SIZE), "--backend", "torchvision", "--workers", "0", "--no-progress"]
    assert train.main(args) == 2
    assert "config.json" in _error_line(capsys)
    assert _tree(out) == before and sorted(os.listdir(out)) == ["config.json"]  # no run.lock left either

    (out / "config.json").unlink()
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert train.main(args) == 2
    assert "notes.txt" in _error_line(capsys)
    assert sorted(os.listdir(out)) == ["notes.txt"] and _tree(out) == before


def test_a_run_stopped_by_its_data_leaves_no_folder_where_there_was_none(run, tmp_path, capsys):
    """A train that fails once it reads the data (none there; labels that match no cutout) made its --out and
    took the lock: it removes the folders it made (a/b/run: all three), and leaves a folder that was there.
    So does predict, whose lock beside OUT made OUT's folders."""
    base = ["--epochs", "1", "--batch-size", "8", "--img-size", str(SIZE), "--backend", "torchvision",
            "--workers", "0", "--no-progress"]
    nested = tmp_path / "a" / "b" / "run"
    assert train.main(["--data-root", str(tmp_path / "missing"), "--out", str(nested), *base]) == 2
    assert "missing" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == []
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\nnot-a-cutout,1\n")
    assert train.main(["--data-root", run["data"], "--labels", str(labels), "--out", str(nested), *base]) == 2
    assert "labels.csv" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["labels.csv"]
    kept = tmp_path / "kept"
    kept.mkdir()
    assert train.main(["--data-root", str(tmp_path / "missing"), "--out", str(kept), *base]) == 2
    _error_line(capsys)
    assert kept.is_dir() and os.listdir(kept) == []
    # predict the same: its lock beside OUT made OUT's folders (a checkpoint that is not one, inputs not there)
    assert predict.main(["--checkpoint", str(labels), str(tmp_path / "missing"), "--out",
                         str(tmp_path / "p" / "q" / "scores.csv")]) == 2
    assert "labels.csv" in _error_line(capsys)
    assert predict.main(["--checkpoint", run["ckpt"], str(tmp_path / "missing"), "--out",
                         str(tmp_path / "p" / "q" / "scores.parquet"), "--backend", "torchvision"]) == 2
    assert "missing" in _error_line(capsys)
    assert sorted(os.listdir(tmp_path)) == ["kept", "labels.csv"]


# ---------------------------------------------------------------------------------------------------------
# predictions CSV cells


HOSTILE = ["plain", "car\rriage", "new\nline", 'quo"te', "com,ma", "=1+2", "+SUM(A1)", "-3", "@cmd", "'quoted",
           "\tTab", "\rleading-cr", "both\r\nends"]


def test_prediction_cells_read_back_exactly_and_never_run_in_a_spreadsheet(run, tmp_path, capsys):
    from dali_lens.inspection.candidates import read_predictions
    from dali_lens.predictions import merge_only, part_path

    folder = str(tmp_path / "hostile")
    paths = _cutouts(folder, HOSTILE, seed=2)
    out = str(tmp_path / "p.csv")
    args = ["--checkpoint", run["ckpt"], folder, "--out", out, "--backend", "torchvision", "--no-progress"]
    assert predict.main(args) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert len(rows) == 1 + len(HOSTILE)
    cells = {r[1]: r for r in rows[1:]}
    for name in HOSTILE:
        raw = cells["'" + name if name[0] in "=+-@'\t\r" else name]  # a formula is never a formula
        assert raw[0] == os.path.join(folder, name + ".npy")  # an absolute path starts with '/': no quote
    cands = read_predictions(out)
    assert sorted(c.id for c in cands) == sorted(HOSTILE)  # every id round-trips exactly
    assert sorted(c.file for c in cands) == sorted(paths)
    capsys.readouterr()
    assert predict.main(args) == 0  # its own file, read back: complete, nothing added
    assert "complete" in capsys.readouterr().err
    with open(out, newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == rows
    with open(out, "rb") as fh:
        raw = fh.read()
    cut = raw.index(b"new\nline") + 4  # interrupted inside a quoted cell, just after its LF
    with open(out, "wb") as fh:
        fh.write(raw[:cut])
    assert predict.main(args) == 0  # the cut record is removed and scored again; the others are kept
    with open(out, newline="", encoding="utf-8") as fh:
        again = list(csv.reader(fh))
    # the records before the cut one are kept byte for byte; the cut one and the rest are scored again, in
    # another batch (the CPU kernels' rounding depends on the batch: a score may differ in its last digit)
    with open(out, "rb") as fh:
        assert fh.read().startswith(raw[: raw.rindex(b"\n", 0, raw.index(b"new\nline")) + 1])
    assert len(again) == len(rows) and sorted(r[:3] for r in again) == sorted(r[:3] for r in rows)
    ref = {r[0]: float(r[3]) for r in rows[1:]}
    assert max(abs(float(r[3]) - ref[r[0]]) for r in again[1:]) <= 1e-6
    rows = again
    os.replace(out, part_path(out, 0, 1))  # merged from a part file: the same rows
    os.unlink(out + ".meta.json")
    assert merge_only(out) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == rows


# ---------------------------------------------------------------------------------------------------------
# evaluate --overwrite and inspect --overwrite: their own outputs only


def test_evaluate_and_inspect_overwrite_replace_only_their_own_outputs(run, tmp_path, capsys):
    from dali_lens import evaluate, inspect

    run_dir = os.path.dirname(run["ckpt"])
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text('{"mine": 1}')  # a user's file that evaluate would write
    (out / "completeness_mine.png").write_bytes(b"mine")
    before = _tree(out)
    args = ["-c", run_dir, run["data"], "--out", str(out), "--n-boot", "0", "--no-gallery"]
    assert evaluate.main(args + ["--overwrite"]) == 2
    assert "metrics.json" in _error_line(capsys)
    assert _tree(out) == before
    (out / "metrics.json").unlink()
    assert evaluate.main(args + ["--overwrite"]) == 0
    assert evaluate.main(args + ["--overwrite", "--completeness-columns", "einstein_area"]) == 0
    assert (out / "completeness_mine.png").read_bytes() == b"mine"  # never its own: never removed
    capsys.readouterr()

    look = tmp_path / "look"
    look.mkdir()
    (look / "index.html").write_text("<p>mine</p>")
    preds = os.path.join(run_dir, "predictions.csv")
    assert inspect.main([preds, run["data"], "--out", str(look), "--overwrite", "--top", "3"]) == 2
    assert "index.html" in _error_line(capsys)
    assert (look / "index.html").read_text() == "<p>mine</p>" and sorted(os.listdir(look)) == ["index.html"]
    (look / "index.html").unlink()
    assert inspect.main([preds, run["data"], "--out", str(look), "--top", "3"]) == 0
    assert inspect.main([preds, run["data"], "--out", str(look), "--overwrite", "--top", "3"]) == 0


def test_a_control_character_in_a_test_file_name_does_not_stop_the_runs_gallery(tmp_path):
    """A CR in a test cutout's name reached Pillow's text layout in gallery.png ('raqm_layout() failed'): the run
    ended with a traceback after training. It is drawn as '?' and the run writes its gallery."""
    import dali_lens

    rng = np.random.default_rng(3)
    for split, n in (("train", 12), ("test", 6)):
        for cls in ("lens", "nonlens"):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                x = rng.normal(0, 1, (2, 24, 24)).astype(np.float32) + (3.0 if cls == "lens" else 0.0)
                np.save(d / (f"we\rird<!--<script>{i}.npy" if split == "test" and i == 0 else f"o{i}.npy"), x)
    out = tmp_path / "run"
    dali_lens.train(str(tmp_path / "data"), out=str(out), epochs=1, img_size=24, batch_size=8,
                    backend="torchvision", workers=0, progress=False)
    assert (out / "gallery" / "gallery.png").stat().st_size > 0
    rows = list(csv.DictReader(open(out / "predictions.csv", newline="")))
    assert sum("we\rird<!--<script>" in r["file"] for r in rows) == 2
