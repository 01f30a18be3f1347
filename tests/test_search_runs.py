"""Issue 24, items 5-6 on real runs: the search metrics in training's and evaluate's metrics.json and logs,
the per-epoch curves (curves.csv, TensorBoard event files read back with TensorBoard's own reader, curves.png)
on both CPU backends, a --resume that does not duplicate epochs, and bad --at-n / --prior values."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from conftest import command_module
from dali_lens.data.synthetic import generate_dataset
from dali_lens.metrics import format_search, search_metrics, to_jsonable
from dali_lens.trainers import TrainConfig, run
from dali_lens.trainers.curves import flatten

QUIET = dict(progress=False, workers=1, gallery=False, batch_size=16, img_size=16)


@pytest.fixture(scope="module")
def lenses(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("search") / "data")
    generate_dataset(root, n=120, size=16, fmt="png", seed=5, source_mag=(20.0, 22.0))
    return root


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _events(out):
    """TensorBoard's own reader over the run's tensorboard/ folder: {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _check_curves(out, history):
    """curves.csv and the event files hold exactly metrics.json's history, one row/step per epoch."""
    flat = [flatten(h) for h in history]
    rows = _csv(os.path.join(out, "curves.csv"))
    assert [int(r["epoch"]) for r in rows] == [h["epoch"] for h in history]
    assert list(rows[0])[:7] == ["epoch", "train_loss", "val_loss", "val_auc", "lr", "train_images_per_s",
                                 "data_wait_fraction"]
    for r, f in zip(rows, flat):
        assert {k: float(v) for k, v in r.items()} == pytest.approx({k: float(v) for k, v in f.items()})
    events = _events(out)
    assert set(events) == set(flat[0]) - {"epoch"}
    for tag, points in events.items():
        assert [s for s, _ in points] == [f["epoch"] for f in flat], tag
        assert [v for _, v in points] == pytest.approx([f[tag] for f in flat], rel=1e-6), tag  # float32 in the file


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_training_reports_search_metrics_and_writes_its_curves(lenses, tmp_path, backend):
    out = str(tmp_path / "run")
    said = []
    result = run(TrainConfig(data_root=lenses, out=out, epochs=2, backend=backend, at_n=(5, 10, 1000), prior=0.01,
                             **QUIET), log=said.append)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    search = metrics["metrics"]["search"]
    # the same numbers as the metrics functions on the predictions the run wrote
    preds = _csv(os.path.join(out, "predictions.csv"))
    y = np.array([int(r["label"]) for r in preds])
    s = np.array([float(r["score"]) for r in preds])
    expected = to_jsonable(search_metrics(y, s, (5, 10, 1000), prior=0.01))
    assert search["n_used"] == {"5": 5, "10": 10, "1000": len(preds)}  # capped at the test split's size
    for key in ("purity_at_n", "completeness_at_n", "completeness_at_purity"):
        assert search[key] == pytest.approx(expected[key], abs=1e-5), key
        assert search["prior"][key] == pytest.approx(expected["prior"][key], abs=1e-5), key
    assert search["prior"]["prior"] == 0.01
    assert format_search(search, "test") in "\n".join(said)  # the log's lines
    assert result["metrics"]["search"]["at_n"] == [5, 10, 1000]
    _check_curves(out, metrics["history"])
    assert all(h["lr"] >= 0 for h in metrics["history"])
    with open(os.path.join(out, "curves.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_appends_epochs_once_and_no_tensorboard_writes_none(lenses, tmp_path):
    out = str(tmp_path / "run")
    run(TrainConfig(data_root=lenses, out=out, epochs=1, backend="torchvision", **QUIET))
    assert [r["epoch"] for r in _csv(os.path.join(out, "curves.csv"))] == ["1"]
    run(TrainConfig(data_root=lenses, out=out, epochs=3, resume=True, backend="torchvision", **QUIET))
    history = json.load(open(os.path.join(out, "metrics.json")))["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    _check_curves(out, history)  # epoch 1 once in the CSV and in TensorBoard, though two event files hold it
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 2

    off = str(tmp_path / "off")
    assert command_module("train").main(["--data-root", lenses, "--out", off, "--epochs", "1", "--no-tensorboard",
                                         "--backend", "torchvision", "--no-progress", "--workers", "1",
                                         "--no-gallery", "--batch-size", "16", "--img-size", "16"]) == 0
    assert not os.path.exists(os.path.join(off, "tensorboard"))
    assert len(_csv(os.path.join(off, "curves.csv"))) == 1 and os.path.exists(os.path.join(off, "curves.png"))
    assert json.load(open(os.path.join(off, "config.json")))["tensorboard"] is False


def test_evaluate_reports_search_metrics(lenses, tmp_path, capsys):
    ck = str(tmp_path / "run")
    run(TrainConfig(data_root=lenses, out=ck, epochs=1, backend="torchvision", **QUIET))
    out = str(tmp_path / "eval")
    assert command_module("evaluate").main(["-c", ck, lenses, "--out", out, "--at-n", "3,7,500", "--prior", "0.02",
                                            "--n-boot", "0", "--no-gallery", "--backend", "torchvision",
                                            "--no-progress"]) == 0
    printed = capsys.readouterr().out
    m = json.load(open(os.path.join(out, "metrics.json")))
    preds = _csv(os.path.join(out, "predictions.csv"))
    y = np.array([int(r["label"]) for r in preds])
    s = np.array([float(r["score"]) for r in preds])
    got, expected = m["ensemble"]["search"], to_jsonable(search_metrics(y, s, (3, 7, 500), prior=0.02))
    assert got["n_used"] == {"3": 3, "7": 7, "500": len(preds)}
    for key in ("purity_at_n", "completeness_at_n", "completeness_at_purity"):
        assert got[key] == pytest.approx(expected[key], abs=1e-5)
        assert got["prior"][key] == pytest.approx(expected["prior"][key], abs=1e-5)
    assert format_search(got, "test") in printed
    table = {ln.split()[0]: ln.split()[1:] for ln in printed.splitlines() if ln.strip()}
    assert table["purity@3"] == [f"{got['purity_at_n']['3']:.3f}"]  # the table's rows too
    assert table["completeness@500"] == [f"{got['completeness_at_n']['500']:.3f}"]


@pytest.mark.parametrize("command,argv", [
    ("train", ["--at-n", "0"]), ("train", ["--at-n", "10,10"]), ("train", ["--at-n", "ten"]),
    ("train", ["--prior", "1"]), ("train", ["--prior", "0"]),
    ("evaluate", ["--at-n", "-5"]), ("evaluate", ["--prior", "1.5"]),
    ("inspect", ["--at-n", "0,1"]), ("inspect", ["--uncertain", "-1"]), ("inspect", ["--disagree", "x"])])
def test_bad_at_n_and_prior_are_one_error_line(tmp_path, capsys, command, argv):
    base = {"train": ["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "out")],
            "evaluate": ["-c", str(tmp_path / "ck.pt"), str(tmp_path / "data"), "--out", str(tmp_path / "ev")],
            "inspect": [str(tmp_path / "p.csv"), str(tmp_path / "data")]}[command]
    with pytest.raises(SystemExit) as exc:
        command_module(command).main(base + argv)
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {argv[0]}"), lines
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "ev")


def test_library_calls_check_at_n_and_prior():
    from dali_lens.choices import OptionRangeError

    with pytest.raises(OptionRangeError, match="--at-n"):
        TrainConfig(at_n=(0,))
    with pytest.raises(OptionRangeError, match="--prior"):
        TrainConfig(prior=0.0)
    assert TrainConfig(at_n="5,50").at_n == (5, 50)


def test_ensemble_histories_get_one_column_and_tag_per_member(tmp_path):
    """An ensemble's per-member losses and AUCs (names with '@' and '#') as columns, tags and plot lines; an
    epoch without a value (no val split) is an empty cell."""
    from dali_lens.trainers.curves import Curves, columns

    history = [{"epoch": e, "train_loss": {"small_cnn@48#0": 0.7 / e, "resnet18@64#2": 0.8 / e}, "lr": 1e-3 / e,
                "train_images_per_s": 100.0 * e, "data_wait_fraction": 0.1, "val_auc": 0.6 + 0.1 * e,
                "val_auc_members": {"small_cnn@48#0": 0.6, "resnet18@64#2": 0.5 + 0.1 * e}, "val_loss": 0.5}
               for e in (1, 2)]
    history.append({"epoch": 3, "train_loss": {"small_cnn@48#0": 0.2, "resnet18@64#2": 0.3}, "lr": 0.0,
                    "train_images_per_s": 300.0, "data_wait_fraction": 0.0, "val_auc_members": None})
    assert columns(history) == ["epoch", "val_loss", "val_auc", "lr", "train_images_per_s", "data_wait_fraction",
                                "train_loss/small_cnn@48#0", "train_loss/resnet18@64#2", "val_auc/small_cnn@48#0",
                                "val_auc/resnet18@64#2"]
    out = str(tmp_path)
    curves = Curves(out, tensorboard=True, enabled=True)
    for k in range(1, 4):
        curves.epoch(history[:k])
    curves.close(history)
    rows = _csv(os.path.join(out, "curves.csv"))
    assert rows[2]["val_auc"] == "" and rows[2]["train_loss/resnet18@64#2"] == "0.3"
    events = _events(out)
    assert events["train_loss/small_cnn@48#0"] == [(1, pytest.approx(0.7)), (2, pytest.approx(0.35)),
                                                   (3, pytest.approx(0.2))]
    assert [s for s, _ in events["val_auc"]] == [1, 2]
    assert os.path.getsize(os.path.join(out, "curves.png")) > 0
    # rank > 0 writes nothing
    other = tmp_path / "rank1"
    other.mkdir()
    quiet = Curves(str(other), tensorboard=True, enabled=False)
    quiet.epoch(history)
    quiet.close(history)
    assert os.listdir(other) == []


def test_evaluate_files_checks_at_n_before_any_work(tmp_path):
    from dali_lens.choices import OptionRangeError
    from dali_lens.evaluation import evaluate_files

    out = tmp_path / "eval"
    for bad in ((0,), "5,5", "x"):
        with pytest.raises(OptionRangeError, match="--at-n"):
            evaluate_files(str(tmp_path / "no.pt"), str(tmp_path / "nodata"), str(out), at_n=bad)
    assert not out.exists()


def test_a_full_disk_under_tensorboard_is_one_error_naming_the_folder(tmp_path, capsys):
    """TensorBoard writes from a thread of its own: a full disk there is the main thread's OSError naming
    tensorboard/ (the command's one `error: cannot write` line), and no traceback from the thread."""
    import subprocess
    import sys

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip("cannot mount a tmpfs here: needs root")
    try:
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)  # every page taken, then one given back: curves.csv
        try:                                             # fits, the event file does not
            while os.write(fd, b"\0" * 4096) == 4096:
                pass
        except OSError:
            pass
        os.close(fd)
        os.truncate(filler, os.path.getsize(filler) // 4096 * 4096 - 4096)
        script = ("import sys\nfrom dali_lens.trainers.curves import Curves\n"
                  "try:\n    Curves(sys.argv[1]).epoch([{'epoch': 1, 'train_loss': {'m': 0.5}, 'lr': 1e-3}])\n"
                  "except OSError as exc:\n    print('raised', exc.errno, exc.filename)\n"
                  "import time; time.sleep(0.5)\n")  # (a fresh process: the writer thread's own hook is Python's)
        proc = subprocess.run([sys.executable, "-c", script, str(mnt)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
        assert proc.stdout.strip() == f"raised 28 {os.path.join(str(mnt), 'tensorboard')}", proc.stderr
        assert (mnt / "curves.csv").exists()
        assert "Traceback" not in proc.stderr, proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_without_the_tensorboard_package_the_run_says_so_and_writes_its_csv(tmp_path):
    """An environment assembled by hand (a GPU node's carried wheels) may lack tensorboard: Curves says so once
    and writes curves.csv and curves.png, no tensorboard/ folder and no traceback."""
    import subprocess
    import sys

    script = ("import sys\n"
              "class Block:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] == 'tensorboard':\n"
              "            raise ModuleNotFoundError(name)\n"
              "sys.meta_path.insert(0, Block())\n"
              "from dali_lens.trainers.curves import Curves\n"
              "c = Curves(sys.argv[1], say=lambda m: print('SAID', m))\n"
              "h = [{'epoch': 1, 'train_loss': {'m': 0.5}, 'lr': 1e-3}, {'epoch': 2, 'train_loss': {'m': 0.4}, 'lr': 1e-3}]\n"
              "c.epoch(h[:1]); c.epoch(h); c.close(h)\n")
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stdout.splitlines() if ln.startswith("SAID")]
    assert len(said) == 1 and "tensorboard package is not installed" in said[0]
    assert [r["epoch"] for r in _csv(out / "curves.csv")] == ["1", "2"]
    assert (out / "curves.png").exists() and not (out / "tensorboard").exists()
    assert "Traceback" not in proc.stderr
