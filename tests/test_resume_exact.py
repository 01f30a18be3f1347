"""--resume gives the uninterrupted run's result wherever the run stopped (issue 22).

A short run (3 epochs of 3 steps, ``--checkpoint-every 1``) is stopped after each of its checkpoints in turn
(every step of every epoch, the epoch's last step and the epoch's end included) and resumed: the history
(loss and validation scores of every epoch) and the final weights equal the uninterrupted run's exactly.
Before the fix a checkpoint at an epoch's last step replayed a whole epoch on DALI (the restored reader was
already past the epoch's end), an epoch-end checkpoint restarted DALI's shuffle at its first epoch's order,
and a resumed epoch's mean loss counted only the steps after the checkpoint (0.0 for an epoch whose steps
were all done).
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import dali_lens
import dali_lens.trainers.runner as runner
from dali_lens.data.synthetic import generate_dataset
from dali_lens.trainers import TrainConfig, run

EPOCHS, STEPS = 3, 3
SAVES = EPOCHS * (STEPS + 1)  # last.pt is written after every step and at every epoch's end
# the save after an epoch's last step, and the one at its end (once validated)
BOUNDARIES = sorted({e * (STEPS + 1) + d for e in range(EPOCHS) for d in (STEPS, STEPS + 1)})
TIMING = ("train_images_per_s", "data_wait_fraction")


def quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("resume") / "data")
    generate_dataset(root, n=64, size=32, fmt="png", seed=3, source_mag=(20.0, 22.0))
    return root


def _options(data, backend, **kw):
    # 45 training cutouts in batches of 15: 3 steps per epoch; augmentation (flips, shifts) on
    return {**dict(data_root=data, backend=backend, arch="small_cnn", img_size=32, batch_size=15, epochs=EPOCHS,
                   checkpoint_every=1, max_shift=2, workers=1, progress=False, gallery=False), **kw}


def _history(out):
    with open(os.path.join(out, "metrics.json")) as fh:
        return [{k: v for k, v in h.items() if k not in TIMING} for h in json.load(fh)["history"]]


def _weights(path):
    return torch.load(path, weights_only=False)["members"][0]["model"]


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    return set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """Per backend: the uninterrupted run, and a copy of its directory as it stood after each write of last.pt
    (what a run stopped right there leaves behind)."""
    made = {}

    def get(backend):
        if backend not in made:
            base = tmp_path_factory.mktemp(backend)
            out, snaps = str(base / "straight"), []
            real = runner._Job.save

            def save(self, path, *args):
                real(self, path, *args)
                if os.path.basename(path) == "last.pt":
                    snap = str(base / f"stopped-{len(snaps) + 1}")
                    shutil.copytree(out, snap, ignore=shutil.ignore_patterns("run.lock"))
                    snaps.append(snap)

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(runner._Job, "save", save)
                run(TrainConfig(out=out, **_options(data, backend)), log=quiet)
            assert len(snaps) == SAVES and len(_history(out)) == EPOCHS
            made[backend] = out, snaps
        return made[backend]

    return get


def _check_resume(data, backend, straight, k):
    out, snaps = straight(backend)
    stopped = snaps[k - 1]
    run(TrainConfig(out=stopped, resume=True, **_options(data, backend)), log=quiet)
    assert _history(stopped) == _history(out), f"stopped after checkpoint {k}"
    assert _same_weights(os.path.join(stopped, "last.pt"), os.path.join(out, "last.pt")), k
    assert _same_weights(os.path.join(stopped, "best.pt"), os.path.join(out, "best.pt")), k


@pytest.mark.parametrize("k", range(1, SAVES + 1))
def test_dali_cpu_resume_after_every_checkpoint_equals_the_uninterrupted_run(data, straight, k):
    _check_resume(data, "dali-cpu", straight, k)


@pytest.mark.parametrize("k", BOUNDARIES)
def test_torchvision_resume_at_epoch_boundaries_equals_the_uninterrupted_run(data, straight, k):
    _check_resume(data, "torchvision", straight, k)


def test_interrupted_at_an_epochs_last_step_resumes_exactly(data, straight, tmp_path, monkeypatch):
    """The issue's case through the library call: Ctrl-C right after the checkpoint of epoch 2's last step."""
    out = str(tmp_path / "run")
    real, saves = runner._Job.save, []

    def save(self, path, *args):
        real(self, path, *args)
        saves.append(os.path.basename(path))
        if saves.count("last.pt") == (STEPS + 1) + STEPS:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner._Job, "save", save)
    with pytest.raises(KeyboardInterrupt):
        dali_lens.train(out=out, **_options(data, "dali-cpu"))
    monkeypatch.setattr(runner._Job, "save", real)
    state = torch.load(os.path.join(out, "last.pt"), weights_only=False)
    assert state["epoch"] == 1 and state["loader"]["batches_done"] == STEPS
    dali_lens.train(out=out, resume=True, **_options(data, "dali-cpu"))
    reference = straight("dali-cpu")[0]
    assert _history(out) == _history(reference)
    assert _same_weights(os.path.join(out, "last.pt"), os.path.join(reference, "last.pt"))


def test_onecycle_resumed_with_more_epochs_stretches_the_schedule(data, tmp_path):
    """--lr-schedule onecycle, then --resume with more --epochs: it trains on (it stopped with 'Tried to step
    7 times' before), over a one-cycle schedule of the new length from the step reached."""
    opts = _options(data, "torchvision", lr_schedule="onecycle", checkpoint_every=0)
    out = str(tmp_path / "run")
    run(TrainConfig(out=out, **{**opts, "epochs": 2}), log=quiet)
    run(TrainConfig(out=out, resume=True, **opts), log=quiet)
    assert [h["epoch"] for h in _history(out)] == [1, 2, 3]
    resumed = torch.load(os.path.join(out, "last.pt"), weights_only=False)["members"][0]
    assert resumed["scheduler"]["total_steps"] == EPOCHS * STEPS == resumed["scheduler"]["last_epoch"]
    full = str(tmp_path / "full")  # the same schedule run in one go ends at the same (final) learning rate
    run(TrainConfig(out=full, **opts), log=quiet)
    final = torch.load(os.path.join(full, "last.pt"), weights_only=False)["members"][0]
    assert resumed["optimizer"]["param_groups"][0]["lr"] == final["optimizer"]["param_groups"][0]["lr"]
    assert resumed["scheduler"]["_schedule_phases"] == final["scheduler"]["_schedule_phases"]


# ---------------------------------------------------------------------------------------------------------
# --resume on data that changed since the run started: refused, saying what changed


def _cli(data, out, *extra):
    from dali_lens.commands.train import main

    return main(["--data-root", data, "--out", out, "--img-size", "32", "--batch-size", "15", "--workers", "1",
                 "--backend", "torchvision", "--no-progress", "--no-gallery", "--epochs", "1", *extra])


def _edit_data(root, how):
    """Change a copy of the generated data as a user would: add a cutout (a new file and its manifest row),
    delete one (file and row), or rewrite one's pixels in place."""
    import csv

    from PIL import Image

    manifest = os.path.join(root, "train.csv")
    with open(manifest, newline="") as fh:
        rows = list(csv.reader(fh))
    path = os.path.join(root, rows[1][0])
    if how == "added":
        shutil.copyfile(path, path.replace(".png", "-copy.png"))
        rows.append([rows[1][0].replace(".png", "-copy.png")] + rows[1][1:])
    elif how == "removed":
        os.remove(os.path.join(root, rows.pop(1)[0]))
    else:
        im = Image.open(path).convert("RGB")
        im.point(lambda v: 255 - v).save(path)
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.mark.parametrize("how", ["added", "removed", "edited"])
def test_resume_on_changed_data_is_refused_naming_the_change(data, tmp_path, capsys, how):
    root = str(tmp_path / "data")
    shutil.copytree(data, root)
    out = str(tmp_path / "run")
    assert _cli(root, out) == 0
    recorded = json.load(open(os.path.join(out, "config.json")))["data"]
    assert recorded["train"]["samples"] == 45 and recorded["val"]["samples"] == 10
    _edit_data(root, how)
    capsys.readouterr()
    config = open(os.path.join(out, "config.json")).read()
    assert _cli(root, out, "--resume", "--epochs", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume: the training data changed"), err
    # the train split (whichever it lost or gained, the val split held out of it may shift as well)
    assert f"train: 45 samples then, {45 + (how == 'added') - (how == 'removed')} now" in err[0]
    assert ("1 added" if how == "added" else "1 removed" if how == "removed" else "1 edited") in err[0]
    assert open(os.path.join(out, "config.json")).read() == config  # nothing touched
    # a deliberate change: continues with the flag, recorded, and the new data is what the run now records
    assert _cli(root, out, "--resume", "--epochs", "2", "--allow-config-change") == 0
    saved = json.load(open(os.path.join(out, "config.json")))
    assert "train: 45 samples then" in saved["config_changes"][-1]["data"]
    assert saved["data"] != recorded
    assert _cli(root, out, "--resume", "--epochs", "3") == 0


def test_run_without_a_data_record_still_resumes_and_says_so(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert _cli(data, out) == 0
    path = os.path.join(out, "config.json")
    config = json.load(open(path))
    del config["data"]  # as a run started before the record existed
    with open(path, "w") as fh:
        json.dump(config, fh)
    capsys.readouterr()
    assert _cli(data, out, "--resume", "--epochs", "2") == 0
    assert "no record of its training data" in capsys.readouterr().out
    assert "data" in json.load(open(path))  # recorded from now on
