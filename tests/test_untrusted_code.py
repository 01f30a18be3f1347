"""No code from a file ever runs (#22): checkpoints and ``--weights`` files are read as tensors and plain data.

A payload (an object whose ``__reduce__`` creates a marker file when unpickled) is planted (a) inside an
otherwise valid ``best.pt``/``last.pt`` of a real training run, (b) as a bare pickle saved as the checkpoint, and
(c) in a ``--weights``-style state-dict file. predict, evaluate, ``train --resume`` and ``train --weights`` are
given each: the marker is never created, the command exits 2 with one ``error:`` line naming the file, and
prints no traceback. A checkpoint of plain data with entries of the wrong type or shape is one such line too.
The old version-1 run (``tests/data/v1_run``) still loads through the same safe path.
"""
from __future__ import annotations

import io
import lzma
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from conftest import write_dataset
from dali_lens.checkpoint import Checkpoint

TRAIN = ["--epochs", "1", "--img-size", "32", "--batch-size", "8", "--arch", "small_cnn", "--backend", "torchvision",
         "--workers", "0", "--no-progress", "--no-gallery"]


class Payload:
    """Unpickling this creates ``marker``: the stand-in for any code a crafted file would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real small run (24 cutouts of 32 px, 1 epoch, small_cnn) that every case copies."""
    from dali_lens.commands.train import main

    root = tmp_path_factory.mktemp("untrusted")
    data = write_dataset(str(root / "data"), "npy", n_per_class=4, size=32, splits=("train", "val", "test"))
    run = str(root / "run")
    assert main(["--data-root", data, "--out", run, *TRAIN]) == 0
    return data, run


def _plant(kind: str, path: str, marker: str, run: str) -> None:
    """Write the payload of ``kind`` to ``path``."""
    if kind == "in_checkpoint":  # a valid checkpoint, one extra entry hides the payload
        state = torch.load(os.path.join(run, "best.pt"), weights_only=True)
        state["notes"] = Payload(marker)
        torch.save(state, path)
    elif kind == "bare_pickle":
        with open(path, "wb") as fh:
            pickle.dump(Payload(marker), fh)
    else:  # a --weights file: the run's model weights, and the payload next to them
        model = torch.load(os.path.join(run, "best.pt"), weights_only=True)["members"][0]["model"]
        torch.save({"model": model, "options": Payload(marker)}, path)


def _command(cmd: str, data: str, run: str, case) -> tuple[list[str], str]:
    """The command line, and the file the payload goes to."""
    if cmd == "predict":
        return ["--checkpoint", run, "--out", str(case / "scores.csv"), "--split", "test", "--backend",
                "torchvision", "--workers", "0", "--no-progress", data], os.path.join(run, "best.pt")
    if cmd == "evaluate":
        return ["--checkpoint", run, "--out", str(case / "eval"), "--backend", "torchvision", "--workers", "0",
                "--no-gallery", "--no-progress", "--n-boot", "0", data], os.path.join(run, "best.pt")
    if cmd == "resume":
        return (["--data-root", data, "--out", run, "--resume", *TRAIN[:1], "2", *TRAIN[2:]],
                os.path.join(run, "last.pt"))
    weights = str(case / "weights.pt")
    return ["--data-root", data, "--out", str(case / "fresh"), "--weights", weights, *TRAIN], weights


@pytest.mark.parametrize("kind", ["in_checkpoint", "bare_pickle", "weights_file"])
@pytest.mark.parametrize("cmd", ["predict", "evaluate", "resume", "weights"])
def test_planted_payload_never_runs(trained, tmp_path, capfd, cmd, kind):
    from dali_lens import evaluate
    from dali_lens.commands import predict, train

    data, src = trained
    run = str(tmp_path / "run")
    shutil.copytree(src, run)
    marker = str(tmp_path / "PAYLOAD_RAN")
    argv, target = _command(cmd, data, run, tmp_path)
    _plant(kind, target, marker, src)
    if cmd in ("predict", "evaluate"):  # best.pt and last.pt both carry it: whichever is read
        shutil.copy(target, os.path.join(run, "last.pt"))
    elif cmd == "resume":
        shutil.copy(target, os.path.join(run, "best.pt"))
    main = {"predict": predict.main, "evaluate": evaluate.main}.get(cmd, train.main)
    capfd.readouterr()
    rc = main(argv)
    err = capfd.readouterr().err
    assert not os.path.exists(marker), f"the payload ran ({cmd}, {kind})"
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and target in errors[0], err
    assert "Traceback" not in err, err


def _first_weight(s):
    model = s["members"][0]["model"]
    return model, next(iter(model))


