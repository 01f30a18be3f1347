"""One scoring path: the trainer's test pass and ``predict`` give the same scores for the same split.

A real ensemble (two small CNNs at two scales, temperature fusion) trained for one epoch on PNG cutouts (8-bit:
normalised on the model's device), scored by the trainer (its predictions.csv) and by ``predict`` on the
run directory, with another batch size, without and with test-time augmentation.
"""
from __future__ import annotations

import csv

import numpy as np
import pytest

from conftest import write_dataset
from dali_lens.predictions import predict_files
from dali_lens.scoring import fuse, probabilities
from dali_lens.trainers import TrainConfig, run


def _scores(path: str) -> tuple[dict[str, list[float]], list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return {r[0]: [float(v) for v in r[3:]] for r in rows[1:]}, rows[0]


@pytest.mark.parametrize("tta", [False, True])
def test_trainer_test_pass_and_predict_agree(tmp_path, tta):
    data = write_dataset(str(tmp_path / "data"), "png", n_per_class=6, size=20, splits=("train", "val", "test"))
    out = str(tmp_path / "run")
    run(TrainConfig(data_root=data, out=out, trainer="ensemble", members="small_cnn:16:0,small_cnn:24:1",
                    fusion="temperature", epochs=1, batch_size=8, tta=tta, backend="dali-cpu", workers=1,
                    progress=False, gallery=False), log=lambda *a, **k: None)
    pred = str(tmp_path / "predict.csv")
    assert predict_files([out], [data], pred, split="test", backend="dali-cpu", tta=tta, batch_size=5, workers=1,
                         progress=False) == 0
    trained, head_t = _scores(f"{out}/predictions.csv")
    predicted, head_p = _scores(pred)
    assert head_t == head_p and len(head_t) == 4 + 2 + 1 and set(trained) == set(predicted) and len(trained) == 12
    for f in trained:  # the trainer writes 6 decimals, predict 7 significant digits
        np.testing.assert_allclose(predicted[f], trained[f], atol=1.5e-6, err_msg=f)


def test_probabilities_fuse_and_spread():
    logits = {"a": np.array([0.0, 2.0], np.float32), "b": np.array([1.0, -1.0], np.float32)}
    score, probs, spread = probabilities(logits, "temperature", {"a": 2.0})
    np.testing.assert_allclose(probs["a"], 1 / (1 + np.exp(-np.array([0.0, 1.0]))))
    np.testing.assert_allclose(score, (probs["a"] + probs["b"]) / 2)
    np.testing.assert_allclose(spread, np.abs(probs["a"] - probs["b"]) / 2)
    np.testing.assert_allclose(fuse(logits, "mean_logit"), 1 / (1 + np.exp(-np.array([0.5, 0.5]))))
    with pytest.raises(ValueError, match="unknown fusion"):
        fuse(logits, "max")


def test_fusion_and_numpy_reader_have_one_check_each_reading_choices():
    """One check per choice, reading ``choices.py``: a fusion outside ``choices.FUSIONS`` is refused by
    ``scoring.check_fusion`` (which ``fuse``, ``probabilities`` and ``Ensemble.probabilities`` go through), a numpy
    reader outside ``choices.NUMPY_READERS`` by ``LoaderOptions``; each message names the tuple. (Before: fuse had
    its own hard-coded list, inference a second check, and the reader values were written out in two modules.)"""
    from dali_lens import choices
    from dali_lens.pipelines.options import LoaderOptions
    from dali_lens.scoring import check_fusion

    logits = {"a": np.zeros(2), "b": np.ones(2)}
    for call in (lambda: check_fusion("max"), lambda: fuse(logits, "max"), lambda: probabilities(logits, "max")):
        with pytest.raises(ValueError) as err:
            call()
        assert str(choices.FUSIONS) in str(err.value)
    for how in choices.FUSIONS:
        assert probabilities(logits, how)[0].shape == (2,)
    with pytest.raises(ValueError) as err:
        LoaderOptions(numpy_reader="gds")
    assert str(choices.NUMPY_READERS) in str(err.value)
    for reader in choices.NUMPY_READERS:
        assert LoaderOptions(numpy_reader=reader).numpy_reader == reader
