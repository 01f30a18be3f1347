"""The trainers end to end on generated lenses: outputs, resume, refusal to overwrite, DDP, the CLI."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from dali_lens.data.synthetic import generate_dataset
from dali_lens.trainers import TrainConfig, run

QUIET = dict(progress=False, workers=2)


@pytest.fixture(scope="module")
def lenses(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("lenses") / "data")
    generate_dataset(root, n=240, size=32, fmt="png", seed=3, source_mag=(20.0, 22.0))
    return root


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_single_trainer_writes_every_output(lenses, tmp_path):
    out = str(tmp_path / "run")
    result = run(TrainConfig(data_root=lenses, out=out, epochs=2, batch_size=16, img_size=32, **QUIET))
    for name in ("metrics.json", "predictions.csv", "roc.png", "best.pt", "last.pt", "config.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["split"] == "test" and metrics["n"] == 36
    for key in ("accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "ece", "tpr0", "tpr10"):
        assert key in metrics["metrics"]
    assert len(metrics["history"]) == 2 and result["metrics"]["n"] == 36
    rows = _rows(os.path.join(out, "predictions.csv"))
    assert len(rows) == 36 and len({r["file"] for r in rows}) == 36
    assert all(os.path.exists(r["file"]) and 0 <= float(r["score"]) <= 1 for r in rows)
    ckpt = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert {"members", "epoch", "config", "norm", "loader"} <= set(ckpt)
    assert {"model", "optimizer", "scheduler", "scaler"} <= set(ckpt["members"][0])


def test_refuses_to_overwrite_and_resumes(lenses, tmp_path):
    out = str(tmp_path / "run")
    cfg = dict(data_root=lenses, out=out, batch_size=16, img_size=32, **QUIET)
    run(TrainConfig(epochs=1, **cfg))
    before = open(os.path.join(out, "predictions.csv")).read()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        run(TrainConfig(epochs=1, **cfg))
    assert open(os.path.join(out, "predictions.csv")).read() == before
    result = run(TrainConfig(epochs=2, resume=True, **cfg))
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_resume_from_mid_epoch_checkpoint_matches_uninterrupted_run(lenses, tmp_path):
    """Stop after 3 steps of epoch 2 (checkpoint every step), resume: same weights as never stopping."""
    cfg = dict(data_root=lenses, batch_size=16, img_size=32, epochs=2, max_shift=0, backend="dali-cpu",
               checkpoint_every=1, **QUIET)
    straight = str(tmp_path / "straight")
    run(TrainConfig(out=straight, **cfg))

    class Stop(Exception):
        pass

    import dali_lens.trainers.runner as runner

    interrupted = str(tmp_path / "interrupted")
    real = runner.train_epoch

    def stop_in_epoch_2(members, loader, cfg_, device, epoch, **kw):
        if epoch == 1:
            def on_step(step, inner=kw.pop("on_step")):
                inner(step)
                if step == 3:
                    raise Stop
            kw["on_step"] = on_step
        return real(members, loader, cfg_, device, epoch, **kw)

    runner.train_epoch = stop_in_epoch_2
    try:
        with pytest.raises(Stop):
            run(TrainConfig(out=interrupted, **cfg))
    finally:
        runner.train_epoch = real
    state = torch.load(os.path.join(interrupted, "last.pt"), weights_only=True)
    assert state["epoch"] == 1 and state["loader"]["batches_done"] == 3
    run(TrainConfig(out=interrupted, resume=True, **cfg))
    a = torch.load(os.path.join(straight, "last.pt"), weights_only=True)["members"][0]["model"]
    b = torch.load(os.path.join(interrupted, "last.pt"), weights_only=True)["members"][0]["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


@pytest.mark.parametrize("schedule", ["all", "progressive"])
def test_multiscale_trainer(lenses, tmp_path, schedule):
    out = str(tmp_path / schedule)
    result = run(TrainConfig(data_root=lenses, out=out, trainer="multiscale", scales="16,32", schedule=schedule,
                             progressive_epochs=1, consistency="kl", epochs=2, batch_size=16, **QUIET))
    assert result["metrics"]["n"] == 36


def test_ensemble_trainer_members_side_by_side(lenses, tmp_path):
    out = str(tmp_path / "ens")
    result = run(TrainConfig(data_root=lenses, out=out, trainer="ensemble", members="small_cnn:24:0,small_cnn:32:1",
                             fusion="temperature", epochs=1, batch_size=16, **QUIET))
    assert set(result["members"]) == {"small_cnn@24#0", "small_cnn@32#1"}
    assert set(result["temperatures"]) == set(result["members"])
    rows = _rows(os.path.join(out, "predictions.csv"))
    assert {"score_small_cnn@24#0", "score_small_cnn@32#1", "member_std"} <= set(rows[0])


def test_ddp_two_processes_gloo_each_sample_once(lenses, tmp_path):
    """torchrun with 2 CPU processes: training finishes, shards are disjoint, the ranks' weights stay equal
    (gradients accumulated over micro-batches are averaged across ranks once per step), evaluation is exact."""
    out = str(tmp_path / "ddp")
    log = str(tmp_path / "seen")
    script = tmp_path / "ddp_probe.py"
    script.write_text(f"""
