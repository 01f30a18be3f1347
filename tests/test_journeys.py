"""Ragged multi-epoch journeys on every source kind and every CPU backend (issue 14).

A train split that is not a multiple of the batch size, several epochs, with and without the mask channel:
loader-level checks for the whole kind x backend matrix (each sample seen once per epoch, the partial batch
dropped), then a smaller set of end-to-end runs through the commands (train 3 epochs -> predict -> evaluate)
and a mid-epoch ``--resume``.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import warnings

import numpy as np
import pytest
import torch

import dali_lens
from dali_lens.data.synthetic import generate_dataset
from dali_lens.pipelines import build_loader, compute_stats

from conftest import BACKENDS, command_module, write_dataset

CPU_BACKENDS = [b for b in BACKENDS if b != "dali"]
KINDS = ("png", "jpeg", "npy", "fits-hdus", "fits-bands", "challenge", "shards")
FLOAT_KINDS = ("npy", "fits-hdus", "fits-bands", "challenge", "shards")
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(kind: str, root: str) -> str:
    """A small dataset of ``kind`` under ``root``; its train split is 25 or 27 samples."""
    if kind in ("png", "jpeg", "npy"):
        return write_dataset(root, kind, n_per_class=13, size=32, bands=3 if kind != "npy" else 2, seed=1)
    if kind == "fits-hdus":  # one band per HDU
        return write_dataset(root, "fits", n_per_class=13, size=32, bands=2, seed=2)
    if kind == "fits-bands":  # one file per band (the challenge's space track: 1 band)
        generate_dataset(root, n=31, size=32, layout="challenge", track="space", seed=3)
        return root
    if kind == "challenge":  # ground track: 4 per-band files per object, raw fluxes, masked pixels = 100
        generate_dataset(root, n=31, size=32, layout="challenge", seed=4)
        return root
    if kind == "shards":
        from dali_lens.pack import pack

        src = write_dataset(root + "-loose", "npy", n_per_class=13, size=32, bands=2, seed=5)
        pack(src, root, shard_size="16K", fsync=False, log=lambda *a: None)
        return root
    raise ValueError(kind)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("journeys")
    return {k: _make(k, str(base / k)) for k in KINDS}


def _ragged_batch(n: int) -> int:
    return next(b for b in (4, 5, 6, 7) if n % b)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind,mask_channel", [(k, False) for k in KINDS] + [(k, True) for k in FLOAT_KINDS])
def test_ragged_epochs_see_each_sample_once(sources, kind, backend, mask_channel):
    """3 epochs of a train split that does not fill its last batch: every epoch yields floor(n/b) batches of
    distinct samples, in a new order each epoch; then evaluation returns every sample exactly once."""
    splits = dali_lens.describe(sources[kind], val_fraction=0.2)
    train = splits["train"]
    n = len(train)
    b = _ragged_batch(n)
    mask = dict(mask_value=100.0, mask_channel=mask_channel) if kind in FLOAT_KINDS else {}
    opts = dali_lens.LoaderOptions(scales=(24,), batch_size=b, train=True, num_workers=1, **mask)
    opts.mean, opts.std = compute_stats(train, opts)
    channels = train.bands + int(mask_channel)
    assert len(opts.mean) == len(opts.std) == channels
    loader = build_loader(train, backend=backend, options=opts)
    assert len(loader) == n // b
    orders = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        seen = []
        for batch in loader:
            x = batch["image"][24]
            assert x.shape[1:] == (channels, 24, 24) and bool(torch.isfinite(x.float()).all())
            seen += batch["index"].tolist()
        assert len(seen) == (n // b) * b, f"epoch {epoch}: {len(seen)} samples"
        assert len(set(seen)) == len(seen) and set(seen) <= set(range(n)), f"epoch {epoch}: repeats"
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]
    evaluation = build_loader(splits["val"], backend=backend,
                              options=dali_lens.LoaderOptions(**{**opts.to_dict(), "train": False, "augment": False}))
    for _ in range(2):
        seen = [i for batch in evaluation for i in batch["index"].tolist()]
        assert sorted(seen) == list(range(len(splits["val"])))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_mid_epoch_resume_on_ragged_data(sources, kind, backend):
    """Interrupted after 2 batches of epoch 2 and restored from its state: the rest of that epoch (or, for
    data DALI cannot checkpoint, the whole epoch again), never a sample twice."""
    from conftest import resume_after

    train = dali_lens.describe(sources[kind], val_fraction=0.2)["train"]
    b = _ragged_batch(len(train))
    mask = dict(mask_value=100.0) if kind in FLOAT_KINDS else {}

    def make():
        return build_loader(train, backend=backend, scales=(24,), batch_size=b, train=True, num_workers=1, **mask)

    ref = make()
    list(ref)
    full = [i for batch in ref for i in batch["index"].tolist()]
    with warnings.catch_warnings():  # data DALI cannot checkpoint warns that it restarts the epoch
        warnings.filterwarnings("ignore", message=".*restarting epoch.*")
        head, state, rest = resume_after(make, 2)
    head = [i for h in head for i in h]
    rest = [i for r in rest for i in r]
    assert state["batches_done"] == 2 and head == full[:2 * b]
    assert rest == full[2 * b:] or rest == full, (head, rest, full)
    assert len(set(rest)) == len(rest)


def _main(module: str, argv: list[str], capsys) -> str:
    """Run a command's main() in this process; it must succeed. Returns what it printed."""
    rc = command_module(module).main(argv)
    out = capsys.readouterr()
    assert rc in (0, None), f"{module} {' '.join(argv)} exited {rc}: {out.err[-2000:]}"
    assert "Traceback" not in out.err + out.out
    return out.out + out.err


