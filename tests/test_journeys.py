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
import sys

import numpy as np
import pytest
import torch

import dali_lens
from dali_lens.data.synthetic import generate_dataset
from dali_lens.pipelines import build_loader, compute_stats

from conftest import BACKENDS, write_dataset

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