import os, json, sys
import dali_lens.trainers.runner as runner
from dali_lens.trainers import TrainConfig
real = runner.train_epoch
def probe(members, loader, cfg, device, epoch, **kw):
    seen = []
    class Spy:
        def __len__(self): return len(loader)
        def set_epoch(self, e): loader.set_epoch(e)
        def state_dict(self): return loader.state_dict()
        def __iter__(self):
            for b in loader:
                seen.extend(b["index"].tolist())
                yield b
    stats = real(members, Spy(), cfg, device, epoch, **kw)
    weights = float(sum(p.double().sum() for p in members[0].core.parameters()))
    with open({log!r} + f"-{{os.environ['RANK']}}-{{epoch}}.json", "w") as fh:
        json.dump({{"seen": seen, "weights": weights}}, fh)
    return stats
runner.train_epoch = probe
if __name__ == "__main__":
    # micro-batches of 3 (8 = 3 + 3 + 2): gradients are synchronised once per step, in the last pass
    runner.run(TrainConfig(data_root={lenses!r}, out={out!r}, epochs=2, batch_size=8, img_size=32,
                           backend="dali-cpu", progress=False, workers=1, micro_batch=3))
""")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    n_train = 168  # 240 * 0.7
    for epoch in range(2):
        records = [json.load(open(f"{log}-{r}-{epoch}.json")) for r in range(2)]
        assert records[0]["weights"] == records[1]["weights"], "the ranks' models must stay identical"
        parts = [r["seen"] for r in records]
        assert len(parts[0]) == len(parts[1]) > 0
        assert not set(parts[0]) & set(parts[1]), "ranks must see disjoint samples"
        assert len(parts[0]) + len(parts[1]) == (n_train // 2 // 8) * 8 * 2
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["world_size"] == 2 and metrics["n"] == 36  # every test sample exactly once, gathered
    assert len(_rows(os.path.join(out, "predictions.csv"))) == 36


def test_cli_help_and_clear_errors(tmp_path):
    exe = [sys.executable, "-m", "dali_lens.train"]
    helptext = subprocess.run(exe + ["--help"], capture_output=True, text=True).stdout
    for flag in ("--data-root", "--backend", "--arch", "--img-size", "--epochs", "--batch-size", "--out",
                 "--resume", "--seed", "--trainer"):
        assert flag in helptext
    missing = subprocess.run(exe + ["--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr
    assert "Traceback" not in missing.stderr


@pytest.mark.parametrize("consistency", ["none", "kl"])
@pytest.mark.parametrize("bound", [{"micro_batch": 3}, {"memory_budget": "0.01MB"}])
def test_micro_batches_give_the_whole_batch_update(consistency, bound):
    """--micro-batch N / --memory-budget: gradients accumulated over chunks equal the whole batch's (no BatchNorm)."""
    from types import SimpleNamespace

    from dali_lens.trainers.loop import train_epoch

    g = torch.Generator().manual_seed(0)
    batch = {"image": {8: torch.randint(0, 256, (10, 3, 8, 8), generator=g, dtype=torch.uint8),
                       12: torch.randint(0, 256, (10, 3, 12, 12), generator=g, dtype=torch.uint8)},
             "label": torch.tensor([0, 1] * 5), "index": torch.arange(10)}

    def member():
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten(), torch.nn.Linear(4, 1), torch.nn.Flatten(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        return SimpleNamespace(model=model, optimizer=opt, scaler=None, spec=SimpleNamespace(name="m", scales=(8, 12)),
                               scheduler=torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0))

    results = []
    for options in ({}, bound):  # micro-batch 3 does not divide 10: chunks of 3, 3, 3, 1
        m = member()
        cfg = TrainConfig(trainer="multiscale", consistency=consistency, consistency_weight=0.5, **options)
        stats = train_epoch([m], [batch], cfg, torch.device("cpu"), 0, show_progress=False)
        results.append((stats["loss"]["m"], [p.detach().clone() for p in m.model.parameters()]))
        chunks = stats["chunk_sizes"]["m"]
    if "memory_budget" in bound:  # 10 KiB: the 12 px scale keeps more per sample, so it gets smaller chunks
        saved = stats["saved_bytes_per_sample"]
        assert saved["m@12"] > saved["m@8"] > 0
        assert chunks[12] < chunks[8] < 10
        assert chunks[12] == 10240 // saved["m@12"]
    else:
        assert chunks == {8: 3, 12: 3}
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any((a != p).any() for a, p in zip(params_a, member().model.parameters())), "the step changed nothing"


