"""``python -m dali_lens.evaluate`` on a really trained ensemble: metrics, intervals, completeness, plots.

One small ensemble (two CNN members at 32 and 24 px, temperature fusion) is trained for one epoch with the
real trainer on generated data; evaluation uses the real DALI CPU backend. No mocks.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from dali_lens import evaluate as E
from dali_lens.data.synthetic import generate_dataset
from dali_lens.inference import load_ensemble, loader_options, score_batches
from dali_lens.metrics import expected_contamination, roc_auc, tpr0, tpr10
from dali_lens.pipelines import build_loader
from dali_lens.checkpoint import Checkpoint
from dali_lens.data.inputs import gather_inputs

MEMBERS = ["small_cnn@32#0", "small_cnn@24#1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from dali_lens.trainers.config import TrainConfig
    from dali_lens.trainers.runner import run as train

    root = tmp_path_factory.mktemp("evaluate")
    data = str(root / "data")
    generate_dataset(data, n=300, size=32, seed=3)
    out = str(root / "run")
    cfg = TrainConfig(data_root=data, out=out, epochs=1, batch_size=32, trainer="ensemble",
                      members="small_cnn:32:0,small_cnn:24:1", fusion="temperature", progress=False,
                      backend="dali-cpu", max_shift=0, patience=0)
    result = train(cfg, log=lambda *a, **k: None)
    return {"root": root, "data": data, "run": out, "train_result": result}


def evaluate(args: list[str]) -> int:
    return E.main(args + ["--no-progress", "--backend", "dali-cpu"])


def load(out: str) -> tuple[dict, list[dict]]:
    with open(os.path.join(out, "metrics.json")) as fh:
        metrics = json.load(fh)
    with open(os.path.join(out, "predictions.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    return metrics, rows


@pytest.fixture(scope="module")
def default_eval(run):
    out = str(run["root"] / "eval")
    assert evaluate(["-c", run["run"], run["data"], "--out", out, "--n-boot", "300"]) == 0
    return out


def test_outputs_and_metrics(run, default_eval):
    m, rows = load(default_eval)
    assert m["split"] == "test" and m["n"] == 45 and m["n_pos"] + m["n_neg"] == 45
    assert m["fusion"] == "temperature"  # the training run's fusion is the default
    assert set(m["members"]) == set(MEMBERS)
    assert [i["temperature"] != 1.0 for i in m["members_info"]] == [True, True]
    y = np.array([int(r["label"]) for r in rows])
    s = np.array([float(r["score"]) for r in rows])
    for name, rep in [("ensemble", m["ensemble"])] + list(m["members"].items()):
        scores = s if name == "ensemble" else np.array([float(r[f"score_{name}"]) for r in rows])
        # metrics.json agrees with predictions.csv and the metrics module
        assert rep["roc_auc"] == pytest.approx(roc_auc(y, scores), abs=1e-6)
        assert rep["tpr0"] == pytest.approx(tpr0(y, scores), abs=1e-9)
        assert rep["tpr10"] == pytest.approx(tpr10(y, scores), abs=1e-9)
        for k in ("roc_auc", "tpr0", "tpr10"):
            lo, hi = rep["ci"][k]
            assert 0 <= lo <= hi <= 1
        assert rep["ci"]["roc_auc"][0] <= rep["roc_auc"] <= rep["ci"]["roc_auc"][1]
        c = rep["contamination"]
        ref = expected_contamination(y, scores, 0.5, 1e-3)
        assert c["prior"] == 1e-3 and c["tpr"] == pytest.approx(ref["tpr"]) and c["fpr"] == pytest.approx(ref["fpr"])
    # the same test-split metrics as the training run wrote (same weights, temperatures and fusion)
    assert m["ensemble"]["roc_auc"] == pytest.approx(run["train_result"]["metrics"]["roc_auc"], abs=1e-6)
    # member spread column
    p = np.array([[float(r[f"score_{k}"]) for k in MEMBERS] for r in rows])
    np.testing.assert_allclose([float(r["member_std"]) for r in rows], p.std(1), atol=2e-7)
    np.testing.assert_allclose(s, p.mean(1), atol=2e-7)  # temperature fusion: mean of calibrated members


def test_completeness_tables_and_plots(default_eval):
    m, rows = load(default_eval)
    files = set(os.listdir(default_eval))
    assert {"metrics.json", "predictions.csv", "roc.png"} <= files
    for col in ("einstein_area", "numb_pix_lensed_image", "flux_lensed_image_in_sigma"):
        assert col in m["completeness"], sorted(m["completeness"])
        table = m["completeness"][col]["ensemble"]
        assert sum(r["n_lenses"] for r in table) == m["n_pos"]
        for r in table:
            assert r["lo"] <= r["hi"] and 0 <= r["n_found"] <= r["n_lenses"]
        assert set(m["completeness"][col]["members"]) == set(MEMBERS)
        assert f"completeness_{col}.png" in files
    found = sum(r["n_found"] for r in m["completeness"]["einstein_area"]["ensemble"])
    assert found == m["ensemble"]["tp"]
    assert not any(f.endswith(".tmp") for f in files), "no temporary files left behind"
    assert {f for f in files if f.startswith(".")} == {".dali-lens-outputs.json"}  # only its record of its outputs


def test_fusion_tta_and_columns(run, tmp_path):
    out = str(tmp_path / "logit")
    assert evaluate(["-c", run["run"], run["data"], "--out", out, "--fusion", "mean_logit", "--n-boot", "0",
                     "--completeness-columns", "einstein_area", "--threshold", "0.3", "--prior", "0.01"]) == 0
    m, rows = load(out)
    assert m["fusion"] == "mean_logit" and m["threshold"] == 0.3 and list(m["completeness"]) == ["einstein_area"]
    assert m["ensemble"]["contamination"]["prior"] == 0.01
    p = np.clip(np.array([[float(r[f"score_{k}"]) for k in MEMBERS] for r in rows]), 1e-12, 1 - 1e-12)
    z = np.log(p / (1 - p)).mean(1)  # members are uncalibrated sigmoid(z) without temperature fusion
    np.testing.assert_allclose([float(r["score"]) for r in rows], 1 / (1 + np.exp(-z)), atol=1e-5)
    out_tta = str(tmp_path / "tta")
    assert evaluate(["-c", run["run"], run["data"], "--out", out_tta, "--fusion", "mean_logit", "--tta",
                     "--n-boot", "0", "--completeness-columns", "einstein_area"]) == 0
    m_tta, rows_tta = load(out_tta)
    assert m_tta["tta"] is True
    diff = np.abs(np.array([float(r["score"]) for r in rows_tta]) - np.array([float(r["score"]) for r in rows]))
    assert diff.max() > 1e-4  # the 8 views change the scores


def test_two_checkpoints_form_one_ensemble(run, tmp_path):
    out = str(tmp_path / "two")
    best, last = os.path.join(run["run"], "best.pt"), os.path.join(run["run"], "last.pt")
    assert evaluate(["-c", best, "-c", last, run["data"], "--split", "val", "--out", out, "--n-boot", "50",
                     "--completeness-columns", "einstein_area"]) == 0
    m, rows = load(out)
    assert m["split"] == "val" and len(m["members"]) == 4 and len(set(m["members"])) == 4
    assert len(rows[0]) == 4 + 4 + 1


def test_normalisation_correction_is_exact(run, tmp_path):
    """A checkpoint with other mean/std scores the same alone or behind another checkpoint's loader."""
    ck = Checkpoint.load(os.path.join(run["run"], "best.pt"))
    ck.pixels = dataclasses.replace(ck.pixels, mean=(0.1, 0.3, 0.2), std=(0.2, 0.1, 0.3))
    ck.members = ck.members[:1]
    other = str(tmp_path / "other_norm.pt")
    ck.save(other)
    ds = gather_inputs([run["data"]], "test", val_fraction=0.15)

    def logits(ckpts):
        ens = load_ensemble(ckpts, "cpu")
        loader = build_loader(ds, backend="dali-cpu", options=loader_options(ens, 16))
        parts = list(score_batches(ens, loader))
        return ens, {k: np.concatenate([p[2][k] for p in parts]) for k in ens.names}

    alone_ens, alone = logits([other])
    both_ens, both = logits([run["run"], other])
    assert both_ens.pixels.mean != alone_ens.pixels.mean
    name_alone = alone_ens.names[0]
    name_both = both_ens.names[-1]
    np.testing.assert_allclose(both[name_both], alone[name_alone], atol=1e-4)


