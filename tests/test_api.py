"""The public API: docs examples run as written (README blocks: test_readme.py); the loader works under PyTorch Lightning."""
from __future__ import annotations

import dataclasses
import os
import re

import pytest
import torch

import dali_lens

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_blocks(path: str, marker: str) -> list[str]:
    text = open(os.path.join(HERE, path)).read()
    return re.findall(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, flags=re.S)


def test_public_surface_is_small_and_documented():
    assert dali_lens.__version__ == open(os.path.join(HERE, "dali_lens", "_version.py")).read().split('"')[1]
    for name in dali_lens.__all__:
        obj = getattr(dali_lens, name)
        if callable(obj):
            assert obj.__doc__, f"{name} needs a docstring"
    assert "0.1.0" in open(os.path.join(HERE, "CHANGELOG.md")).read()


def test_extending_examples_run(tmp_path, monkeypatch):
    blocks = code_blocks("docs/extending.md", "docs-test")
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    # what the examples register (a backend, a trainer, a transform) stays in this test: the other tests see the
    # built-in registries (test_backends compares them with the --backend choices)
    from dali_lens import pipelines
    from dali_lens.trainers import base

    saved = [(table, dict(table)) for table in (pipelines._BACKENDS, pipelines._TRANSFORMS, base.TRAINERS)]
    scope = {"__name__": "__docs__"}
    try:
        for block in blocks:
            exec(compile(block, "docs/extending.md", "exec"), scope)
    finally:
        for table, before in saved:
            table.clear()
            table.update(before)
    assert os.path.exists(tmp_path / "noisy-run" / "metrics.json")
    assert os.path.exists(tmp_path / "seeds-run" / "best.pt") and os.path.exists(tmp_path / "seeds-scores.csv")


def test_unknown_batch_transform_is_a_clear_error(make_dataset):
    ds = dali_lens.describe(make_dataset("png", n_per_class=4))["test"]
    with pytest.raises(ValueError, match="unknown batch transform"):
        dali_lens.build_loader(ds, scales=(32,), batch_size=4, transforms=("nope",))


def test_pytorch_lightning_fit_one_epoch(make_dataset, tmp_path):
    lightning = pytest.importorskip("lightning")
    splits = dali_lens.describe(make_dataset("png", n_per_class=12), val_fraction=0.25)
    train = dali_lens.build_loader(splits["train"], backend="dali-cpu", scales=(32,), batch_size=6, train=True)
    val = dali_lens.build_loader(splits["val"], backend="dali-cpu", scales=(32,), batch_size=6)
    seen = []

    class Finder(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten(), torch.nn.Linear(4, 1))

        def training_step(self, batch, _):
            seen.extend(batch["index"].tolist())
            logits = self.net(batch["image"][32]).squeeze(1)
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())

        def validation_step(self, batch, _):
            self.log("val_loss", self.training_step(batch, _))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                default_root_dir=str(tmp_path))
    before = len(seen)
    trainer.fit(Finder(), train_dataloaders=train, val_dataloaders=val)
    n_train = len(splits["train"])
    assert trainer.current_epoch == 1
    assert len(seen) - before >= (n_train // 6) * 6 - 12  # a full epoch of training batches
    assert set(seen) <= set(range(n_train))


def test_train_and_predict_are_the_library_functions_whatever_was_imported():
    # before: the command modules made themselves callable: signature (**options) / (*args, **kwargs), the CLI's
    # docstring in help()
    import inspect
    import pydoc

    import dali_lens.commands.predict  # noqa: F401  (the commands of the same names)
    import dali_lens.commands.train  # noqa: F401
    from dali_lens import api
    from dali_lens.trainers.config import TrainConfig

    assert dali_lens.train is api.train and dali_lens.predict is api.predict
    params = inspect.signature(dali_lens.train).parameters
    assert list(params) == [f.name for f in dataclasses.fields(TrainConfig)]
    for f in dataclasses.fields(TrainConfig):  # the written-out signature is TrainConfig's, type and default
        # the typed list options (tuples) also take the command line's text: "tuple[int, ...] | str"
        typ = f"{f.type} | str" if f.type.startswith("tuple[") else f.type
        assert params[f.name].annotation == typ, f.name
        if f.name == "members":  # written as its text (MemberSpec would load the trainers): the same members
            assert TrainConfig(members=params[f.name].default).members == f.default
        else:
            assert params[f.name].default == f.default, f.name
    assert list(inspect.signature(dali_lens.predict).parameters)[:3] == ["checkpoint", "data", "out"]
    text = pydoc.render_doc(dali_lens.train, renderer=pydoc.plaintext)
    assert re.search(r"img_size: '?int'? = 64", text) and "Train a lens finder like" in text
    assert "--data-root" not in text  # the command's description (its flags) is not the function's
    assert "Score ``data`` with one checkpoint" in pydoc.render_doc(dali_lens.predict, renderer=pydoc.plaintext)


@pytest.mark.parametrize("name", ["train", "predict"])
def test_the_python_m_shims_only_run_their_command(name):
    """``dali_lens/<name>.py`` runs its command under ``python -m`` and refuses to be imported: an import would
    bind the module over the library function ``dali_lens.<name>`` (later calls: 'module' is not callable)."""
    import importlib
    import subprocess
    import sys

    with pytest.raises(ImportError, match=f"dali_lens.commands.{name}"):
        importlib.import_module(f"dali_lens.{name}")
    assert getattr(dali_lens, name) is getattr(importlib.import_module("dali_lens.api"), name)
    proc = subprocess.run([sys.executable, "-m", f"dali_lens.{name}", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and f"usage: python -m dali_lens.{name}" in proc.stdout


def test_import_dali_lens_loads_neither_torch_nor_dali():
    """`import dali_lens` (and dali_lens.data.io, which the benchmarks' parent processes use to write their
    results) imports torch and DALI only when a name that needs them is used: a parent that samples its
    children's memory must not map torch's libraries itself."""
    import subprocess
    import sys

    code = ("import sys, dali_lens, dali_lens.data.io; heavy = {'torch', 'nvidia.dali'} & set(sys.modules); "
            "assert not heavy, heavy; dali_lens.build_loader; assert 'torch' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
