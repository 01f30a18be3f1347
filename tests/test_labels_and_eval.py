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


def test_unlabelled_rows_are_left_out_of_training(mixed_labels, tmp_path):
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

    said = []
    result = run(TrainConfig(data_root=root, out=str(tmp_path / "run"), epochs=2, batch_size=8, img_size=24,
                             lr=0.05, backend="torchvision", workers=0, progress=False, gallery=False),
                 log=lambda *a: said.append(" ".join(map(str, a))))
    assert any("3 unlabelled sample(s)" in s and "left out of training" in s for s in said), said
    losses = [float(line.split("loss ")[1].split()[0]) for line in said if line.startswith("epoch ")]
    assert len(losses) == 2 and min(losses) >= 0, losses
    assert all(h["val_loss"] >= 0 for h in result["history"])
