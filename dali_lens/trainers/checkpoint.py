"""What a checkpoint holds: one writer, one reader, a version (after timm's ``checkpoint_saver``/``_helpers``).

:class:`Checkpoint` is what ``best.pt``/``last.pt`` hold: the members' states (``members.member_state``), the
run's config, where training stands (epoch, best score, history, the loader's mid-epoch state), the band count,
and :class:`PixelSettings`, the loader's pixel options. ``PixelSettings`` is the one source of those options for
training, ``predict``, ``evaluate`` and the benchmarks: the trainer measures them on the training set and
stores them; the others read them back. :meth:`PixelOptions.pixel_fields` turns them into
:class:`~dali_lens.pipelines.LoaderOptions` fields.

Versions (``version`` in the file):

* 1 (no ``version`` key; dali-lens before #16): the pixel settings are spread over ``config`` (scaling,
  ``scale_a``, mask value, mask channel, resize mode, HDUs), ``norm`` (mean, std, noise estimate) and ``kind``.
* 2: ``version`` and ``pixels`` (``PixelSettings`` as a dict). ``norm`` and ``kind`` are still written, so that
  dali-lens before #16 reads these files the same way.

:meth:`Checkpoint.load` reads both, and refuses a newer version with a message naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from ..data.dataset import parse_hdus
from ..data.io import atomic_save_torch
from ..pipelines.options import PixelOptions

VERSION = 2

__all__ = ["VERSION", "CheckpointError", "PixelSettings", "Checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or inconsistent; the message names the file."""


def _floats(v) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


def _mask(value) -> float | None:
    """A config's mask value; ``auto`` that no trainer resolved (a config built by hand) masks nothing."""
    return None if value in (None, "auto", "none") else float(value)


@dataclass
class PixelSettings(PixelOptions):
    """How the loader turns a file's pixels into a model's input (the fields of ``PixelOptions``; see
    ``LoaderOptions`` for each step), and what they were measured on.

    ``kind`` is the pixel kind of the training data (``Dataset.pixel_kind``); ``hdus`` the FITS HDUs read,
    one per band (None: every image HDU). The loader's output dtype is not one of them: training and
    inference choose it for themselves (8-bit images stay uint8 until they reach the model's device).
    """

    kind: str = "image"
    hdus: tuple[int | str, ...] | None = None

    def __post_init__(self) -> None:
        self.noise_sigma, self.mean, self.std = (_floats(v) for v in (self.noise_sigma, self.mean, self.std))
        self.scale_a = float(self.scale_a)
        self.mask_value = None if self.mask_value is None else float(self.mask_value)
        self.mask_channel = bool(self.mask_channel)
        self.hdus = parse_hdus(self.hdus)

    @classmethod
    def from_config(cls, cfg, kind: str) -> "PixelSettings":
        """The settings a :class:`TrainConfig` asks for (``mask_value`` already resolved), before the noise
        estimate and the statistics measured on the training set are added (``dataclasses.replace``)."""
        return cls(kind=kind, scaling=cfg.scaling, scale_a=cfg.scale_a, mask_value=_mask(cfg.mask_value),
                   mask_channel=cfg.mask_channel, resize_mode=cfg.resize_mode, hdus=cfg.hdu_list)

    def for_inference(self) -> "PixelSettings":
        """As a stored checkpoint is read: ``scaling='auto'`` without a noise estimate (8-bit images, which are
        never scaled, or a config nobody resolved) means no scaling."""
        if self.scaling == "auto" and not self.noise_sigma:
            return dataclasses.replace(self, scaling="none")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_v1(cls, state: dict) -> "PixelSettings":
        """The settings of a version-1 checkpoint: its ``config``, ``norm`` and ``kind``."""
        cfg, norm = state.get("config") or {}, state.get("norm") or {}
        return cls(kind=state.get("kind", "image"), scaling=cfg.get("scaling", "none"),
                   scale_a=cfg.get("scale_a", 1.0), noise_sigma=norm.get("noise_sigma"),
                   mask_value=_mask(cfg.get("mask_value")),
                   mask_channel=cfg.get("mask_channel", False), resize_mode=cfg.get("resize_mode", "resize"),
                   mean=norm.get("mean"), std=norm.get("std"), hdus=cfg.get("hdus"))


@dataclass
class Checkpoint:
    """The content of ``best.pt``/``last.pt``. ``members``: one ``members.member_state`` dict per member."""

    members: list[dict]
    bands: int
    pixels: PixelSettings
    config: dict = field(default_factory=dict)
    epoch: int = 0
    best_auc: float = float("-inf")
    bad_epochs: int = 0
    history: list = field(default_factory=list)
    loader: dict | None = None
    progress: dict | None = None  # mid-epoch: the epoch's steps and loss sums so far (trainers.loop.train_epoch)
    version: int = VERSION

    def to_dict(self) -> dict:
        p = self.pixels
        return {"version": VERSION, "members": self.members, "epoch": self.epoch, "best_auc": self.best_auc,
                "bad_epochs": self.bad_epochs, "history": self.history, "loader": self.loader,
                "progress": self.progress,
                "config": self.config, "bands": self.bands, "pixels": p.to_dict(),
                # version 1's keys, for dali-lens before #16
                "norm": {"mean": p.mean, "std": p.std, "noise_sigma": p.noise_sigma}, "kind": p.kind}

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a checkpoint is never left half-written."""
        atomic_save_torch(self.to_dict(), path)

    @classmethod
    def from_dict(cls, state, path: str = "checkpoint") -> "Checkpoint":
        """Check and read a loaded checkpoint of any known version; ``path`` names it in errors."""
        if not isinstance(state, dict) or not isinstance(state.get("members"), list) or not state["members"]:
            raise CheckpointError(f"{path}: not a dali-lens training checkpoint (no 'members' list)")
        version = state.get("version", 1)
        if not isinstance(version, int) or version > VERSION:
            raise CheckpointError(f"{path}: checkpoint version {version!r} was written by a newer dali-lens (this "
                                  f"one reads versions up to {VERSION}); upgrade dali-lens to use it")
        for ms in state["members"]:
            if not isinstance(ms, dict) or "spec" not in ms or "model" not in ms:
                raise CheckpointError(f"{path}: not a dali-lens training checkpoint (a member without spec/weights)")
        if "bands" not in state:
            raise CheckpointError(f"{path}: checkpoint does not record the number of bands")
        if version >= 2 and not isinstance(state.get("pixels"), dict):
            raise CheckpointError(f"{path}: checkpoint version {version} without its pixel settings")
        pixels = PixelSettings(**state["pixels"]) if version >= 2 else PixelSettings.from_v1(state)
        return cls(members=state["members"], bands=int(state["bands"]), pixels=pixels,
                   config=state.get("config") or {}, epoch=state.get("epoch", 0),
                   best_auc=state.get("best_auc", float("-inf")), bad_epochs=state.get("bad_epochs", 0),
                   history=state.get("history", []), loader=state.get("loader"),
                   progress=state.get("progress"), version=version)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "Checkpoint":
        """Read ``path``; a :class:`CheckpointError` naming it when it is empty, unreadable, not a dali-lens
        checkpoint or from a newer dali-lens."""
        path = os.fspath(path)
        if os.path.getsize(path) == 0:
            raise CheckpointError(f"{path}: empty checkpoint file (0 bytes)")
        try:
            state = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:  # corrupt, truncated, not a torch file
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({detail[:200]})") from None
        return cls.from_dict(state, path)