def test_refuses_to_overwrite(run, default_eval, capsys):
    before = os.stat(os.path.join(default_eval, "metrics.json")).st_mtime_ns
    assert evaluate(["-c", run["run"], run["data"], "--out", default_eval]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and default_eval in err and "--overwrite" in err and "Traceback" not in err
    assert os.stat(os.path.join(default_eval, "metrics.json")).st_mtime_ns == before
    assert evaluate(["-c", run["run"], run["data"], "--out", default_eval, "--overwrite", "--n-boot", "0",
                     "--completeness-columns", "einstein_area"]) == 0
    assert sorted(f for f in os.listdir(default_eval) if f.startswith("completeness_")) == \
        ["completeness_einstein_area.png"]


def test_bad_inputs(run, tmp_path, capsys):
    def err() -> str:
        text = capsys.readouterr().err.strip()
        assert "Traceback" not in text
        return text.splitlines()[-1]

    out = str(tmp_path / "o")
    missing = str(tmp_path / "missing")
    assert evaluate(["-c", run["run"], missing, "--out", out]) == 2
    assert err().startswith(f"error: {missing}")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    assert evaluate(["-c", str(bad), run["data"], "--out", out]) == 2
    assert str(bad) in err()
    assert evaluate(["-c", run["run"], run["data"], "--split", "nosuch", "--out", out]) == 2
    assert "nosuch" in err()
    assert evaluate(["-c", run["run"], run["data"], "--out", out, "--completeness-columns", "colour"]) == 2
    assert "colour" in err()
    unlabelled = tmp_path / "unlabelled.csv"
    with open(os.path.join(run["data"], "test.csv"), newline="") as fh:
        first = next(csv.DictReader(fh))["filepath"]
    unlabelled.write_text(f"filepath\n{os.path.join(run['data'], first)}\n")
    assert evaluate(["-c", run["run"], str(unlabelled), "--out", out]) == 2
    assert "no labels" in err()
    assert not os.path.exists(out)


def test_help_reads_like_documentation(capsys):
    with pytest.raises(SystemExit) as exc:
        E.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for words in ("Examples:", "TPR0", "completeness", "--n-boot", "--prior", "--overwrite", "--fusion"):
        assert words in text


def test_evaluate_is_a_thin_command_over_evaluate_files():
    """The command's every option is a typed keyword of the library call ``evaluation.evaluate_files`` with the
    same default (no argparse Namespace below the command); ``evaluate.py`` held the whole run before."""
    import inspect

    from dali_lens.evaluation import evaluate_files

    params = inspect.signature(evaluate_files).parameters
    assert list(params)[:3] == ["checkpoint", "data", "out"]
    for action in E.parser()._actions:
        if action.dest in ("help", "checkpoint", "data", "out"):
            continue
        p = params[action.dest]
        assert p.kind is inspect.Parameter.KEYWORD_ONLY and p.default == action.default, action.dest


def test_predict_and_evaluate_share_one_input_setup():
    """One input setup (score_inputs.load_scoring_inputs): neither run loads the ensemble or gathers DATA itself."""
    import ast

    import dali_lens.evaluation
    import dali_lens.predictions

    for mod in (dali_lens.evaluation, dali_lens.predictions):
        called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
                  for n in ast.walk(ast.parse(open(mod.__file__, encoding="utf-8").read())) if isinstance(n, ast.Call)}
        assert "load_scoring_inputs" in called, mod.__name__
        assert not called & {"load_ensemble", "gather_inputs", "check_dataset", "drop_bad"}, mod.__name__


@pytest.mark.parametrize("option,value,flag", [("threshold", 1.5, "--threshold"), ("prior", 1.0, "--prior"),
                                                ("bins", 0, "--bins"), ("batch_size", 0, "--batch-size")])
def test_evaluate_files_checks_every_range_before_any_work(tmp_path, option, value, flag):
    """The library call holds its options to the flags' documented ranges before it reads anything (a missing
    checkpoint and DATA are not reached) and writes nothing."""
    from dali_lens.choices import OptionRangeError
    from dali_lens.evaluation import evaluate_files

    out = tmp_path / "eval"
    with pytest.raises(OptionRangeError, match=flag):
        evaluate_files(str(tmp_path / "no.pt"), str(tmp_path / "nodata"), str(out), **{option: value})
    assert not out.exists()
