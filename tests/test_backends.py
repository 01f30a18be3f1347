"""The loader backends as a registry: the built-in ones, batch transforms around every backend, a backend
registered by a test alone, and build_loader leaving the caller's options as they were."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import BACKENDS, collect, write_dataset
from dali_lens import choices
from dali_lens.data import discover
from dali_lens.pipelines import (BackendError, LoaderOptions, backend_names, build_loader, register_backend,
                                 register_batch_transform, resolve_backend, unregister_backend)
from dali_lens.pipelines.batch import BatchChecker


def test_builtin_backends_are_the_choices_of_backend():
    assert choices.BACKENDS == ("auto", *backend_names())


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from dali_lens.pack import pack

    root = tmp_path_factory.mktemp("backends")
    src = write_dataset(str(root / "png"), "png", n_per_class=4, size=32, bands=3, splits=("test",))
    pack(src, str(root / "packed"), shard_size="24K", fsync=False, log=lambda *a: None)
    return src, str(root / "packed")


def _plus_1000(batch):
    batch["image"] = {s: x + 1000.0 for s, x in batch["image"].items()}
    return batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["loose", "packed"])
def test_batch_transforms_wrap_every_backend(packed, backend, which):
    # packed shards on torchvision skipped the transforms before (their loader was returned unwrapped)
    register_batch_transform("plus-1000", _plus_1000)
    ds = discover(packed[which == "packed"])["test"]
    plain = collect(build_loader(ds, backend=backend, scales=(32,), batch_size=4))[2][32]
    moved = collect(build_loader(ds, backend=backend, scales=(32,), batch_size=4, transforms=("plus-1000",)))[2][32]
    assert torch.allclose(moved, plain + 1000.0)


def test_build_loader_leaves_the_callers_options_unchanged(packed):
    # before: the too-small training set shrank the caller's batch_size (64 -> 8) in place
    ds = discover(packed[0])["test"]
    opts = LoaderOptions(scales=(32,), batch_size=64, train=True)
    with pytest.warns(UserWarning, match="smaller batch"):
        loader = build_loader(ds, backend="torchvision", options=opts)
    assert opts.batch_size == 64 and loader.opts.batch_size == len(ds)


class ToyLoader:
    """Every sample of the dataset in file order, read by its kind and resized with torch (no augmentation)."""

    def __init__(self, dataset, opts):
        self.dataset, self.opts = dataset, opts
        self.check = BatchChecker(dataset, "cpu")

    def __len__(self):
        return -(-len(self.dataset) // self.opts.batch_size)

    def set_epoch(self, epoch):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def __iter__(self):
        kind = self.dataset.data_kind
        for start in range(0, len(self.dataset), self.opts.batch_size):
            index = torch.arange(start, min(start + self.opts.batch_size, len(self.dataset)))
            x = torch.stack([torch.from_numpy(np.asarray(kind.decode_torch(self.dataset, int(i)), np.float32))
                             for i in index]) / 255.0
            images = {s: torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear") for s in self.opts.scales}
            yield self.check(images, index)


def test_a_backend_registered_alone_loads_contract_batches(packed):
    ds = discover(packed[0])["test"]
    register_backend("toy", available=lambda: True, factory=ToyLoader)
    register_backend("toy-off", available=lambda: "needs a toy box; use 'toy'", factory=ToyLoader)
    try:
        assert resolve_backend("toy", ds) == "toy"
        with pytest.raises(BackendError, match="backend 'toy-off' needs a toy box"):
            build_loader(ds, backend="toy-off")
        register_batch_transform("plus-1000", _plus_1000)
        loader = build_loader(ds, backend="toy", scales=(16, 32), batch_size=3, transforms=("plus-1000",))
        assert len(loader) == 3
        batches = list(loader)
        for b in batches:
            assert set(b) == {"image", "label", "index"} and b["label"].dtype == b["index"].dtype == torch.long
            assert {s: tuple(t.shape[1:]) for s, t in b["image"].items()} == {16: (3, 16, 16), 32: (3, 32, 32)}
            assert b["label"].tolist() == [ds.labels[i] for i in b["index"].tolist()]
            assert float(b["image"][32].min()) >= 1000.0  # the transform ran around the toy backend too
        assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(len(ds)))
    finally:
        unregister_backend("toy")
        unregister_backend("toy-off")
    with pytest.raises(BackendError, match="unknown backend 'toy'"):
        resolve_backend("toy")


def test_an_unusable_backend_is_one_backend_error_at_every_door(tmp_path, capsys):
    # before: predict_files and evaluate re-wrapped it as PredictError / EvaluateError (and train as ValueError)
    from dali_lens import pipelines
    from dali_lens.evaluate import main as evaluate_main
    from dali_lens.commands.predict import main as predict_main
    from dali_lens.predictions import predict_files
    from dali_lens.commands.train import main as train_main

    saved = pipelines._BACKENDS["dali-cpu"]
    register_backend("dali-cpu", available=lambda: "needs a test's permission", factory=saved.factory)
    try:
        with pytest.raises(BackendError, match="'dali-cpu' needs a test's permission") as caught:
            predict_files(["no.pt"], [str(tmp_path)], str(tmp_path / "p.csv"), backend="dali-cpu", progress=False)
        assert type(caught.value) is BackendError
        for main, args in ((train_main, ["--data-root", str(tmp_path)]),
                           (predict_main, ["-c", "no.pt", str(tmp_path), "--out", str(tmp_path / "p.csv")]),
                           (evaluate_main, ["-c", "no.pt", str(tmp_path), "--out", str(tmp_path / "ev")])):
            assert main(args + ["--backend", "dali-cpu"]) == 2
            assert capsys.readouterr().err.strip() == "error: backend 'dali-cpu' needs a test's permission"
    finally:
        pipelines._BACKENDS["dali-cpu"] = saved