# every source kind once, both CPU backends and auto, the mask channel on float data
E2E = [("png", "dali-cpu", []), ("jpeg", "torchvision", []),
       ("npy", "dali-cpu", ["--mask-value", "100", "--mask-channel"]), ("fits-hdus", "auto", []),
       ("fits-bands", "dali-cpu", ["--mask-channel"]), ("challenge", "dali-cpu", ["--mask-channel"]),
       ("challenge", "torchvision", []), ("shards", "torchvision", ["--mask-value", "100", "--mask-channel"])]


@pytest.mark.parametrize("kind,backend,flags", E2E, ids=[f"{k}-{b}" for k, b, _ in E2E])
def test_train_three_ragged_epochs_then_predict_and_evaluate(sources, kind, backend, flags, tmp_path, capsys):
    root = sources[kind]
    out = str(tmp_path / "run")
    n_train = len(dali_lens.describe(root, val_fraction=0.2)["train"])
    said = _main("train", ["--data-root", root, "--out", out, "--epochs", "3", "--img-size", "24",
                           "--batch-size", str(_ragged_batch(n_train)), "--val-fraction", "0.2", "--workers", "1",
                           "--patience", "0", "--no-progress", "--backend", backend, *flags], capsys)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    expected = "torchvision" if backend == "auto" and not torch.cuda.is_available() else backend
    if backend == "auto" and not torch.cuda.is_available():  # FITS on CPU: one decision, logged as taken
        assert "backend torchvision on cpu" in said
        assert json.load(open(os.path.join(out, "config.json")))["backend_resolved"] == "torchvision"
    if kind in ("challenge", "fits-bands"):  # the layout's sentinel is applied by default, and said
        assert "challenge layout recognised: pixels equal to 100 are masked" in said
        assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["config"]["mask_value"] == 100.0
    split = "all" if kind in ("challenge", "fits-bands") else "test"
    data = dali_lens.describe(root)
    n = sum(len(d) for d in data.values()) if split == "all" else len(data["test"])
    _main("predict", ["--checkpoint", out, root, "--split", split, "--out", str(tmp_path / "scores.csv"),
                      "--backend", expected, "--workers", "1", "--no-progress"], capsys)
    with open(tmp_path / "scores.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and len({r["file"] for r in rows}) == n
    _main("evaluate", ["--checkpoint", out, root, "--split", split, "--tta", "--out", str(tmp_path / "eval"),
                       "--workers", "1", "--no-progress"], capsys)
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["n"] == n


def test_one_place_decides_the_backend(sources):
    from dali_lens.pipelines import resolve_backend

    fits = dali_lens.describe(sources["challenge"])["train"]
    png = dali_lens.describe(sources["png"])["train"]
    if torch.cuda.is_available():
        assert resolve_backend("auto", fits) == resolve_backend("auto", png) == "dali"
    else:  # no CUDA: astropy in one DALI thread loses to torchvision's worker processes on FITS
        assert resolve_backend("auto", fits) == "torchvision" and resolve_backend("auto", png) == "dali-cpu"
    assert resolve_backend("dali-cpu", fits) == "dali-cpu"  # an explicit choice is kept


def test_mask_value_default_comes_from_the_layout(sources):
    from dali_lens.trainers import TrainConfig
    from dali_lens.trainers.runner import layout_defaults

    said = []
    challenge = dali_lens.describe(sources["challenge"])["train"]
    assert layout_defaults(TrainConfig(), challenge, said.append).mask_value == 100.0 and said
    assert layout_defaults(TrainConfig(mask_value="none"), challenge, said.append).mask_value is None
    assert layout_defaults(TrainConfig(mask_value=7), challenge, said.append).mask_value == 7.0
    assert layout_defaults(TrainConfig(), dali_lens.describe(sources["npy"])["train"], said.append).mask_value is None
    assert len(said) == 1


def _scaled_copy(src: str, dst: str, factor: float) -> str:
    """The challenge-layout set ``src`` with every flux multiplied by ``factor`` (masked pixels stay 100)."""
    from benchmarks.bench_autoscale import scale_fluxes

    return scale_fluxes(src, dst, factor)


def _auto_batches(root: str, backend: str, **kw):
    from dali_lens.pipelines import estimate_noise

    ds = dali_lens.describe(root)["train"]
    opts = dali_lens.LoaderOptions(scales=(32,), batch_size=8, scaling="auto", mask_value=100.0, num_workers=1,
                                   **kw)
    opts.noise_sigma = estimate_noise(ds, opts)
    opts.mean, opts.std = compute_stats(ds, opts)
    from conftest import collect

    return opts, collect(build_loader(ds, backend=backend, options=opts))[2][32]


@pytest.mark.parametrize("mask_channel", [False, True])
def test_auto_scaling_is_the_same_on_every_backend(sources, mask_channel):
    ref = None
    for backend in CPU_BACKENDS:
        _, x = _auto_batches(sources["challenge"], backend, mask_channel=mask_channel)
        assert x.shape[1] == 4 + int(mask_channel) and bool(torch.isfinite(x).all())
        if ref is None:
            ref = x
        else:
            assert torch.allclose(x, ref, atol=1e-4), (x - ref).abs().max()


def test_auto_scaling_does_not_depend_on_the_flux_unit(sources, tmp_path):
    """The same sky in another unit (x 1e6, x 1e-3) gives the same normalised batches with no flags."""
    opts, ref = _auto_batches(sources["challenge"], "torchvision")
    for factor in (1e6, 1e-3):
        scaled = _scaled_copy(sources["challenge"], str(tmp_path / f"x{factor:g}"), factor)
        o, x = _auto_batches(scaled, "torchvision")
        np.testing.assert_allclose(np.array(o.noise_sigma) / np.array(opts.noise_sigma), factor, rtol=1e-3)
        assert torch.allclose(x, ref, atol=2e-3), (factor, (x - ref).abs().max())


def test_checkpoints_without_a_noise_estimate_load_as_before(sources, tmp_path, capsys):
    """A checkpoint from before scaling 'auto' (no noise_sigma, its scaling named in its config) keeps it."""
    from dali_lens.inference import load_ensemble, loader_options

    out = str(tmp_path / "run")
    _main("train", ["--data-root", sources["npy"], "--out", out, "--epochs", "1", "--img-size", "24",
                    "--batch-size", "8", "--workers", "1", "--no-progress"], capsys)
    ens = load_ensemble(out)
    assert ens.pixels.scaling == "auto" and len(ens.pixels.noise_sigma) == 2
    assert loader_options(ens).noise_sigma == ens.pixels.noise_sigma
    state = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    del state["version"], state["pixels"]  # a version-1 checkpoint (before #16): config, norm and kind
    del state["norm"]["noise_sigma"]
    state["config"]["scaling"] = "none"
    torch.save(state, str(tmp_path / "old.pt"))
    old = load_ensemble(str(tmp_path / "old.pt"))
    assert old.pixels.scaling == "none" and old.pixels.noise_sigma is None and loader_options(old).noise_sigma is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_backend_this_machine_lacks_is_one_line_and_status_2(sources, tmp_path, capsys):
    from dali_lens.commands import train

    rc = train.main(["--data-root", sources["npy"], "--out", str(tmp_path / "r"), "--backend", "dali"])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA GPU" in err and "Traceback" not in err
