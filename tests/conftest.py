"""Shared fixtures: small datasets written to disk by the tests themselves."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch


def _gpu_dali() -> bool:
    from dali_lens.pipelines import dali_backend

    return torch.cuda.is_available() and dali_backend.available()


# The DALI backends under test: the CPU one everywhere, the GPU one (the same pipeline code on the device)
# where CUDA and DALI are present. `python -m benchmarks.gpu_check` runs the GPU cases and records them.
DALI_BACKENDS = ["dali-cpu"] + (["dali"] if _gpu_dali() else [])
BACKENDS = DALI_BACKENDS + ["torchvision"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (skipped unless -m slow)")


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def smooth_images(n: int, size: int, bands: int, seed: int) -> np.ndarray:
    """(n, bands, size, size) float in [0, 1]: blurred blobs, so that resampling differences stay small."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, bands, size, size), np.float32)
    for i in range(n):
        cx, cy = rng.uniform(0.3, 0.7, 2) * size
        for b in range(bands):
            w = size * rng.uniform(0.08, 0.2)
            out[i, b] = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * w * w)) * rng.uniform(0.5, 1.0)
    return out


def write_dataset(root: str, fmt: str, n_per_class: int = 12, size: int = 40, bands: int = 3, seed: int = 0,
                  splits=("train", "test")) -> str:
    """Folder layout root/<split>/<lens|nonlens>/<name>.<fmt> with smooth images."""
    from PIL import Image

    k = 0
    for split in splits:
        for cls in ("lens", "nonlens"):
            d = os.path.join(root, split, cls)
            os.makedirs(d, exist_ok=True)
            imgs = smooth_images(n_per_class, size, bands, seed + k)
            k += 1
            for i, x in enumerate(imgs):
                p = os.path.join(d, f"{cls}{i:03d}")
                if fmt in ("png", "jpeg"):
                    arr = (x * 255).round().astype(np.uint8)
                    im = Image.fromarray(arr[0] if bands == 1 else arr.transpose(1, 2, 0))
                    im.save(p + (".png" if fmt == "png" else ".jpg"), quality=95)
                elif fmt == "npy":
                    np.save(p + ".npy", x * 1000.0)
                elif fmt == "fits":
                    from astropy.io import fits

                    hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(x[b] * 1000.0, name=f"B{b}") for b in range(bands)]
                    fits.HDUList(hdus).writeto(p + ".fits")
    return root


@pytest.fixture
def make_dataset(tmp_path):
    def make(fmt="png", **kw):
        return write_dataset(str(tmp_path / f"data-{fmt}-{kw.get('bands', 3)}"), fmt, **kw)
    return make


def collect(loader):
    """All batches of one epoch: (indices in the order yielded, labels, {scale: images}), the labels and
    images ordered by sample index."""
    idx, lab, imgs = [], [], {}
    for b in loader:
        idx.append(b["index"].cpu())
        lab.append(b["label"].cpu())
        for s, t in b["image"].items():
            imgs.setdefault(s, []).append(t.cpu())
    idx = torch.cat(idx)
    order = idx.argsort()
    return idx, torch.cat(lab)[order], {s: torch.cat(v)[order] for s, v in imgs.items()}


def resume_after(make_loader, k: int):
    """Run epoch 0 of ``make_loader()`` in full, then ``k`` batches of epoch 1; return those batches' indices,
    the loader's state at that point, and the indices a fresh loader restored from that state yields."""
    run = make_loader()
    list(run)  # epoch 0
    it = iter(run)
    head = [next(it)["index"].tolist() for _ in range(k)]
    state = run.state_dict()
    resumed = make_loader()
    resumed.load_state_dict(state)
    return head, state, [b["index"].tolist() for b in resumed]


def command_module(name: str):
    """The module holding ``python -m dali_lens.<name>``'s ``main`` and parser: ``dali_lens.commands.<name>``
    for the commands whose names are also library functions (train, predict: their ``dali_lens.<name>`` is a
    ``python -m`` shim), ``dali_lens.<name>`` for the others."""
    import importlib
    import importlib.util

    where = f"dali_lens.commands.{name}"
    return importlib.import_module(where if importlib.util.find_spec(where) else f"dali_lens.{name}")