DAMAGES = {  # plain data only, so the safe reader takes them; each was a traceback (or a silent resume) before
    "weights_not_a_dict": lambda s: s["members"][0].update(model="x"),
    "weight_not_a_tensor": lambda s: (lambda m, k: m.update({k: 3}))(*_first_weight(s)),
    "weight_of_another_shape": lambda s: (lambda m, k: m.update({k: torch.zeros(1)}))(*_first_weight(s)),
    "bands_not_a_count": lambda s: s.update(bands="x"),
    "unknown_pixel_setting": lambda s: s["pixels"].update(evil=1),
    "bad_scaling": lambda s: s["pixels"].update(scaling=5),
    "config_not_a_dict": lambda s: s.update(config=[1]),
    "config_seed_not_a_number": lambda s: s["config"].update(seed=[1]),
    "config_val_fraction_not_a_number": lambda s: s["config"].update(val_fraction="x"),
    "temperature_not_a_number": lambda s: s["members"][0].update(temperature="hot"),
    "loader_not_a_dict": lambda s: s.update(loader="x"),
    "epoch_not_a_count": lambda s: s.update(epoch="x"),
    "optimizer_of_another_model": lambda s: s["members"][0]["optimizer"].update(param_groups=[]),
    "one_member_too_many": lambda s: s["members"].append(s["members"][0]),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("cmd", ["predict", "resume"])
def test_damaged_checkpoint_is_one_error_line(trained, tmp_path, capfd, cmd, damage):
    """A checkpoint of plain data with entries of the wrong type or shape: one line naming it, exit 2 (predict
    reads best.pt, --resume last.pt; a member too many only matters to --resume, which would drop it)."""
    from dali_lens.commands import predict, train

    data, src = trained
    run = str(tmp_path / "run")
    shutil.copytree(src, run)
    argv, target = _command(cmd, data, run, tmp_path)
    state = torch.load(target, weights_only=True)
    DAMAGES[damage](state)
    torch.save(state, target)
    capfd.readouterr()
    rc = (predict.main if cmd == "predict" else train.main)(argv)
    err = capfd.readouterr().err
    if cmd == "predict" and damage in ("optimizer_of_another_model", "one_member_too_many"):
        assert rc == 0, err  # predict needs no optimizer; two members are an ensemble
        return
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and target in errors[0] and "Traceback" not in err, err


def test_loader_refuses_objects_and_reads_plain_data(tmp_path):
    """The one reader: plain data and tensors come back; a pickled object (here an argparse.Namespace, which
    runs nothing) is refused by name, as is a bare pickle and a file that is no pickle at all."""
    import argparse

    from dali_lens.data.io import load_torch_plain

    plain = {"a": [1, 2.5, "x", None, True], "t": torch.arange(3), "n": (float("-inf"), {"k": 1})}
    torch.save(plain, tmp_path / "plain.pt")
    back = load_torch_plain(tmp_path / "plain.pt")
    assert back["a"] == plain["a"] and back["n"] == plain["n"] and torch.equal(back["t"], plain["t"])
    torch.save({"opts": argparse.Namespace(lr=0.1)}, tmp_path / "ns.pt")
    with pytest.raises(ValueError, match=r"ns\.pt: refused: it holds a Python object \(argparse\.Namespace\)"):
        load_torch_plain(tmp_path / "ns.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint\n" * 4)
    with pytest.raises(ValueError,
                       match=r"junk\.pt: refused: not a PyTorch file of tensors and plain data \(pickle opcode"):
        load_torch_plain(tmp_path / "junk.pt")
    # a payload calling a function of a module torch blocks outright (os.system): refused by name too, and it
    # never ran (torch words this refusal differently; the line showed its advice to load without weights_only)
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"model": Payload()}, tmp_path / "sys.pt")
    with pytest.raises(ValueError, match=r"sys\.pt: refused: it holds a Python object \((posix|nt|os)\.system\)"):
        load_torch_plain(tmp_path / "sys.pt")
    assert not (tmp_path / "PWNED").exists()


def test_writer_stores_plain_data_only(trained, tmp_path):
    """numpy scalars and arrays in what a checkpoint holds are written as Python numbers and tensors, so the safe
    reader takes the file; an object that is no plain data is refused before anything is written."""
    ck = Checkpoint.load(os.path.join(trained[1], "best.pt"))
    ck.history = [{"epoch": np.int64(1), "val_auc": np.float64(0.75), "probs": np.array([0.5, 0.25])}]
    ck.loader = {"backend": "dali-cpu", "epoch": 1, "batches_done": 2, "dali": b"\x00DALI"}  # (DALI's are bytes)
    ck.save(tmp_path / "np.pt")
    assert Checkpoint.load(tmp_path / "np.pt").loader == ck.loader
    back = torch.load(tmp_path / "np.pt", weights_only=True)["history"][0]
    assert type(back["epoch"]) is int and type(back["val_auc"]) is float and back["val_auc"] == 0.75
    assert torch.equal(back["probs"], torch.tensor([0.5, 0.25], dtype=torch.float64))
    ck.history = [{"when": object()}]
    with pytest.raises(TypeError, match=r"checkpoint\['history'\]\[0\]\['when'\]: builtins.object is not plain"):
        ck.save(tmp_path / "obj.pt")
    assert not (tmp_path / "obj.pt").exists()


def test_version_1_run_reads_through_the_safe_path(tmp_path):
    """tests/data/v1_run's checkpoint (dali-lens before #16) holds plain data only: the safe reader takes it
    (test_checkpoint.py checks that it scores and resumes as before, through the same reader)."""
    from dali_lens.data.io import load_torch_plain

    v1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "v1_run", "run", "last.pt.xz")
    with lzma.open(v1) as src:
        (tmp_path / "best.pt").write_bytes(src.read())
    state = load_torch_plain(tmp_path / "best.pt")
    assert "version" not in state and {"config", "norm", "kind"} <= set(state)
    assert Checkpoint.load(tmp_path / "best.pt").version == 1
