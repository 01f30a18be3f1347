"""Issue 25: arcs painted onto real cutouts in the loaders (dali-cpu and torchvision; dali on a GPU machine).

Blank (all-zero) cutouts make the arc the only signal: through a loader without scaling or normalisation the
output must equal ``injection.arcs`` (the simulator's lensed-source image scaled to the drawn S/N), every scale
must show the same arc, and a resumed loader must repeat the injections exactly. Then the options' bad values
(one ``error:`` line, status 2), the catalogue and evaluate's repeat of an injected test set, ``inspect
--injected``, and a small journey: non-lens cutouts only, ``--inject 0.5``, a model that finds lenses.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS

from dali_lens.data import discover
from dali_lens.pipelines import build_loader
from dali_lens.pipelines.injecting import Injector

SIZE = 32
N_BACK, N_LENS = 20, 4


def _settings(**kw):
    from dali_lens.injection import InjectionSettings

    return InjectionSettings(**{"probability": 0.5, "seed": 11, "pixel_scale": 0.2, **kw})


def _write_blank(root: str, fmt: str, size: int = SIZE, bands: int = 3) -> str:
    """train.csv: N_BACK all-zero non-lenses and N_LENS all-zero 'real lenses' (never painted), as PNG or .npy."""
    from PIL import Image

    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    rows = []
    for k in range(N_BACK + N_LENS):
        name = f"train/{k:03d}.{fmt}"
        if fmt == "png":
            Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(os.path.join(root, name))
        elif fmt == "fits":  # one image HDU per band (read by astropy: DALI's per-sample Python source on the CPU)
            from dali_lens.data.kinds.fits import fits_bytes

            with open(os.path.join(root, name), "wb") as fh:
                fh.write(fits_bytes(np.zeros((bands, size, size), np.float32), extnames=["G", "R", "I"][:bands]))
        else:
            np.save(os.path.join(root, name), np.zeros((bands, size, size), np.float32))
        rows.append([name, int(k >= N_BACK)])
    with open(os.path.join(root, "train.csv"), "w", newline="") as fh:
        csv.writer(fh).writerows([["filepath", "label"], *rows])
    return root


@pytest.fixture(scope="module")
def blank(tmp_path_factory):
    """{kind: train Dataset} of blank cutouts: PNG, .npy, FITS and the .npy set packed into shards."""
    from dali_lens.data.packing import pack

    base = tmp_path_factory.mktemp("blank")
    png = _write_blank(str(base / "png"), "png")
    npy = _write_blank(str(base / "npy"), "npy")
    fits = _write_blank(str(base / "fits"), "fits")
    pack(npy, str(base / "shards"), shard_size=40000, val_fraction=0.0, log=lambda *a, **k: None)
    return {k: discover(p, val_fraction=0.0)["train"] for k, p in
            (("png", png), ("npy", npy), ("fits", fits), ("shards", str(base / "shards")))}


def _loader(ds, backend, inj, scales=(SIZE,), train=False, batch_size=6, **kw):
    return build_loader(ds, backend=backend, scales=scales, batch_size=batch_size, train=train, inject=inj,
                        num_workers=1, dtype="float32", augment=False, **kw)


def _expected(inj: Injector, ds, index: torch.Tensor, epoch: int) -> torch.Tensor:
    """What the loader must show: the injector's arcs where drawn, on backgrounds only, in [0, 1] for 8-bit."""
    arcs, inject, _ = inj.arcs(index, epoch, SIZE)
    back = torch.as_tensor(np.asarray(ds.labels))[index] != 1
    x = arcs * (inject & back).view(-1, 1, 1, 1)
    return x.clamp(0, 255).round() / 255.0 if ds.eight_bit else x


