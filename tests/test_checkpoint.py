"""Checkpoints: a run directory written before checkpoints had a version still predicts and resumes as it did,
a checkpoint from a newer dali-lens is refused by name, and the writer and reader agree.

``tests/data/v1_run`` (see its README.md) is a real run of dali-lens before #16 with what that code made of
it (``expected.json``).
"""
from __future__ import annotations

import csv
import json
import lzma
import os
import shutil

import pytest
import torch

from dali_lens.checkpoint import VERSION, Checkpoint, MemberSpec, MemberState, PixelSettings
from dali_lens.inference import CheckpointError, load_ensemble, loader_options
from dali_lens.predictions import predict_files

V1 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "v1_run")
EXPECTED = json.load(open(os.path.join(V1, "expected.json")))


@pytest.fixture
def old_run(tmp_path, monkeypatch):
    """A copy of the old run directory and its data (its config names the data as ``data``, relative)."""
    shutil.copytree(os.path.join(V1, "data"), tmp_path / "data")
    os.makedirs(tmp_path / "run")
    shutil.copy(os.path.join(V1, "run", "config.json"), tmp_path / "run")
    with lzma.open(os.path.join(V1, "run", "last.pt.xz")) as src:
        raw = src.read()
    for name in ("best.pt", "last.pt"):  # one epoch: the old run's best.pt and last.pt were the same file
        (tmp_path / "run" / name).write_bytes(raw)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fixture_is_a_version_1_checkpoint(old_run):
    state = torch.load(old_run / "run" / "best.pt", weights_only=True)
    assert "version" not in state and "pixels" not in state and {"config", "norm", "kind"} <= set(state)


def test_old_checkpoint_gives_the_same_loader_options(old_run):
    ens = load_ensemble("run", "cpu")
    opts = loader_options(ens)
    for key, value in EXPECTED["loader"].items():
        got = getattr(opts, key)
        assert (list(got) if isinstance(got, tuple) else got) == value, key
    assert (ens.bands, ens.pixels.kind, ens.pixels.hdus, ens.names) == (EXPECTED["bands"], EXPECTED["kind"],
                                                                        EXPECTED["hdus"], EXPECTED["names"])


@pytest.mark.parametrize("tta", [False, True])
def test_old_checkpoint_predicts_the_same_scores(old_run, tta):
    out = str(old_run / "scores.csv")
    assert predict_files(["run"], ["data"], out, split="test", backend="torchvision", tta=tta, workers=1,
                         progress=False) == 0
    with open(out, newline="") as fh:
        got = {r["id"]: float(r["score"]) for r in csv.DictReader(fh)}
    want = EXPECTED["scores_tta" if tta else "scores"]
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) < 2e-6, (got, want)


def test_old_run_resumes_and_is_rewritten_in_the_current_version(old_run):
    from dali_lens.trainers import TrainConfig, run

    result = run(TrainConfig(data_root="data", out="run", epochs=2, img_size=16, batch_size=16, mask_value=-1,
                             mask_channel=True, backend="torchvision", workers=1, progress=False, gallery=False,
                             resume=True), log=lambda *a, **k: None)
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    ck = Checkpoint.load(old_run / "run" / "last.pt")
    assert ck.version == VERSION and ck.epoch == 2
    assert ck.pixels.noise_sigma == pytest.approx(EXPECTED["loader"]["noise_sigma"])
    assert ck.pixels.mean == pytest.approx(EXPECTED["loader"]["mean"])


