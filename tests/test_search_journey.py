"""The real-search journey across issues 24-26 on data our generator did not write: hand-made float cutouts
(elliptical galaxies with noise, as numpy writes them) in flat folders with no classes.

train with --inject on the unlabelled survey folder -> predict to Parquet as two job-array parts with
embeddings -> --merge -> inspect --similar and --uncertain -> grades back with --labels, fine-tuning the first
run's weights (--weights RUN, --freeze-epochs) at the survey's imbalance (--pos-weight auto)."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from conftest import command_module

SIZE, BANDS = 32, 3


def _galaxies(folder, n: int, seed: int) -> list[str]:
    """``n`` float32 (3, 32, 32) cutouts: a Sersic-like elliptical galaxy of random size, axis ratio, angle and
    colour at the centre, sky noise of sigma 1 (our own drawing, not the generator's)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    y, x = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    names = []
    for i in range(n):
        q, phi, r = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi), rng.uniform(1.5, 4.0)
        u = x * np.cos(phi) + y * np.sin(phi)
        v = -x * np.sin(phi) + y * np.cos(phi)
        light = np.exp(-np.sqrt(u ** 2 * q + v ** 2 / q) / r)
        colour = np.array([0.6, 1.0, 1.3]) * rng.uniform(20, 60)
        img = colour[:, None, None] * light[None] + rng.normal(0, 1, (BANDS, SIZE, SIZE))
        name = f"obj{seed:02d}_{i:04d}.npy"
        np.save(os.path.join(folder, name), img.astype(np.float32))
        names.append(name[:-4])
    return names


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    train_ids = _galaxies(root / "cutouts", 240, seed=1)
    survey_ids = _galaxies(root / "survey", 60, seed=2)
    return root, train_ids, survey_ids


TRAIN = ["--no-progress", "--no-gallery", "--backend", "torchvision", "--workers", "1", "--batch-size", "32",
         "--img-size", "32", "--no-tensorboard"]


def test_inject_predict_parts_similar_grades_and_fine_tune(survey, capsys):
    root, train_ids, survey_ids = survey
    train, predict, inspect = (command_module(n) for n in ("train", "predict", "inspect"))
    run1 = str(root / "run1")
    # 1. no lens at all in the data: every cutout is a background for --inject's arcs
    assert train.main(["--data-root", str(root / "cutouts"), "--out", run1, "--epochs", "8", "--inject", "0.5",
                       "--pixel-scale", "0.2", "--psf-fwhm", "0.9,0.8,0.8", "--inject-snr", "60,150", "--inject-eval",
                       *TRAIN]) == 0
    log = capsys.readouterr().err
    metrics = json.load(open(os.path.join(run1, "metrics.json")))
    assert metrics["metrics"]["roc_auc"] > 0.6, log  # injected val lenses against the real backgrounds
    assert "search" in metrics["metrics"] and os.path.exists(os.path.join(run1, "curves.csv"))
    assert os.path.exists(os.path.join(run1, "injected_catalogue.csv"))

    # 2. the survey as two job-array parts, Parquet with embeddings, then one merged table
    out = str(root / "scores.parquet")
    for i in (0, 1):
        assert predict.main(["--checkpoint", run1, str(root / "survey"), "--out", out, "--shard", f"{i}/2",
                             "--embeddings", "--backend", "torchvision", "--no-progress", "--workers", "0"]) == 0
    assert predict.main(["--merge", "--out", out]) == 0
    import pyarrow.dataset as pads

    table = pads.dataset(out, format="parquet").to_table()
    assert sorted(table.column("id").to_pylist()) == sorted(survey_ids)
    emb = [c for c in table.column_names if c.startswith("emb_")]
    assert len(emb) == 1 and len(table.column(emb[0])[0]) > 1

    # 3. the nearest cutout to one object is itself; the most uncertain ones for the next round of grading
    first = survey_ids[0]
    assert inspect.main([out, str(root / "survey"), "--similar", first, "--top", "5",
                         "--out", str(root / "look-similar")]) == 0
    page = open(os.path.join(root, "look-similar", "index.html"), encoding="utf-8").read()
    assert first in page
    assert inspect.main([out, str(root / "survey"), "--uncertain", "10", "--out", str(root / "look-next")]) == 0

    # 4. grades for ten survey objects (the page's export: id,grade,score) back into training, fine-tuning
    scores = dict(zip(table.column("id").to_pylist(), table.column("score").to_pylist()))
    graded = sorted(scores, key=scores.get)[:10]  # the lowest scored, graded as lenses (3) and non-lenses (0)
    grades = root / "grades.csv"
    with open(grades, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "grade", "score"])
        for k, i in enumerate(graded):
            w.writerow([i, 3 if k % 2 == 0 else 0, f"{scores[i]:.4f}"])
    run2 = str(root / "run2")
    assert train.main(["--data-root", f"sim={root / 'cutouts'}", "--data-root", f"survey={root / 'survey'}",
                       "--labels", str(grades), "--source-weight", "grades=5", "--inject", "0.5",
                       "--pixel-scale", "0.2", "--inject-snr", "30,80", "--weights", run1, "--freeze-epochs", "1",
                       "--pos-weight", "auto", "--out", run2, "--epochs", "2", *TRAIN]) == 0
    config = json.load(open(os.path.join(run2, "config.json")))
    assert [f["sha256"] for f in config["label_files"]] and config["freeze_epochs"] == 1
    assert config["class_ratio"]
