"""Unlabelled rows never train, and evaluate scores what it is pointed at."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from conftest import write_dataset
from dali_lens.data import discover
from dali_lens.data.sources import leave_out_unlabelled
from dali_lens.trainers import TrainConfig, run

UNLABELLED = ("-1", "", "nan")


def _manifests(root: str) -> list[str]:
    """train.csv / test.csv over root's split folders; train.csv adds three unlabelled rows (-1, empty, nan) of
    extra files, among the labelled ones. Returns the unlabelled files."""
    extra = []
    for split in ("train", "test"):
        rows = []
        for cls, label in (("lens", "1"), ("nonlens", "0")):
            folder = os.path.join(root, split, cls)
            rows += [(os.path.join(split, cls, n), label) for n in sorted(os.listdir(folder))]
        if split == "train":
            for k, value in enumerate(UNLABELLED):
                src = rows[k][0]
                dst = os.path.join(split, f"unlabelled{k}.png")
                with open(os.path.join(root, src), "rb") as a, open(os.path.join(root, dst), "wb") as b:
                    b.write(a.read())
                rows.insert(3 * k + 1, (dst, value))
                extra.append(os.path.join(root, dst))
        with open(os.path.join(root, f"{split}.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["filepath", "label"])
            w.writerows(rows)
    return extra


@pytest.fixture(scope="module")
def mixed_labels(tmp_path_factory):
    root = write_dataset(str(tmp_path_factory.mktemp("labels") / "data"), "png", n_per_class=10, size=24)
    return root, _manifests(root)


@pytest.fixture(scope="module")
def trained(mixed_labels, tmp_path_factory):
    root, _ = mixed_labels
    said = []
    out = str(tmp_path_factory.mktemp("run") / "run")
    result = run(TrainConfig(data_root=root, out=out, epochs=2, batch_size=8, img_size=24, lr=0.05,
                             backend="torchvision", workers=0, progress=False, gallery=False),
                 log=lambda *a: said.append(" ".join(map(str, a))))
    return out, result, said


def test_unlabelled_rows_are_left_out_of_training(mixed_labels, trained):
    """Labels -1, empty or nan among labelled rows entered the BCE loss with target -1 (the loss went negative);
    they are left out of the train and val splits, named in one log line."""
    root, extra = mixed_labels
    lines = []
    splits = leave_out_unlabelled(discover(root, val_fraction=0.2, seed=0), lines.append)
    for name in ("train", "val"):
        assert all(s.label in (0, 1) for s in splits[name].samples)
    assert not {s.path for n in ("train", "val") for s in splits[n].samples} & set(extra)
    assert len(lines) == 1 and lines[0].startswith("3 unlabelled sample(s) (label empty, -1 or nan) left out of "
                                                   "training (train 2, val 1): ")
    assert all(p in lines[0] for p in extra)

    _, result, said = trained
    assert any("3 unlabelled sample(s)" in s and "left out of training" in s for s in said), said
    losses = [float(line.split("loss ")[1].split()[0]) for line in said if line.startswith("epoch ")]
    assert len(losses) == 2 and min(losses) >= 0, losses
    assert all(h["val_loss"] >= 0 for h in result["history"])


def _evaluate(run_dir, data, out, *extra):
    from dali_lens.evaluate import main

    return main([data, "--checkpoint", run_dir, "--out", out, "--n-boot", "0", "--no-gallery", "--backend",
                 "torchvision", "--workers", "0", "--no-progress", *extra])


def test_evaluate_uses_a_folder_without_splits_whole(trained, tmp_path, capsys):
    """evaluate on class folders (no split of their own) stopped with "no 'test' split (found: train, val)", the
    val being only discover's training hold-out; it is evaluated whole, said in one line."""
    run_dir = trained[0]
    flat = os.path.join(write_dataset(str(tmp_path / "d"), "png", n_per_class=5, size=24, seed=7,
                                      splits=("x",)), "x")  # x/lens, x/nonlens
    assert _evaluate(run_dir, flat, str(tmp_path / "e1")) == 0
    err = capsys.readouterr().err
    assert f"note: {flat} has no splits of its own (no train/val/test folders or manifests): using all 10 samples, " \
           "not a 'test' split" in err
    metrics = json.load(open(tmp_path / "e1" / "metrics.json"))
    assert metrics["n"] == metrics["n_labelled"] == 10 and metrics["split"] == "all"


def test_evaluate_keeps_test_default_where_splits_are_explicit(trained, tmp_path, capsys):
    run_dir = trained[0]
    root = write_dataset(str(tmp_path / "d"), "png", n_per_class=4, size=24, seed=9, splits=("train",))
    assert _evaluate(run_dir, root, str(tmp_path / "e")) == 2
    assert "no 'test' split (found: train, val)" in capsys.readouterr().err
    root = write_dataset(str(tmp_path / "t"), "png", n_per_class=4, size=24, seed=9, splits=("train", "test"))
    assert _evaluate(run_dir, root, str(tmp_path / "e2")) == 0
    assert json.load(open(tmp_path / "e2" / "metrics.json"))["split"] == "test"
    assert "no splits of its own" not in capsys.readouterr().err


def test_evaluate_leaves_unlabelled_rows_out_of_the_metrics(trained, mixed_labels, tmp_path):
    """The training manifest's unlabelled rows, evaluated (--split train): scored, not counted."""
    run_dir = trained[0]
    root, extra = mixed_labels
    assert _evaluate(run_dir, root, str(tmp_path / "e"), "--split", "train", "--threshold", "0.5") == 0
    metrics = json.load(open(tmp_path / "e" / "metrics.json"))
    assert metrics["n"] - metrics["n_labelled"] == sum(
        1 for s in discover(root, val_fraction=0.15, seed=0)["train"].samples if s.path in extra)
    assert metrics["n_pos"] + metrics["n_neg"] == metrics["n_labelled"]


def test_challenge_layout_and_class_folders_have_no_explicit_splits(tmp_path):
    from dali_lens.data.sources import explicit_splits
    from dali_lens.data.synthetic import generate_dataset

    generate_dataset(str(tmp_path / "ch"), n=6, size=16, layout="challenge", seed=1)
    assert not explicit_splits(str(tmp_path / "ch"))
    root = write_dataset(str(tmp_path / "f"), "png", n_per_class=2, size=16, splits=("train",))
    assert not explicit_splits(os.path.join(root, "train")) and explicit_splits(root)
