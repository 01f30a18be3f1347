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
from dali_lens.predictions import provenance_path
from conftest import command_module
from test_predict import make_checkpoint

P = importlib.import_module("dali_lens.commands.predict")
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
    assert not os.path.exists(provenance_path(str(out)))


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
    record = json.load(open(provenance_path(out)))
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
    os.unlink(provenance_path(out))
    before = open(out, "rb").read()
    assert P.main(["-c", small["a"]] + [small["data"], "--out", out] + QUICK) == 2
    assert "no record" in _last_err(capsys)
    assert open(out, "rb").read() == before


# ---------------------------------------------------------------------------------------------------------
# train: one run per directory, reusable after an early stop, --resume only with the same options


@pytest.fixture(scope="module")
def lenses(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lenses") / "data")
    generate_dataset(root, n=64, size=32, seed=5)
    return root


def _train_args(data, out, *extra):
    return ["--data-root", data, "--out", out, "--img-size", "32", "--batch-size", "16", "--workers", "1",
            "--backend", "dali-cpu", "--no-progress", "--epochs", "1", *extra]


def _cfg(data, out, **kw):
    from dali_lens.trainers import TrainConfig

    base = dict(data_root=data, out=out, img_size=32, batch_size=16, workers=1, backend="dali-cpu", progress=False,
                epochs=1)
    return TrainConfig(**{**base, **kw})


def test_two_concurrent_trainings_on_one_out(lenses, tmp_path):
    """Two real processes start together on the same --out: one trains, the other refuses naming it."""
    out = str(tmp_path / "shared")
    cmd = [sys.executable, "-m", "dali_lens.train"] + _train_args(lenses, out, "--epochs", "2")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.pid,) + p.communicate(timeout=300) + (p.returncode,) for p in procs]
    codes = sorted(r[3] for r in results)
    assert codes == [0, 2], [(r[3], r[2][-500:]) for r in results]
    (winner,) = [r for r in results if r[3] == 0]
    (loser,) = [r for r in results if r[3] == 2]
    assert f"in use by another training run (pid {winner[0]} on " in loser[2] and "Traceback" not in loser[2]
    assert "outputs in" not in loser[1] + loser[2]
    assert json.load(open(os.path.join(out, "metrics.json")))["n"] > 0