@pytest.mark.parametrize("kind", ["png", "npy", "fits", "shards"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_arc_on_a_blank_cutout_equals_the_injectors_lensed_image(blank, kind, backend):
    ds = blank[kind]
    # 8-bit: the noise in 8-bit units (the arcs reach tens of levels); float: unit noise
    inj = Injector(_settings(), (2.0,) * 3 if ds.eight_bit else (1.0, 0.5, 2.0), eight_bit=ds.eight_bit)
    n_injected = 0
    for batch in _loader(ds, backend, inj):
        got = batch["image"][SIZE].float().cpu()
        want = _expected(inj, ds, batch["index"].cpu(), 0)
        tol = 1e-6 * max(1.0, float(want.abs().max()))
        assert torch.allclose(got, want, atol=tol, rtol=1e-5), float((got - want).abs().max())
        injected = batch["injected"].cpu()
        assert torch.equal(injected, want.flatten(1).abs().amax(1) > 0) or not bool(want.any())
        assert (batch["label"].cpu()[injected] == 1).all()
        real = torch.as_tensor(np.asarray(ds.labels))[batch["index"].cpu()] == 1
        assert not injected[real].any() and not got[real].any()  # real lenses are never painted
        n_injected += int(injected.sum())
    assert 0 < n_injected < N_BACK  # probability 0.5


@pytest.mark.parametrize("kind", ["png", "npy"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_scale_shows_the_same_arc(blank, kind, backend):
    ds = blank[kind]
    inj = Injector(_settings(probability=1.0), (1.0,) * 3, eight_bit=ds.eight_bit)
    for batch in _loader(ds, backend, inj, scales=(16, SIZE)):
        big, small = batch["image"][SIZE].float().cpu(), batch["image"][16].float().cpu()
        down = F.interpolate(big, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
        peak = float(small.abs().max())
        assert peak > 0
        # the same arc at both scales: the small scale is the large one downsampled (resampling tolerance)
        assert float((down - small).abs().max()) <= 0.05 * peak + 2 / 255


@pytest.mark.parametrize("kind", ["png", "npy", "shards"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_resumed_loader_repeats_the_injections_exactly(blank, kind, backend):
    ds = blank[kind]
    inj = Injector(_settings(), (1.0,) * 3, eight_bit=ds.eight_bit)

    def collect(loader, stop=None):
        out = []
        for k, b in enumerate(loader):
            out.append((b["index"].cpu().clone(), b["image"][SIZE].cpu().clone(), b["injected"].cpu().clone()))
            if stop is not None and k + 1 == stop:
                break
        return out

    straight = _loader(ds, backend, inj, train=True, batch_size=4, seed=5)
    epochs = [collect(straight) for _ in range(2)]
    assert sum(int(f.sum()) for e in epochs for _, _, f in e) > 0
    # fresh draws each epoch: some sample's injection differs between epochs 0 and 1
    first = {int(i): (bool(f), float(x.abs().sum())) for e in epochs[:1] for ii, xx, ff in e
             for i, x, f in zip(ii, xx, ff)}
    second = {int(i): (bool(f), float(x.abs().sum())) for ii, xx, ff in epochs[1] for i, x, f in zip(ii, xx, ff)}
    assert any(first[i] != second[i] for i in set(first) & set(second))
    for stop in (2, len(straight)):  # mid-epoch, and at the epoch's last batch
        loader = _loader(ds, backend, inj, train=True, batch_size=4, seed=5)
        collect(loader)
        loader.set_epoch(1)
        head = collect(loader, stop)
        state = loader.state_dict()
        resumed = _loader(ds, backend, inj, train=True, batch_size=4, seed=5)
        resumed.load_state_dict(state)
        rest = collect(resumed) if stop < len(straight) else []
        got = head + rest
        assert len(got) == len(epochs[1])
        for (ia, xa, fa), (ib, xb, fb) in zip(got, epochs[1]):
            assert torch.equal(ia, ib) and torch.equal(fa, fb) and torch.equal(xa, xb)
        if stop == len(straight):  # the epoch after: also as in the uninterrupted run
            resumed.set_epoch(2)
            again = collect(resumed)
            straight.set_epoch(2)
            ref = collect(straight)
            assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(again, ref))


# --- the command: options, bad input, catalogue, evaluate, inspect --------------------------------------------


def _train_cli(args, capsys):
    from dali_lens.commands.train import main

    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors (a value outside its range)
        code = exc.code
    return code, capsys.readouterr()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    from dali_lens.data.synthetic import generate_dataset

    root = str(tmp_path_factory.mktemp("gen") / "data")
    generate_dataset(root, n=80, size=SIZE, fmt="npy", seed=4)
    return root


def _base(epochs: int = 1, backend: str = "torchvision") -> list[str]:
    return ["--img-size", str(SIZE), "--batch-size", "16", "--workers", "1", "--no-progress", "--no-gallery",
            "--epochs", str(epochs), "--backend", backend]


BASE = _base()


@pytest.mark.parametrize("flag, value, words", [
    ("--inject", "1.5", "--inject"), ("--inject", "-0.1", "--inject"),
    ("--inject-theta-e", "-0.5,1", "--inject-theta-e"), ("--inject-snr", "0,10", "--inject-snr"),
    ("--psf-fwhm", "0.9,0", "--psf-fwhm"),
])
def test_bad_injection_values_are_one_error_line(generated, tmp_path, capsys, flag, value, words):
    code, cap = _train_cli(["--data-root", generated, "--out", str(tmp_path / "o"), flag, value, *BASE], capsys)
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], cap.err


def test_a_psf_file_with_the_wrong_band_count_is_one_error_line(generated, tmp_path, capsys):
    psf = str(tmp_path / "psf.npy")
    np.save(psf, np.ones((2, 5, 5), np.float32))  # 2 PSFs for 3 bands
    code, cap = _train_cli(["--data-root", generated, "--out", str(tmp_path / "o"), "--inject", "0.5", "--psf", psf,
                            *BASE], capsys)
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --psf") and "3 band" in lines[0], cap.err
    assert not os.path.exists(str(tmp_path / "o" / "last.pt"))


def test_a_pickled_psf_file_is_refused(generated, tmp_path, capsys):
    psf = str(tmp_path / "psf.npy")
    np.save(psf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, cap = _train_cli(["--data-root", generated, "--out", str(tmp_path / "o"), "--inject", "0.5", "--psf", psf,
                            *BASE], capsys)
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --psf"), cap.err


def test_inject_without_any_background_is_one_error_line(tmp_path, capsys):
    root = str(tmp_path / "lenses")
    os.makedirs(os.path.join(root, "train"))
    with open(os.path.join(root, "train.csv"), "w") as fh:
        fh.write("filepath,label\n")
        for k in range(20):
            np.save(os.path.join(root, "train", f"{k}.npy"), np.ones((3, SIZE, SIZE), np.float32))
            fh.write(f"train/{k}.npy,1\n")
    code, cap = _train_cli(["--data-root", root, "--out", str(tmp_path / "o"), "--inject", "0.5", *BASE], capsys)
    lines = cap.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --inject") and "non-lens" in lines[0]


def test_injection_defaults_are_the_injectors():
    import dataclasses

    from dali_lens.injection import InjectionSettings
    from dali_lens.trainers.config import TrainConfig

    cfg, s = TrainConfig(), InjectionSettings()
    assert cfg.inject == 0.0
    assert (cfg.inject_theta_e, cfg.inject_source_re, cfg.inject_sersic_n, cfg.inject_snr) == \
        (s.theta_e, s.source_re, s.sersic_n, s.snr)
    assert (cfg.inject_offset, cfg.pixel_scale, cfg.psf_fwhm, cfg.inject_colours) == \
        (s.offset, s.pixel_scale, s.psf_fwhm, s.colours)
    assert TrainConfig(inject_theta_e="1,1.5").inject_theta_e == (1.0, 1.5)
    assert dataclasses.replace(cfg, inject=0.3).to_dict()["inject"] == 0.3


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_inject_eval_catalogue_and_evaluate_repeat_the_injected_test_set(generated, tmp_path, capsys, backend):
    from dali_lens.evaluation import evaluate_files

    out = str(tmp_path / "run")
    code, cap = _train_cli(["--data-root", generated, "--out", out, "--inject", "0.5", "--inject-eval",
                            *_base(backend=backend)], capsys)
    assert code == 0, cap.err
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["inject"] == 0.5 and config["inject_eval"] and len(config["injection"]["noise"]) == 3
    rows = list(csv.DictReader(open(os.path.join(out, "injected_catalogue.csv"))))
    assert {r["split"] for r in rows} == {"val", "test"}
    test_rows = {r["file"]: r for r in rows if r["split"] == "test"}
    injected = {f for f, r in test_rows.items() if r["injected"] == "1"}
    assert injected and all(float(test_rows[f]["theta_e"]) > 0 and float(test_rows[f]["snr"]) > 0 for f in injected)
    train_preds = {r["file"]: r for r in csv.DictReader(open(os.path.join(out, "predictions.csv")))}
    for f in injected:  # injected non-lenses were scored as lenses by the run's test pass
        assert train_preds[f]["label"] == "1"
    ev = str(tmp_path / "eval")
    result = evaluate_files(os.path.join(out, "best.pt"), generated, ev, backend=backend, n_boot=0, gallery=False,
                            progress=False)
    eval_preds = {r["file"]: r for r in csv.DictReader(open(os.path.join(ev, "predictions.csv")))}
    assert {f: r["label"] for f, r in eval_preds.items()} == {f: r["label"] for f, r in train_preds.items()}
    for f in eval_preds:  # the same pixels: the same scores
        assert abs(float(eval_preds[f]["score"]) - float(train_preds[f]["score"])) < 1e-4
    assert "injected_theta_e" in result["completeness"] and "injected_snr" in result["completeness"]
    assert sum(r["n_lenses"] for r in result["completeness"]["injected_theta_e"]["ensemble"]) == len(injected)

    from dali_lens.inspection import show_injected

    res = show_injected(os.path.join(out, "predictions.csv"), generated, str(tmp_path / "look"), 5, log=lambda *a: None)
    assert res["injected"] == 5 and os.path.getsize(os.path.join(res["out"], "gallery.png")) > 1000


def test_inspect_injected_needs_an_injected_run(generated, tmp_path, capsys):
    from conftest import command_module

    out = str(tmp_path / "run")
    assert _train_cli(["--data-root", generated, "--out", out, *BASE], capsys)[0] == 0
    capsys.readouterr()
    code = command_module("inspect").main([os.path.join(out, "predictions.csv"), generated, "--injected", "4",
                                           "--out", str(tmp_path / "look")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "--injected" in lines[0] and "not trained with --inject" in lines[0]


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_unlabelled_non_lenses_with_inject_learn_to_find_lenses(tmp_path, capsys, backend):
    """The issue's journey, small: the generator's non-lens cutouts as unlabelled "real" backgrounds (a folder
    without classes), --inject 0.5; the model then ranks a separately generated set's lenses (another seed and
    other settings) above its non-lenses."""
    import glob
    import shutil

    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.evaluation import evaluate_files

    src = str(tmp_path / "src")
    # 250 backgrounds: under the 256 at which torchvision starts worker processes (seconds each to spawn)
    generate_dataset(src, n=250, size=SIZE, fmt="npy", seed=21, lens_fraction=0.0, splits=(1.0, 0.0, 0.0))
    back = str(tmp_path / "backgrounds")
    os.makedirs(back)
    for f in glob.glob(os.path.join(src, "**", "*.npy"), recursive=True):
        shutil.copy(f, os.path.join(back, os.path.basename(f)))
    other = str(tmp_path / "other")
    generate_dataset(other, n=120, size=SIZE, fmt="npy", seed=99, einstein_radius=(1.0, 2.0),
                     splits=(0.1, 0.1, 0.8))
    out = str(tmp_path / "run")
    code, cap = _train_cli(["--data-root", back, "--out", out, "--inject", "0.5", "--inject-eval", "--lr", "3e-3",
                            *_base(epochs=4, backend=backend)], capsys)
    assert code == 0, cap.err
    result = evaluate_files(os.path.join(out, "best.pt"), other, str(tmp_path / "eval"), split="test",
                            backend=backend, n_boot=0, gallery=False, progress=False)
    assert result["ensemble"]["roc_auc"] > 0.65, result["ensemble"]["roc_auc"]


@pytest.mark.parametrize("backend", ["dali-cpu", "torchvision"])
def test_a_run_resumed_mid_epoch_repeats_the_injections(generated, tmp_path, monkeypatch, backend):
    """train --inject stopped right after a mid-epoch checkpoint and resumed: the history and the weights equal
    the uninterrupted run's (the resumed epoch's injections are the same arcs on the same samples)."""
    import dali_lens.trainers.runner as runner
    from dali_lens.trainers import TrainConfig, run

    opts = dict(data_root=generated, backend=backend, img_size=SIZE, batch_size=16, epochs=2, checkpoint_every=1,
                workers=1, progress=False, gallery=False, inject=0.5, inject_eval=True)
    straight = str(tmp_path / "straight")
    run(TrainConfig(out=straight, **opts), log=lambda *a, **k: None)
    stopped, real, saves = str(tmp_path / "stopped"), runner._Job.save, []

    def save(self, path, *args):
        real(self, path, *args)
        saves.append(os.path.basename(path))
        if saves.count("last.pt") == 5:  # epoch 2, step 1 (epoch 1: 3 steps and its end)
            raise KeyboardInterrupt

    monkeypatch.setattr(runner._Job, "save", save)
    with pytest.raises(KeyboardInterrupt):
        run(TrainConfig(out=stopped, **opts), log=lambda *a, **k: None)
    monkeypatch.setattr(runner._Job, "save", real)
    assert torch.load(os.path.join(stopped, "last.pt"), weights_only=False)["loader"]["batches_done"] == 1
    run(TrainConfig(out=stopped, resume=True, **opts), log=lambda *a, **k: None)

    def history(out):
        with open(os.path.join(out, "metrics.json")) as fh:
            return [{k: v for k, v in h.items() if k not in ("train_images_per_s", "data_wait_fraction")}
                    for h in json.load(fh)["history"]]

    assert history(stopped) == history(straight)
    a = torch.load(os.path.join(stopped, "last.pt"), weights_only=False)["members"][0]["model"]
    b = torch.load(os.path.join(straight, "last.pt"), weights_only=False)["members"][0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["png", "npy", "fits", "shards"])
def test_the_gpu_pipeline_with_injection_passes_dalis_schemas(blank, kind):
    """The DALI GPU backend's graph with the painter (defined without a GPU, linted as tests/test_gpu_graphs.py
    does): the painting operator runs on the GPU, its inputs are GPU nodes, and the images leave on the GPU."""
    from test_gpu_graphs import graph_ops, lint

    from dali_lens.pipelines import dali_backend
    from dali_lens.pipelines.options import LoaderOptions

    ds = blank[kind]
    inj = Injector(_settings(), (1.0,) * 3, eight_bit=ds.eight_bit)
    for train in (True, False):
        opts = LoaderOptions(scales=(16, SIZE), batch_size=4, train=train, device_id=0, inject=inj)
        pipe = dali_backend.define_pipeline(ds, opts, True, np.arange(len(ds)))
        assert lint(pipe) == []
        painters = [op for op in graph_ops(pipe) if "PythonFunction" in op._op.schema.Name()]
        assert len(painters) == 1 and painters[0]._op.device == "gpu"
        assert all(node.device == "gpu" for node in pipe._graph_out[:2])