def test_memory_budget_measures_what_autograd_keeps_and_leaves_the_model_as_it_was():
    """Saved bytes per sample grow with the pixel count; BatchNorm statistics and the RNG are untouched."""
    import contextlib

    from dali_lens.models import build_model
    from dali_lens.trainers.budget import chunk_size, saved_bytes_per_sample

    torch.manual_seed(0)
    model = build_model("small_cnn", in_chans=3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    per = {s: saved_bytes_per_sample(model, torch.rand(4, 3, s, s), contextlib.nullcontext) for s in (32, 64)}
    after_probe = torch.rand(3)
    torch.manual_seed(5)
    torch.rand(4, 3, 32, 32), torch.rand(4, 3, 64, 64)
    assert torch.equal(after_probe, torch.rand(3)), "the probe consumed random numbers (dropout) it did not restore"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    # a conv net keeps activations proportional to the pixel count: 4x the pixels, about 4x the bytes
    assert 3.5 < per[64] / per[32] < 4.5
    # small_cnn at 64 px keeps its first block's activations at full size: at least 4 of 32x64x64 float maps
    assert per[64] > 4 * 32 * 64 * 64 * 4
    # BatchNorm1d cannot normalise one sample in training mode: the probe then measures with 2 and 4
    head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16), torch.nn.BatchNorm1d(16)).train()
    assert saved_bytes_per_sample(head, torch.rand(4, 3, 8, 8), contextlib.nullcontext) >= 16 * 4
    assert chunk_size(64, per[64], budget=10 * per[64]) == 10
    assert chunk_size(64, per[64], budget=10 * per[64], micro_batch=4) == 4
    assert chunk_size(64, per[64], budget=1) == 1 and chunk_size(64, per[64], None) == 64


@pytest.mark.parametrize("text,expected", [("auto", "auto"), ("off", None), ("0", None), ("2", 2 * 2 ** 30),
                                           ("1.5GB", 1.5 * 2 ** 30), ("512MB", 512 * 2 ** 20), ("256m", 256 * 2 ** 20)])
def test_memory_budget_values(text, expected):
    from dali_lens.trainers.budget import budget_bytes, parse_budget

    assert parse_budget(text) == expected
    if expected != "auto":
        assert budget_bytes(text, torch.device("cpu")) == expected
    else:
        assert budget_bytes(text, torch.device("cpu")) is None  # auto: no budget on CPU


def test_bad_memory_budget_is_a_clear_error_before_any_data_is_read(tmp_path, capsys):
    from dali_lens.commands.train import main

    rc = main(["--data-root", str(tmp_path / "never-read"), "--out", str(tmp_path / "o"), "--memory-budget", "lots"])
    err = capsys.readouterr().err
    assert rc == 2 and "--memory-budget 'lots'" in err and "2GB" in err


