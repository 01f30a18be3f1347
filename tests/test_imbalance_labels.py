"""Survey-like imbalance and grades back into training (issue 24 items 3-4): --pos-weight, --sampler balanced,
--labels (grades and id,label files), --grade1, --label-conflict, --source-weight, several --data-root, the
label files' sha256 on --resume. On data the tests generate; both CPU backends where it matters."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import command_module, resume_after

from dali_lens.data import discover
from dali_lens.data.synthetic import generate_dataset
from dali_lens.pipelines import build_loader
from dali_lens.pipelines.options import LoaderOptions, balanced_order, epoch_order
from dali_lens.trainers.loop import LossWeights

BACKENDS = ["dali-cpu", "torchvision"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """1:9 simulated set, 32 px PNG (train 84: about 8 lenses)."""
    root = str(tmp_path_factory.mktemp("imb") / "sim")
    generate_dataset(root, n=120, size=32, fmt="png", seed=5, lens_fraction=0.1)
    return root


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    """A flat folder of unlabelled cutouts (another seed), renamed s<id>.png: ids not in ``sim``; returns
    (folder, {id: true label})."""
    base = tmp_path_factory.mktemp("survey")
    gen = str(base / "gen")
    generate_dataset(gen, n=40, size=32, fmt="png", seed=6, lens_fraction=0.5, splits=(1.0, 0.0, 0.0))
    flat, truth = str(base / "survey"), {}
    os.makedirs(flat)
    for cls, label in (("lens", 1), ("nonlens", 0)):
        folder = os.path.join(gen, "train", cls)
        for name in sorted(os.listdir(folder)):
            shutil.copy(os.path.join(folder, name), os.path.join(flat, "s" + name))
            truth["s" + os.path.splitext(name)[0]] = label
    return flat, truth


def _train(argv, capsys):
    try:
        rc = command_module("train").main(argv)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


def _common(out, backend="torchvision"):
    return ["--out", str(out), "--backend", backend, "--epochs", "1", "--img-size", "32", "--batch-size", "16",
            "--workers", "1", "--no-progress", "--no-gallery"]


# ------------------------------------------------------------------------------------------------ sampler


def test_balanced_order_draws_classes_equally_and_depends_on_seed_and_epoch_only():
    labels = np.array([1] * 3 + [0] * 97)
    a = balanced_order(labels, 0, 7)
    assert len(a) == 100 and (labels[a] == 1).sum() == 50
    assert np.array_equal(a, balanced_order(labels, 0, 7))
    assert not np.array_equal(a, balanced_order(labels, 1, 7)) and not np.array_equal(a, balanced_order(labels, 0, 8))
    assert np.bincount(a[labels[a] == 1]).tolist() in ([17, 17, 16], [17, 16, 17], [16, 17, 17])  # each lens ~equally
    # DDP: every rank cuts the same balanced list into disjoint equal parts
    parts = [epoch_order(100, 3, LoaderOptions(train=True, sampler="balanced", seed=7, shard_id=r, num_shards=3),
                         labels) for r in range(3)]
    assert [len(p) for p in parts] == [33, 33, 33]
    assert np.array_equal(np.concatenate(parts), balanced_order(labels, 3, 7)[:99])


@pytest.mark.parametrize("backend", BACKENDS)
def test_balanced_sampler_on_both_cpu_backends_yields_the_balanced_order_and_resumes_exactly(sim, backend):
    train = discover(sim)["train"]
    labels = np.array(train.labels)
    assert labels.mean() < 0.15
    opts = LoaderOptions(scales=(32,), batch_size=8, train=True, sampler="balanced", seed=2, num_workers=1)
    loader = build_loader(train, backend=backend, options=opts)
    got = [b["index"].tolist() for b in loader]
    flat = [i for b in got for i in b]
    expected = epoch_order(len(train), 0, opts, labels)[:len(flat)]
    assert flat == expected.tolist(), backend  # the same order on both backends
    assert abs(labels[flat].mean() - 0.5) < 0.1
    head, state, rest = resume_after(lambda: build_loader(train, backend=backend, options=opts), 3)
    epoch1 = epoch_order(len(train), 1, opts, labels)[:len(loader) * 8].reshape(-1, 8).tolist()
    assert head == epoch1[:3] and rest == epoch1[3:], backend  # mid-epoch resume: exactly the remaining batches


def test_balanced_sampler_on_npy_and_fits_through_dali_cpu(tmp_path):
    for fmt in ("npy", "fits"):
        root = str(tmp_path / fmt)
        generate_dataset(root, n=60, size=16, fmt=fmt, seed=1, lens_fraction=0.2)
        train = discover(root)["train"]
        opts = LoaderOptions(scales=(16,), batch_size=6, train=True, sampler="balanced", scaling="none",
                             num_workers=1)
        flat = [i for b in build_loader(train, backend="dali-cpu", options=opts) for i in b["index"].tolist()]
        assert flat == epoch_order(len(train), 0, opts, np.array(train.labels))[:len(flat)].tolist(), fmt


# ---------------------------------------------------------------------------------------------- pos-weight


def test_loss_weights_equal_torchs_pos_weight_and_weigh_samples():
    z, y = torch.randn(10), (torch.arange(10) % 3 == 0).float()
    w, total = LossWeights(None, 4.0, torch.device("cpu")).of(torch.arange(10), y)
    ours = (F.binary_cross_entropy_with_logits(z, y, reduction="none") * w).sum() / total
    torchs = F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.tensor(4.0))
    assert torch.allclose(ours, torchs)
    sample = np.linspace(0.5, 2.0, 20).astype(np.float32)
    w, total = LossWeights(sample, 1.0, torch.device("cpu")).of(torch.arange(10, 20), y)
    assert torch.allclose(w, torch.tensor(sample[10:])) and float(total) == pytest.approx(sample[10:].sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_pos_weight_auto_and_balanced_sampler_state_the_class_ratio(sim, tmp_path, capsys, backend):
    out = tmp_path / "run"
    rc, log = _train(["--data-root", sim, "--pos-weight", "auto", "--sampler", "balanced"] + _common(out, backend),
                     capsys)
    assert rc == 0, log
    cfg = json.loads((out / "config.json").read_text())
    ratio = cfg["class_ratio"]
    n_pos, n_neg = ratio["lens"], ratio["nonlens"]
    assert ratio["pos_weight"] == pytest.approx(n_neg / n_pos, rel=1e-5) and ratio["sampler"] == "balanced"
    assert f"train: class ratio 1:{n_neg / n_pos:.3g} ({n_pos} lens, {n_neg} non-lens); pos-weight" in log
    assert cfg["pos_weight"] == "auto" and cfg["sampler"] == "balanced"


@pytest.mark.parametrize("argv, what", [
    (["--pos-weight", "0"], "--pos-weight"), (["--pos-weight", "x"], "--pos-weight"),
    (["--sampler", "equal"], "--sampler"), (["--grade1", "keep"], "--grade1"),
    (["--grade1-weight", "2"], "--grade1-weight"), (["--label-conflict", "x"], "--label-conflict"),
    (["--source-weight", "sim=-1"], "--source-weight"), (["--source-weight", "nosuch=2"], "nosuch"),
])
def test_bad_imbalance_and_label_options_are_one_error_line(sim, tmp_path, capsys, argv, what):
    rc, log = _train(["--data-root", sim] + argv + _common(tmp_path / "o"), capsys)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and what in errors[0] and "Traceback" not in log, log


# ------------------------------------------------------------------------------------------------- labels


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grades_join_a_survey_folder_and_a_second_root_with_weights(sim, survey, tmp_path, capsys, backend):
    flat, truth = survey
    ids = sorted(truth)
    lenses = [i for i in ids if truth[i] == 1][:4]
    nonlenses = [i for i in ids if truth[i] == 0][:4]
    rows = ["id,grade,score"] + [f"{i},3,0.1" for i in lenses[:3]] + [f"{lenses[3]},1,0.2"] \
        + [f"{i},0,0.9" for i in nonlenses] + ["nosuch1,2,0.5"]
    grades = _write(tmp_path / "graded.csv", "\n".join(rows) + "\n")
    sim_nonlens = sorted(os.listdir(os.path.join(sim, "train", "nonlens")))[0][:-4]
    plain = _write(tmp_path / "plain.csv", f"id,label\n{sim_nonlens},1\n")
    out = tmp_path / "run"
    rc, log = _train(["--data-root", sim, "--data-root", f"graded_root={flat}", "--labels", grades, "--labels",
                      plain, "--grade1", "weak", "--source-weight", "graded=5,sim=1"] + _common(out, backend), capsys)
    assert rc == 0, log
    assert "labels " + grades in log and "8 id(s) matched (4 lens, 4 non-lens)" in log, log
    assert "1 not in the data: nosuch1" in log
    assert "1 contradict the data's own label (the file's label wins" in log
    # the survey's ungraded cutouts stay unlabelled and are left out of training
    assert f"{len(truth) - 8} unlabelled sample(s)" in log
    assert "loss weights: 8 of" in log and "from 1 to 5" in log  # graded at 5, the grade-1 lens at 2.5
    cfg = json.loads((out / "config.json").read_text())
    assert [f["name"] for f in cfg["label_files"]] == ["graded", "plain"]
    import hashlib

    assert cfg["label_files"][0]["sha256"] == hashlib.sha256(open(grades, "rb").read()).hexdigest()
    assert cfg["data_root"] == [sim, f"graded_root={flat}"]
    train_lens = cfg["class_ratio"]["lens"]
    assert train_lens >= 4  # the graded lenses train


def test_label_files_changed_on_resume_are_refused_unless_allowed(sim, survey, tmp_path, capsys):
    flat, truth = survey
    lens = next(i for i in sorted(truth) if truth[i] == 1)
    grades = tmp_path / "grades.csv"
    _write(grades, f"id,grade,score\n{lens},3,0.2\n")
    out = tmp_path / "run"
    base = ["--data-root", sim, "--data-root", flat, "--labels", str(grades)] + _common(out)
    rc, log = _train(base, capsys)
    assert rc == 0, log
    _write(grades, f"id,grade,score\n{lens},2,0.2\n")  # the same file, other content
    rc, log = _train(base + ["--resume", "--epochs", "2"], capsys)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "label" in errors[0] and "sha256" in errors[0], log
    rc, log = _train(base + ["--resume", "--epochs", "2", "--allow-config-change"], capsys)
    assert rc == 0 and "--allow-config-change: continuing" in log, log
    # and a resume without the label file at all is refused too
    rc, log = _train(["--data-root", sim, "--data-root", flat] + _common(out) + ["--resume", "--epochs", "3"], capsys)
    assert rc == 2 and "--labels" in log, log


@pytest.mark.parametrize("text, where", [
    ("id,grade,score\na,7,0.1\n", "line 2"),
    ("id,label\nx,1\ny,maybe\n", "line 3"),
    ("name,value\nx,1\n", "not a label file"),
    ("id,label\nnobody,1\n", "none of its 1 id(s) is in the data"),
    (b"id,label\n\xff\xfe,1\n", "not UTF-8"),
])
def test_bad_label_files_are_one_error_line_naming_the_file(sim, tmp_path, capsys, text, where):
    path = tmp_path / "labels.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    rc, log = _train(["--data-root", sim, "--labels", str(path)] + _common(tmp_path / "o"), capsys)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and str(path) in errors[0] and where in errors[0], log
    assert "Traceback" not in log
    rc, log = _train(["--data-root", sim, "--labels", str(tmp_path / "missing.csv")] + _common(tmp_path / "o"), capsys)
    assert rc == 2 and "missing.csv: no such file" in log, log


def test_label_conflict_data_keeps_the_datas_label(sim, tmp_path, capsys):
    ident = sorted(os.listdir(os.path.join(sim, "train", "nonlens")))[0][:-4]
    path = _write(tmp_path / "l.csv", f"id,label\n{ident},lens\n")
    out = tmp_path / "run"
    rc, log = _train(["--data-root", sim, "--labels", path, "--label-conflict", "data"] + _common(out), capsys)
    assert rc == 0 and "1 contradict the data's own label (the data's label kept" in log, log
    plain = json.loads((tmp_path / "run" / "config.json").read_text())["class_ratio"]
    rc, log = _train(["--data-root", sim] + _common(tmp_path / "plain"), capsys)
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["class_ratio"] == plain


def test_one_data_root_and_old_configs_are_unchanged(sim, tmp_path, capsys):
    from dali_lens.trainers.config import TrainConfig

    cfg = TrainConfig.from_dict({"data_root": sim, "scales": "48,64"})
    assert cfg.data_root == sim and cfg.labels is None and cfg.pos_weight is None and cfg.sampler == "shuffle"
    assert TrainConfig(data_root=[sim]).data_root == sim  # a single --data-root: the plain text, as before
    out = tmp_path / "run"
    rc, log = _train(["--data-root", sim] + _common(out), capsys)
    assert rc == 0 and json.loads((out / "config.json").read_text())["data_root"] == sim
    assert "train: class ratio 1:" in log and "pos-weight 1" in log


def test_gather_names_ids_that_match_several_samples_and_reads_id_at_split(sim, tmp_path):
    from dali_lens.data.labels import gather

    ident = sorted(os.listdir(os.path.join(sim, "test", "nonlens")))[0][:-4]
    path = _write(tmp_path / "g.csv", f"id,grade,score\n{ident},3,0.5\n")
    said = []
    got = gather([f"a={sim}", f"b={sim}"], discover, label_paths=[path], weights_text="b=2", log=said.append)
    assert any("1 name several samples (all labelled: " + ident in s for s in said), said
    assert sum(s.id == ident and s.label == 1 for s in got.splits["test"].samples) == 2
    assert len(got.splits["train"]) == 2 * len(discover(sim)["train"])
    assert set(got.weights.values()) == {2.0}  # root b's samples (the same files: the last weight wins)
    at = _write(tmp_path / "at.csv", f"id,label\n{ident}@test,1\n")
    got = gather(sim, discover, label_paths=[at], log=said.append)
    assert [s.label for s in got.splits["test"].samples if s.id == ident] == [1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_balanced_run_stopped_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, backend):
    import dali_lens.trainers.runner as runner
    from dali_lens.trainers import TrainConfig, run

    data = str(tmp_path / "data")
    generate_dataset(data, n=64, size=32, fmt="png", seed=3, lens_fraction=0.2, source_mag=(20.0, 22.0))
    opts = dict(data_root=data, backend=backend, img_size=32, batch_size=15, epochs=2, checkpoint_every=1,
                workers=1, progress=False, gallery=False, sampler="balanced", pos_weight=2.0)
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    real, saves = runner._Job.save, []

    def save(self, path, *args):
        real(self, path, *args)
        if os.path.basename(path) == "last.pt":
            saves.append(1)
            if len(saves) == 6:  # epoch 2, after its second of three steps
                shutil.copytree(straight, stopped, ignore=shutil.ignore_patterns("run.lock"))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner._Job, "save", save)
        run(TrainConfig(out=straight, **opts), log=lambda *a: None)
    run(TrainConfig(out=stopped, resume=True, **opts), log=lambda *a: None)
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=False)["members"][0]["model"]
            for d in (straight, stopped))
    assert all(torch.equal(a[k], b[k]) for k in a), backend
    hist = [json.load(open(os.path.join(d, "metrics.json")))["history"] for d in (straight, stopped)]
    assert [h["train_loss"] for h in hist[0]] == [h["train_loss"] for h in hist[1]]



def test_a_cr_in_a_crafted_weights_file_name_stays_one_error_line(tmp_path, capsys):
    """A --weights file holding a pickle payload, named with a CR and '<!--<script>': nothing in it runs, the
    run stops with one `error:` line naming the file (the CR shown escaped by cli.one_line), and nothing is
    written outside --out."""
    import torch

    from dali_lens.data.synthetic import generate_dataset

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "PWNED"),))

    data = str(tmp_path / "data")
    generate_dataset(data, n=40, size=16, fmt="png", seed=3)
    evil = tmp_path / "we\rird<!--<script>.pt"
    torch.save({"state_dict": Payload()}, evil)
    before = sorted(os.listdir(tmp_path))
    rc = command_module("train").main(["--data-root", data, "--out", str(tmp_path / "run"), "--weights", str(evil),
                                       "--img-size", "16", "--epochs", "1", "--no-progress", "--no-gallery"])
    err = capsys.readouterr().err
    assert rc == 2 and "\r" not in err and err.count("error:") == 1, err
    line = next(ln for ln in err.splitlines() if ln.startswith("error:"))
    assert "we\\rird<!--<script>.pt" in line and "refused: it holds a Python object (posix.mkdir)" in line
    assert not (tmp_path / "PWNED").exists()
    assert sorted(set(os.listdir(tmp_path)) - {"run"}) == before
