"""Fine-tuning (issue 24 items 1-2): timm members in every trainer, --weights from files and runs, and the
knobs --freeze-epochs, --trainable-blocks, --layer-decay, --head-lr (recorded, checked on --resume, resumed
exactly across the unfreeze epoch). Tiny data (32 px PNG from the generator), 1-2 epochs, torchvision loader.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil

import pytest
import timm
import torch

import dali_lens.trainers.runner as runner
from dali_lens.checkpoint import MemberSpec
from dali_lens.data.synthetic import generate_dataset
from dali_lens.models import build_model, read_weights
from dali_lens.trainers import TrainConfig, run
from dali_lens.trainers.members import make_member, param_groups

from conftest import command_module


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("finetune") / "data")
    generate_dataset(root, n=64, size=32, fmt="png", seed=5, source_mag=(20.0, 22.0))
    return root


def _options(data, **kw):
    return {**dict(data_root=data, backend="torchvision", arch="small_cnn", img_size=32, batch_size=15, epochs=2,
                   workers=0, progress=False, gallery=False), **kw}


def _cli(data, out, *extra):
    return command_module("train").main(
        ["--data-root", data, "--out", out, "--img-size", "32", "--batch-size", "15", "--workers", "0",
         "--backend", "torchvision", "--no-progress", "--no-gallery", "--epochs", "1", *extra])


def _members(path):
    return torch.load(path, weights_only=True)["members"]


def _same(a: dict, b: dict, keys) -> bool:
    return all(torch.equal(a[k], b[k]) for k in keys)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small_cnn state dict to fine-tune from (as a pretrained encoder would be)."""
    path = str(tmp_path_factory.mktemp("src") / "small_cnn.pt")
    torch.manual_seed(123)
    torch.save(build_model("small_cnn", 3).state_dict(), path)
    return path


def test_freeze_epochs_trains_the_head_only_then_all_and_resumes_exactly_across_the_unfreeze(data, source, tmp_path,
                                                                                            monkeypatch):
    """--freeze-epochs 1 of 2: after epoch 1 the encoder is the --weights file's and the head moved; after
    epoch 2 everything moved. Stopped at the end of epoch 1 or in the middle of epoch 2 and resumed: the
    uninterrupted run's history and weights, exactly."""
    opts = _options(data, weights=source, freeze_epochs=1, checkpoint_every=1)
    out, snaps, real = str(tmp_path / "straight"), [], runner._Job.save

    def save(self, path, *args):
        real(self, path, *args)
        if os.path.basename(path) == "last.pt":
            snap = str(tmp_path / f"stopped-{len(snaps) + 1}")
            shutil.copytree(out, snap, ignore=shutil.ignore_patterns("run.lock"))
            snaps.append(snap)

    said = []
    with monkeypatch.context() as mp:
        mp.setattr(runner._Job, "save", save)
        run(TrainConfig(out=out, **opts), log=said.append)
    assert any("epoch 1 trains 129 of" in s and "(the head only)" in s for s in said), said
    assert any("epoch 2 trains" in s for s in said), said
    src = torch.load(source, weights_only=True)
    # (BatchNorm's running statistics follow the data in frozen blocks too: parameters only)
    encoder = [k for k in src if not k.startswith("fc.") and "running" not in k and "num_batches" not in k]
    after1 = _members(os.path.join(snaps[3], "last.pt"))[0]["model"]  # 3 steps + the epoch's end
    assert torch.load(os.path.join(snaps[3], "last.pt"), weights_only=True)["epoch"] == 1
    assert _same(after1, src, encoder) and not torch.equal(after1["fc.weight"], src["fc.weight"])
    final = _members(os.path.join(out, "last.pt"))[0]["model"]
    assert not torch.equal(final["features.0.0.weight"], src["features.0.0.weight"])
    history = json.load(open(os.path.join(out, "metrics.json")))["history"]
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["freeze_epochs"] == 1 and config["trainable_blocks"] is None and config["head_lr"] is None
    for k in (4, 5):  # the end of the frozen epoch; one step into the unfrozen one
        stopped = snaps[k - 1]
        run(TrainConfig(out=stopped, resume=True, **opts), log=quiet)
        resumed = _members(os.path.join(stopped, "last.pt"))[0]["model"]
        assert _same(resumed, final, final), k
        got = json.load(open(os.path.join(stopped, "metrics.json")))["history"]
        drop = ("train_images_per_s", "data_wait_fraction")
        assert [{a: b for a, b in h.items() if a not in drop} for h in got] == \
               [{a: b for a, b in h.items() if a not in drop} for h in history], k


def test_trainable_blocks_leaves_the_first_blocks_as_loaded(data, source, tmp_path):
    out = str(tmp_path / "run")
    run(TrainConfig(out=out, **_options(data, weights=source, trainable_blocks=1, epochs=1)), log=quiet)
    src, got = torch.load(source, weights_only=True), _members(os.path.join(out, "last.pt"))[0]["model"]
    frozen = [k for k in src if k.startswith(("features.0.", "features.1.", "features.2.")) and "running" not in k
              and "num_batches" not in k]
    assert frozen and _same(got, src, frozen)
    assert not torch.equal(got["features.3.0.weight"], src["features.3.0.weight"])
    assert not torch.equal(got["fc.weight"], src["fc.weight"])


