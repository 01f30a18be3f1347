"""``inspect --injected N`` (issue 25): a run's simulated arcs on the data's own backgrounds, next to the same
backgrounds bare and to the data's real lenses, in one gallery, so a user can judge whether the arcs look real.

The run is found from PREDICTIONS: its folder's ``config.json`` (written by ``train --inject``) holds the
injection options and record (the noise the S/N refers to, the PSF). The arcs are the loaders' own
(``pipelines.injecting.Injector.paint``, native pixels, data units), drawn at probability 1 with the run's
seed, epoch 0, so that every shown background gets one; tiles are captioned with θE, S/N and magnification.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np

from ..data.dataset import DataError
from .candidates import Candidate


def run_config(predictions: str) -> dict:
    """The config.json of the run that wrote ``predictions`` (or of the run directory / checkpoint given)."""
    path = os.path.abspath(os.path.expanduser(predictions))
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_path = os.path.join(folder, "config.json")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"--injected: {cfg_path}: cannot read the run's config.json ({exc})") from None
    if not isinstance(config, dict) or not config.get("injection") or not float(config.get("inject") or 0) > 0:
        raise DataError(f"--injected: {cfg_path}: the run was not trained with --inject (no injection record)")
    return config


def injected_tiles(predictions: str, data: str, n: int) -> dict:
    """The tiles of ``inspect --injected N``: ``n`` injected backgrounds of ``data``'s training split, the same
    backgrounds without the arc, and ``n`` real lenses (rows of up to 10 of each): ``{"cands", "thumbs",
    "title", "columns", "injected", "lenses"}`` (written by ``inspection.show_injected``)."""
    import dataclasses

    import torch

    from ..pipelines.injecting import Injector, discover_backgrounds, settings_from_config
    from .composite import default_rgb_bands, thumbnail

    config = run_config(predictions)
    hdus = tuple(config["hdus"]) if config.get("hdus") else None
    train = discover_backgrounds(data, hdus=hdus, val_fraction=float(config.get("val_fraction", 0.15)),
                                 seed=int(config.get("seed") or 0))["train"]
    labels = np.asarray(train.labels)
    rng = np.random.default_rng([int(config.get("seed") or 0), 0x1a7])
    back = rng.permutation(np.flatnonzero(labels != 1))[:n]
    lenses = rng.permutation(np.flatnonzero(labels == 1))[:n]
    settings = dataclasses.replace(settings_from_config({**config, "injection_psf": config["injection"].get("psf")},
                                                        bands=len(config["injection"]["noise"])), probability=1.0)
    injector = Injector(settings, config["injection"]["noise"], fixed_epoch=0, mask_value=config.get("mask_value")
                        if isinstance(config.get("mask_value"), (int, float)) else None, eight_bit=train.eight_bit)
    from ..data.readers import read_sample

    raw = [read_sample(train.samples[i], train, check=False) for i in back]
    bands = default_rgb_bands(train)
    tiles: list[tuple[Candidate, np.ndarray]] = []
    injected, bare = [], []
    if len(back):
        x = torch.from_numpy(np.stack([r.astype(np.float32) for r in raw]))
        idx = torch.as_tensor(back, dtype=torch.long)
        painted, _ = injector.paint(x, idx, 0, torch.ones(len(back), dtype=torch.bool))
        _, _, cat = injector.arcs(idx, 0, x.shape[-1])
        for j, i in enumerate(back):
            s = train.samples[i]
            te, snr, mu = (float(cat[k][j]) if k in cat else math.nan for k in ("theta_e", "snr", "magnification"))
            arr = painted[j].numpy().astype(np.uint8) if train.eight_bit else painted[j].numpy()
            injected.append((Candidate(f"θE{te:.2f}\" S/N{snr:.0f} μ{mu:.1f}", math.nan, s.path, 1,
                                       sample=s, dataset=train), thumbnail(arr, train.pixel_kind, bands)))
            bare.append((Candidate(f"{s.id} (bare)", math.nan, s.path, 0, sample=s, dataset=train),
                         thumbnail(raw[j], train.pixel_kind, bands)))
    real = [(Candidate(f"{train.samples[i].id} (real lens)", math.nan, train.samples[i].path, 1,
                       sample=train.samples[i], dataset=train),
             thumbnail(read_sample(train.samples[i], train, check=False), train.pixel_kind, bands)) for i in lenses]
    cols = max(1, min(10, max(len(injected), len(real))))  # one row each: injected, the same bare, real lenses
    for lo in range(0, max(len(injected), len(real)), cols):
        for part in (injected, bare, real):
            tiles += part[lo:lo + cols]
    if not tiles:
        raise DataError(f"--injected: {data}: no training cutouts to show")
    cands, thumbs = [c for c, _ in tiles], [t for _, t in tiles]
    title = (f"{len(injected)} injected arcs (the run's --inject settings), the same cutouts bare, "
             f"{len(real)} real lenses")
    return {"cands": cands, "thumbs": thumbs, "title": title, "columns": cols, "injected": len(injected),
            "lenses": len(real)}