def test_stem_flag_is_logged_stored_and_used_by_predict(lenses, tmp_path, capsys):
    """--stem imagenet at a size where auto would pick the small-input stem: logged, and predict rebuilds it."""
    from dali_lens.inference import load_ensemble
    from dali_lens.models import build_model

    assert build_model("resnet18", 3, img_size=96).small_input  # auto: small at <= 96 px
    assert not build_model("resnet18", 3, img_size=96, stem="imagenet").small_input
    assert build_model("resnet18", 3, img_size=128, stem="small").small_input
    out = str(tmp_path / "r18")
    run(TrainConfig(data_root=lenses, out=out, epochs=1, batch_size=16, img_size=32, arch="resnet18",
                    stem="imagenet", **QUIET))
    assert "ImageNet stem (7x7 stride 2 + max-pool) (--stem imagenet)" in capsys.readouterr().out
    ens = load_ensemble(out, "cpu")
    assert not ens.members[0].model.small_input


def test_config_list_options_are_typed_and_their_text_is_the_same_config():
    """scales / members / hdus / batch_transforms are tuples, read once by the field's type from the CLI's text
    or from the value: before, TrainConfig(scales=(64, 112)) failed ("invalid literal for int() ... '(64'")
    and the text and the tuple were different configs."""
    import dataclasses

    from dali_lens.commands import train
    from dali_lens.trainers import MemberSpec, get_trainer
    from dali_lens.trainers.config import from_args

    typed = TrainConfig(scales=(64, 112), hdus=(1, "G"), batch_transforms=("a", "b"),
                        members=(MemberSpec("small_cnn", (32,), 0), MemberSpec("resnet18", (48,), 1)))
    text = TrainConfig(scales="64,112", hdus="1, G", batch_transforms="a, b,", members="small_cnn:32,resnet18:48:1")
    assert typed == text and typed.scales == (64, 112) and typed.hdus == (1, "G")
    assert [m.name for m in text.members] == ["small_cnn@32#0", "resnet18@48#1"]  # (SEED: 0 if not given)
    assert dataclasses.replace(text, scales=(64, 96)) == dataclasses.replace(typed, scales="64,96")
    # the command line parses the text once: the values reach TrainConfig typed
    args = train.parser().parse_args(["--scales", "64,112", "--hdus", "1,G", "--members",
                                      "small_cnn:32:0,resnet18:48:1", "--batch-transforms", "a,b"])
    assert args.scales == (64, 112) and isinstance(args.members[0], MemberSpec)
    assert from_args(args) == typed
    assert train.parser().parse_args([]).scales == TrainConfig().scales == (48, 64, 96)  # the default, parsed
    # the trainers read the typed fields
    assert get_trainer("multiscale").member_specs(TrainConfig(scales=(112, 64))) == [MemberSpec("small_cnn", (64, 112))]
    assert get_trainer("ensemble").member_specs(typed) == list(typed.members)
    # strict JSON, and back; and the text form config.json held before reads as the same config
    d = json.loads(json.dumps(typed.to_dict(), allow_nan=False))
    assert d["scales"] == [64, 112] and d["hdus"] == [1, "G"] and d["batch_transforms"] == ["a", "b"]
    assert d["members"][1] == {"arch": "resnet18", "scales": [48], "seed": 1, "name": "resnet18@48#1"}
    assert TrainConfig.from_dict(d) == typed
    old = {**d, "scales": "64,112", "hdus": "1,G", "batch_transforms": "a,b", "members": "small_cnn:32:0,resnet18:48:1"}
    assert TrainConfig.from_dict(old) == typed
    v1 = json.load(open(os.path.join(os.path.dirname(__file__), "data", "v1_run", "run", "config.json")))
    assert TrainConfig.from_dict(v1).members == TrainConfig().members and TrainConfig.from_dict(v1).scales == (48, 64, 96)
    # a bad value, typed or text, names its option
    for bad, flag in (({"scales": (64, "x")}, "--scales"), ({"scales": "(64"}, "--scales"),
                      ({"members": [{"arch": "small_cnn", "scales": [4]}]}, "--members"),
                      ({"members": (MemberSpec("small_cnn", (32,), -1),)}, "--members"), ({"hdus": (1, -2)}, "--hdus"),
                      ({"batch_transforms": 3}, "--batch-transforms")):
        with pytest.raises(ValueError, match=flag):
            TrainConfig(**bad)