def test_newer_version_is_refused_naming_the_file(old_run, capsys):
    state = torch.load(old_run / "run" / "best.pt", weights_only=True)
    state["version"] = VERSION + 1
    newer = old_run / "run" / "newer.pt"
    torch.save(state, newer)
    with pytest.raises(CheckpointError, match=f"{newer}: checkpoint version {VERSION + 1}.*newer dali-lens"):
        load_ensemble(str(newer), "cpu")
    torch.save(state, old_run / "run" / "last.pt")  # --resume reads it the same way: exit status 2, one line
    from dali_lens.commands.train import main

    rc = main(["--data-root", "data", "--out", "run", "--epochs", "2", "--img-size", "16", "--batch-size", "16",
               "--mask-value", "-1", "--mask-channel", "--backend", "torchvision", "--workers", "1", "--no-gallery",
               "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "last.pt: checkpoint version" in err and "Traceback" not in err


def test_write_then_read_keeps_everything(tmp_path):
    pixels = PixelSettings(kind="fits", scaling="auto", noise_sigma=[1.5, 2.0], mask_value=100, mask_channel=True,
                           resize_mode="crop", mean=[0.1, 0.2, 0.0], std=[1.0, 2.0, 1.0], hdus="1,G")
    ck = Checkpoint(members=[{"spec": {"arch": "small_cnn", "scales": (32,)}, "model": {}}], bands=2,
                    pixels=pixels, config={"seed": 3}, epoch=4, best_auc=0.75, history=[{"epoch": 4}])
    ck.save(tmp_path / "c.pt")
    back = Checkpoint.load(tmp_path / "c.pt")
    assert back == ck and back.pixels.hdus == (1, "G") and back.pixels.mask_value == 100.0
    # version 1's norm and kind are still written, so that dali-lens before #16 reads the file the same way
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["kind"] == "fits" and state["norm"] == {"mean": pixels.mean, "std": pixels.std,
                                                         "noise_sigma": pixels.noise_sigma}


def test_member_states_are_typed_and_the_file_keeps_its_format(old_run, tmp_path):
    """Checkpoint.load gives each member as a MemberState with a MemberSpec (no raw dict keys for the trainers and
    inference to read), and writes them back as the same plain dicts the files have always held; a spec without a
    name gets MemberSpec's (computed once), which is also the member's name at inference."""
    raw = torch.load(old_run / "run" / "best.pt", weights_only=True)
    ck = Checkpoint.load(old_run / "run" / "best.pt")
    ms = ck.members[0]
    assert isinstance(ms, MemberState) and isinstance(ms.spec, MemberSpec) and ms.spec.name == EXPECTED["names"][0]
    assert ms.spec.to_dict() == {k: (tuple(v) if k == "scales" else v) for k, v in raw["members"][0]["spec"].items()}
    written = ck.to_dict()["members"][0]
    assert set(written) == {"spec", "model", "optimizer", "scheduler", "scaler", "temperature"}
    assert set(written) | {"history"} == set(raw["members"][0])  # (before #23 each member also held an empty list)
    assert all(torch.equal(written["model"][k], v) for k, v in raw["members"][0]["model"].items())

    del raw["members"][0]["spec"]["name"]
    torch.save(raw, tmp_path / "nameless.pt")
    spec = Checkpoint.load(tmp_path / "nameless.pt").members[0].spec
    assert spec.name == MemberSpec(spec.arch, spec.scales, spec.seed).name == f"{spec.arch}@{spec.scales[0]}#{spec.seed}"
    ens = load_ensemble(str(tmp_path / "nameless.pt"), "cpu")
    assert ens.names == [spec.name]
    # one spelling of the pixel settings: ens.pixels.mean, not also ens.mean (eight alias properties before #23)
    assert [a for a in ("kind", "mean", "std", "scaling", "scale_a", "noise_sigma", "mask_value", "hdus")
            if hasattr(ens, a)] == [] and ens.pixels.kind == EXPECTED["kind"]
    raw["members"][0]["spec"]["scales"] = "x"
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt: a member has no valid arch/scales in its spec"):
        Checkpoint.load(tmp_path / "bad.pt")


def test_pixel_settings_are_the_loader_options(tmp_path):
    """PixelSettings.pixel_fields names LoaderOptions fields, and covers every pixel field but kind and hdus."""
    from dali_lens.pipelines.options import LoaderOptions

    fields = PixelSettings(scaling="asinh", mask_value=0.0, mask_channel=True).pixel_fields()
    opts = LoaderOptions(**fields)
    assert {k: getattr(opts, k) for k in fields} == fields
    assert set(PixelSettings().to_dict()) - set(fields) == {"kind", "hdus"}
