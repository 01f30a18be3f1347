"""Faults around runs and outputs (issue 18): nothing a user wrote is lost, no silent mix of two runs.

``predict --out`` onto foreign files, another model's output, concurrent and interrupted ``train`` runs,
``--resume`` with other options, a single-class validation split, the exit codes of every command.
Real processes, real data from the generator, real DALI CPU pipelines; no mocks.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

import pytest

from dali_lens.data.synthetic import generate_dataset
from test_predict import make_checkpoint

P = importlib.import_module("dali_lens.predict")  # the module (dali_lens.predict is also a function)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--no-progress", "--backend", "dali-cpu", "--batch-size", "8", "--workers", "1"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = str(root / "data")
    generate_dataset(data, n=24, size=32, seed=7)
    a = make_checkpoint(str(root / "a.pt"), members=(("small_cnn", 32, 0),))
    b = make_checkpoint(str(root / "b.pt"), members=(("small_cnn", 32, 0),), mean=(0.3, 0.3, 0.3))
    return {"root": root, "data": data, "a": a, "b": b}


def _last_err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err.splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------
# predict --out: only its own files are appended to


@pytest.mark.parametrize("content", [b"my notes\nline two\nlast line without newline",
                                     b"a single line",
                                     b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00\x01" * 4,
                                     b"filepath,label\nx.png,1\n"],
                         ids=["notes", "one-line", "png", "other-csv"])
def test_predict_never_touches_a_foreign_out(small, tmp_path, capsys, content):
    out = tmp_path / "precious.txt"
    out.write_bytes(content)
    assert P.main(["-c", small["a"], small["data"], "--out", str(out)] + QUICK) == 2
    err = _last_err(capsys)
    assert str(out) in err and "left untouched" in err
    assert out.read_bytes() == content
    assert not os.path.exists(P.provenance_path(str(out)))


def test_merge_never_touches_a_foreign_out(small, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    note = b"not a predictions file\nlast line cut"
    out.write_bytes(note)
    part = tmp_path / "scores.csv.part-0-of-2.csv"
    part.write_text("file,id,label,score\n/x.png,x,,0.5\n")
    assert P.main(["--merge", "--out", str(out)]) == 2
    assert str(out) in _last_err(capsys)
    assert out.read_bytes() == note and part.exists()


def test_predict_refuses_another_models_output(small, tmp_path, capsys):
    out = str(tmp_path / "scores.csv")
    base = [small["data"], "--out", out] + QUICK
    assert P.main(["-c", small["a"]] + base + ["--limit", "5"]) == 0
    before = open(out, "rb").read()
    # same member names, so the same columns, but other weights: not the same model
    assert P.main(["-c", small["b"]] + base) == 2
    err = _last_err(capsys)
    assert "another model" in err and small["a"] in err and small["b"] in err
    record = json.load(open(P.provenance_path(out)))
    assert record["checkpoints"][0]["path"] == small["a"] and len(record["checkpoints"][0]["sha256"]) == 64
    assert P.main(["-c", small["a"]] + base + ["--tta"]) == 2
    assert "--tta: False then, True now" in _last_err(capsys)
    assert open(out, "rb").read() == before
    # the same model and options resume; a complete file from model a is not "complete" for model b
    assert P.main(["-c", small["a"]] + base) == 0
    assert len(open(out).read().splitlines()) == 25
    assert P.main(["-c", small["b"]] + base) == 2
    assert "another model" in _last_err(capsys)


def test_predict_refuses_rows_without_a_record(small, tmp_path, capsys):
    out = str(tmp_path / "old.csv")
    assert P.main(["-c", small["a"]] + [small["data"], "--out", out] + QUICK + ["--limit", "3"]) == 0
    os.unlink(P.provenance_path(out))
    before = open(out, "rb").read()
    assert P.main(["-c", small["a"]] + [small["data"], "--out", out] + QUICK) == 2
    assert "no record" in _last_err(capsys)
    assert open(out, "rb").read() == before