def test_run_stopped_before_its_first_checkpoint_is_reusable(lenses, tmp_path, monkeypatch, capsys):
    import dali_lens.trainers.runner as runner
    from dali_lens.trainers import run

    out = str(tmp_path / "early")

    def killed(*a, **k):
        raise KeyboardInterrupt  # stands for kill -9 / a DataError in the first epoch: no checkpoint yet

    with monkeypatch.context() as m:
        m.setattr(runner, "train_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(lenses, out))
    assert "config.json" in os.listdir(out) and not os.path.exists(os.path.join(out, "last.pt"))
    run(_cfg(lenses, out))  # a plain rerun reuses it
    assert "no checkpoint yet" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "best.pt"))
    # --resume on such a directory starts from scratch too
    out2 = str(tmp_path / "early2")
    with monkeypatch.context() as m:
        m.setattr(runner, "train_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg(lenses, out2))
    run(_cfg(lenses, out2, resume=True))
    assert "nothing to resume, so starting from scratch" in capsys.readouterr().out
    # a directory with a user's file is still refused and the file kept
    out3 = tmp_path / "mine"
    out3.mkdir()
    (out3 / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        run(_cfg(lenses, str(out3)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(_cfg(lenses, str(out3), resume=True))
    assert (out3 / "notes.txt").read_text() == "mine"


def test_resume_with_other_options_is_refused_unless_allowed(lenses, tmp_path, capsys):
    from dali_lens.commands.train import main as train_main

    out = str(tmp_path / "run")
    assert train_main(_train_args(lenses, out)) == 0
    config = open(os.path.join(out, "config.json")).read()
    other = str(tmp_path / "copy")
    os.symlink(lenses, other + "-link")
    generate_dataset(other, n=64, size=32, seed=6)
    assert train_main(_train_args(other, out, "--resume", "--lr", "0.01", "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "--lr: 0.002 then, 0.01 now" in err and "--data-root" in err and "--allow-config-change" in err
    assert open(os.path.join(out, "config.json")).read() == config
    # the same data by another path and a longer run: allowed
    assert train_main(_train_args(other + "-link", out, "--resume", "--epochs", "2")) == 0
    assert [h["epoch"] for h in json.load(open(os.path.join(out, "metrics.json")))["history"]] == [1, 2]
    # a deliberate change: allowed with the flag, and recorded
    assert train_main(_train_args(lenses, out, "--resume", "--epochs", "3", "--lr", "0.001",
                                  "--allow-config-change")) == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert saved["lr"] == 0.001 and saved["config_changes"][-1]["changed"]["lr"] == {"from": 0.002, "to": 0.001}


def test_resume_of_a_run_whose_config_holds_the_old_text_form(lenses, tmp_path, capsys):
    """config.json held the list options as text before TrainConfig's fields were typed (``"scales": "16,24"``,
    ``"members": "small_cnn:16:0,..."``). A --resume of such a run with the same options, given to the library
    as values, is no config change; a real change is still found, and listed as the command line writes it.
    Before: config.json held the text, and ``dali_lens.train(members=(MemberSpec(...), ...))`` failed
    ('ensemble member "(MemberSpec(arch=...": expected ARCH:SCALE[:SEED]')."""
    import dali_lens
    from dali_lens.commands.train import main as train_main
    from dali_lens.trainers import MemberSpec

    out = str(tmp_path / "run")
    members = ["--trainer", "ensemble", "--members", "small_cnn:16:0,small_cnn:24:1", "--scales", "16,24"]
    assert train_main(_train_args(lenses, out, *members)) == 0
    path = os.path.join(out, "config.json")
    saved = json.load(open(path))
    assert saved["scales"] == [16, 24] and saved["batch_transforms"] == []  # strict JSON lists
    assert saved["members"][1] == {"arch": "small_cnn", "scales": [24], "seed": 1, "name": "small_cnn@24#1"}
    with open(path, "w") as fh:  # as an older dali-lens wrote it
        json.dump({**saved, "scales": "16,24", "members": "small_cnn:16:0,small_cnn:24:1", "batch_transforms": ""}, fh)
    result = dali_lens.train(lenses, out=out, resume=True, epochs=2, img_size=32, batch_size=16, workers=1,
                             backend="dali-cpu", progress=False, trainer="ensemble", scales=(16, 24),
                             members=(MemberSpec("small_cnn", (16,), 0), MemberSpec("small_cnn", (24,), 1)))
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert json.load(open(path))["scales"] == [16, 24]
    changed = [*members[:3], "small_cnn:16:0,small_cnn:32:1", *members[4:]]
    assert train_main(_train_args(lenses, out, *changed, "--resume", "--epochs", "3")) == 2
    err = _last_err(capsys)
    assert "--members: 'small_cnn:16:0,small_cnn:24:1' then, 'small_cnn:16:0,small_cnn:32:1' now" in err, err
    assert "--scales" not in err


def test_resume_with_layout_defaults_is_not_a_config_change(tmp_path, capsys):
    """--mask-value auto is resolved (100 on the challenge layout) before config.json is written; a plain
    --resume with the same (default) options must compare like with like, not 'auto' with 100."""
    from dali_lens.commands.train import main as train_main

    data = str(tmp_path / "challenge")
    generate_dataset(data, n=40, size=32, layout="challenge", track="space", seed=3)
    out = str(tmp_path / "run")
    args = ["--data-root", data, "--out", out, "--img-size", "32", "--batch-size", "8", "--workers", "1",
            "--no-progress", "--epochs", "1", "--no-gallery"]
    assert train_main(args) == 0
    assert json.load(open(os.path.join(out, "config.json")))["mask_value"] == 100
    assert train_main(args[:-3] + ["--epochs", "2", "--resume", "--no-gallery"]) == 0, capsys.readouterr().err
    assert [h["epoch"] for h in json.load(open(os.path.join(out, "metrics.json")))["history"]] == [1, 2]


def test_mask_value_nan_masks_blank_pixels_and_resumes(tmp_path, capsys):
    """Survey cutouts with NaN at a footprint's edge: without a mask value the run stops naming the file and
    saying what to pass; --mask-value nan trains, writes strict JSON (no NaN literal), --resume with the same
    options continues (a float NaN equalled nothing: 'nan then, nan now'), and predict reads the run."""
    import numpy as np

    from dali_lens.commands.train import main as train_main

    rng = np.random.default_rng(2)
    for split, n in (("train", 23), ("test", 9)):
        for cls, label in (("lens", 1), ("nonlens", 0)):
            os.makedirs(tmp_path / "data" / split / cls)
            for i in range(n):
                x = rng.normal(0, 3e-12, (2, 24, 24)).astype(np.float32) + label * 2e-11 * np.eye(24, dtype=np.float32)
                if i % 4 == 0:
                    x[:, :3, :] = np.nan  # the blank edge
                np.save(tmp_path / "data" / split / cls / f"o{i:03d}.npy", x)
    out = str(tmp_path / "run")
    args = ["--data-root", str(tmp_path / "data"), "--out", out, "--img-size", "24", "--batch-size", "8",
            "--workers", "1", "--no-progress", "--no-gallery", "--backend", "dali-cpu"]
    assert train_main(args + ["--epochs", "1", "--out", str(tmp_path / "nomask")]) == 2
    err = _last_err(capsys)
    assert ".npy: contains" in err and "NaN/inf" in err and "--mask-value nan" in err, err
    assert train_main(args + ["--epochs", "1", "--mask-value", "nan"]) == 0
    text = open(os.path.join(out, "config.json")).read()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"config.json holds {c}"))
    assert json.loads(text)["mask_value"] == "nan"
    assert train_main(args + ["--epochs", "2", "--mask-value", "nan", "--resume"]) == 0, capsys.readouterr().err
    assert [h["epoch"] for h in json.load(open(os.path.join(out, "metrics.json")))["history"]] == [1, 2]
    pred = str(tmp_path / "pred.csv")
    assert P.main(["--checkpoint", os.path.join(out, "best.pt"), str(tmp_path / "data"), "--split", "test",
                   "--out", pred, "--no-progress", "--backend", "dali-cpu"]) == 0
    assert len(open(pred).read().splitlines()) == 1 + 18


def test_single_class_val_split_still_selects_and_writes_best(tmp_path, capsys):
    """A val split of lenses only: AUC is undefined, so best.pt is chosen by the validation loss (warned)."""
    import csv

    from dali_lens.trainers import run

    data = str(tmp_path / "data")
    generate_dataset(data, n=64, size=32, seed=8)
    with open(os.path.join(data, "val.csv"), newline="") as fh:
        rows = list(csv.reader(fh))
    with open(os.path.join(data, "val.csv"), "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [r for r in rows[1:] if r[1] == "1"])
    out = str(tmp_path / "run")
    run(_cfg(data, out, epochs=2))
    assert "chosen by the validation loss" in capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "best.pt"))
    history = json.load(open(os.path.join(out, "metrics.json")))["history"]
    assert all(h["val_loss"] > 0 for h in history)
    assert P.main(["-c", out, data, "--split", "val", "--out", str(tmp_path / "v.csv")] + QUICK) == 0


# ---------------------------------------------------------------------------------------------------------
# exit codes: 0 ok, 2 bad input or options, for every command


def _exit_code(module: str, argv: list[str]) -> int:
    try:
        return command_module(module).main(argv)
    except SystemExit as exc:  # argparse
        return exc.code


@pytest.mark.parametrize("command", ["check", "pack", "generate", "evaluate", "predict", "train", "train-backend"])
def test_every_command_exits_2_on_bad_input(command, small, tmp_path, capsys):
    import torch

    missing = str(tmp_path / "missing")
    afile = tmp_path / "afile"
    afile.write_text("x")
    argv = {
        "check": [missing],
        "pack": [missing, str(tmp_path / "packed")],
        "generate": [str(afile / "sub"), "--n", "4"],
        "evaluate": ["-c", small["a"], missing, "--out", str(tmp_path / "ev")],
        "predict": ["-c", small["a"], missing, "--out", str(tmp_path / "p.csv")],
        "train": ["--data-root", missing, "--out", str(tmp_path / "r")],
        # an option this machine cannot honour: an error line, not a traceback
        "train-backend": ["--data-root", small["data"], "--out", str(tmp_path / "r"), "--epochs", "1",
                          "--no-progress", "--backend", "dali" if not torch.cuda.is_available() else "nope"],
    }[command]
    assert _exit_code(command.split("-")[0], argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "error" in captured.err
    if command in ("check", "pack", "evaluate", "predict", "train"):  # a missing input is named as missing,
        assert f"{missing}: no such file or directory" in captured.err, captured.err  # with no bad-file advice
        assert "--skip-bad" not in captured.err and "fix or remove" not in captured.err, captured.err


def test_check_exits_2_when_it_finds_problems(small, tmp_path, capsys):
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(small["data"], data)
    victim = next(os.path.join(dp, f) for dp, _, fs in os.walk(os.path.join(data, "train")) for f in fs
                  if f.endswith(".png"))
    with open(victim, "r+b") as fh:
        fh.truncate(100)
    assert _exit_code("check", [data]) == 2
    assert victim in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------
# a user script without `if __name__ == "__main__":`: spawned workers must not re-run it


UNGUARDED = """
import sys
import dali_lens
from dali_lens.pipelines import build_loader

train = dali_lens.describe(sys.argv[1])["train"]
assert len(train) >= 256, len(train)  # enough samples for worker processes
first = next(iter(build_loader(train, backend="dali-cpu", batch_size=8, scales=(32,), num_workers=1)))
loader = build_loader(train, backend="torchvision", batch_size=64, scales=(32,), num_workers=2)
print("batches", sum(1 for _ in loader), flush=True)
"""


def test_unguarded_script_with_torchvision_after_dali_does_not_hang(tmp_path):
    data = str(tmp_path / "data")
    generate_dataset(data, n=420, size=32, seed=9)
    script = tmp_path / "user_script.py"
    script.write_text(UNGUARDED)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    try:
        proc = subprocess.run([sys.executable, str(script), data], cwd=str(tmp_path), env=env, capture_output=True,
                              text=True, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the script hung: spawned workers re-ran it")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "batches" in proc.stdout and 'if __name__ == "__main__":' in proc.stderr
    assert time.time() - t0 < 150