def test_layer_decay_and_head_lr_param_groups():
    """timm's layer-wise groups: small_cnn's 4 blocks below the head at lr * 0.5**(4 - i); the head at --head-lr;
    without the knobs one group, as before."""
    model = build_model("small_cnn", 3)
    cfg = TrainConfig(lr=1e-3, layer_decay=0.5, head_lr=1e-2)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {names[id(p)].split(".")[0] + (names[id(p)].split(".")[1] if names[id(p)].startswith("features") else ""): g["lr"]
           for g in groups for p in g["params"]}
    assert lrs == {"fc": 1e-2, **{f"features{i}": pytest.approx(1e-3 * 0.5 ** (4 - i)) for i in range(4)}}
    assert all(g["weight_decay"] == cfg.weight_decay for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    plain = param_groups(model, TrainConfig(lr=1e-3))
    assert len(plain) == 1 and plain[0]["lr"] == 1e-3
    m = make_member(MemberSpec("resnet18", (32,), 0), 3, TrainConfig(lr=1e-3, layer_decay=0.8, lr_schedule="onecycle"),
                    steps_per_epoch=2, device=torch.device("cpu"))
    assert len({round(g["initial_lr"], 12) for g in m.optimizer.param_groups}) == 10  # stem, 8 blocks, head


def test_options_recorded_and_resume_with_another_value_refused(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _cli(data, out, "--layer-decay", "0.7", "--head-lr", "0.01", "--trainable-blocks", "2") == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["layer_decay"], config["head_lr"], config["trainable_blocks"], config["freeze_epochs"]) == \
        (0.7, 0.01, 2, 0)
    capsys.readouterr()
    assert _cli(data, out, "--layer-decay", "0.7", "--head-lr", "0.01", "--trainable-blocks", "2",
                "--freeze-epochs", "1", "--resume", "--epochs", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: options differ") and "--freeze-epochs: 0 then, 1 now" in err[0]


@pytest.mark.parametrize("flag,value", [("--layer-decay", "0"), ("--layer-decay", "1.5"), ("--freeze-epochs", "-1"),
                                        ("--trainable-blocks", "x"), ("--head-lr", "0")])
def test_bad_fine_tuning_values(data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exc:
        _cli(data, str(tmp_path / "run"), flag, value)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and flag in err[-1]
    assert not os.path.exists(tmp_path / "run")


def test_pickled_weights_file_refused_with_one_line_naming_it(data, tmp_path, capsys):
    path = str(tmp_path / "pickled.pt")
    torch.save({"state_dict": build_model("small_cnn", 3).state_dict(), "args": argparse.Namespace(lr=1)}, path)
    capsys.readouterr()
    assert _cli(data, str(tmp_path / "run"), "--weights", path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {path}: refused: it holds a Python object (argparse.Namespace), not only tensors and "
                   "plain data; dali-lens never unpickles objects from a file (that can run code)"]
    assert _cli(data, str(tmp_path / "run2"), "--weights", str(tmp_path / "missing.pt")) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: weights file not found: {tmp_path / 'missing.pt'}"]


def test_unknown_arch_one_line_before_any_work(data, tmp_path, capsys):
    capsys.readouterr()
    assert _cli(data, str(tmp_path / "run"), "--trainer", "ensemble", "--members", "small_cnn:32:0,efficentnet_b0:32:1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown architecture 'efficentnet_b0' (--arch / --members)")
    assert "close timm names: efficientnet_b0" in err[0]


def test_timm_members_in_ensemble_and_multiscale_then_predict_and_warm_start(data, tmp_path):
    """--members with timm names trains, predicts; its run is --weights for a new run (each member's own)."""
    ens = str(tmp_path / "ens")
    run(TrainConfig(out=ens, **_options(data, trainer="ensemble", epochs=1,
                                        members="mobilenetv3_small_050:16:0,resnet10t:16:1")), log=quiet)
    metrics = json.load(open(os.path.join(ens, "metrics.json")))
    assert set(metrics["history"][0]["train_loss"]) == {"mobilenetv3_small_050@16#0", "resnet10t@16#1"}
    from dali_lens import predict

    rows = list(csv.DictReader(open(predict(ens, data, str(tmp_path / "p.csv"), split="test", backend="torchvision"))))
    assert len(rows) == 9 and all(0.0 <= float(r["score"]) <= 1.0 for r in rows)
    # the run's members as --weights: each new member takes the one of its name
    weights = read_weights(ens)
    best = {m["spec"]["name"]: m["model"] for m in _members(os.path.join(ens, "best.pt"))}
    for spec in (MemberSpec("mobilenetv3_small_050", (16,), 0), MemberSpec("resnet10t", (16,), 1)):
        m = make_member(spec, 3, TrainConfig(), 1, torch.device("cpu"), weights=weights)
        assert _same(m.model.state_dict(), best[spec.name], best[spec.name])
    ms = str(tmp_path / "ms")
    run(TrainConfig(out=ms, **_options(data, trainer="multiscale", arch="mobilenetv3_small_050", scales="16,24",
                                       epochs=1, batch_size=45)), log=quiet)
    history = json.load(open(os.path.join(ms, "metrics.json")))["history"]
    assert len(history) == 1 and list(history[0]["train_loss"]) == ["mobilenetv3_small_050@16-24#0"]


def test_fixed_size_member_at_another_scale_is_one_line(data, tmp_path, capsys):
    """A timm transformer built for its largest scale (DeiT: one input size) cannot take the others."""
    capsys.readouterr()
    assert _cli(data, str(tmp_path / "run"), "--trainer", "multiscale", "--arch", "deit_tiny_patch16_224",
                "--scales", "16,32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: member deit_tiny_patch16_224@16-32#0: deit_tiny_patch16_224 "
                                               "cannot take 16 px inputs (built for 32 px)"), err
