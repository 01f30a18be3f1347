"""What a checkpoint holds: one writer, one reader, a version (after timm's ``checkpoint_saver``/``_helpers``).

A neutral module: the trainers write checkpoints, ``inference`` (predict, evaluate) and the trainers' ``--resume``
read them, and none of them imports another's package for it.

:class:`Checkpoint` is what ``best.pt``/``last.pt`` hold: the members' states (:class:`MemberState`: a
:class:`MemberSpec`, the weights, the optimizer's, scheduler's and grad scaler's states and the temperature), the
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

Either version holds tensors and plain data only (dicts, lists, tuples, strings, bytes, numbers, booleans, None:
DALI's loader checkpoint is bytes), and
is read with ``weights_only=True`` (``data.io.load_torch_plain``): a file that holds any other object is refused
by name, and nothing in it runs. :meth:`Checkpoint.to_dict` writes plain data only (numpy scalars become
Python numbers; any other object is a ``TypeError`` before anything is written).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from .data.dataset import parse_hdus
from .data.io import atomic_save_torch, load_torch_plain
from .pipelines.options import LoaderOptions, PixelOptions

VERSION = 2

__all__ = ["VERSION", "CheckpointError", "MemberSpec", "MemberState", "PixelSettings", "Checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or inconsistent; the message names the file."""


@dataclass
class MemberSpec:
    """``arch`` at ``scales`` (the first scale is its main one), seeded with ``seed``; ``name`` (default
    ``ARCH@SCALE[-SCALE...]#SEED``) is computed here, once, for training and inference alike."""

    arch: str
    scales: tuple[int, ...]
    seed: int = 0
    name: str = ""

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        if not self.name:
            self.name = f"{self.arch}@{'-'.join(map(str, self.scales))}#{self.seed}"

    @classmethod
    def parse(cls, text: str) -> "MemberSpec":
        """``ARCH:SCALE[:SEED]``, e.g. ``resnet18:112:1``."""
        parts = text.strip().split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"ensemble member {text!r}: expected ARCH:SCALE[:SEED], e.g. resnet18:112:1")
        return cls(parts[0], (int(parts[1]),), int(parts[2]) if len(parts) == 3 else 0)

    def to_dict(self) -> dict:
        return {"arch": self.arch, "scales": self.scales, "seed": self.seed, "name": self.name}

    @classmethod
    def from_dict(cls, d: dict) -> "MemberSpec":
        """A spec as a checkpoint stores it; ValueError when it has no valid arch/scales (or seed)."""
        try:
            return cls(str(d["arch"]), tuple(int(s) for s in d["scales"]), int(d.get("seed", 0)),
                       str(d.get("name") or ""))
        except (KeyError, TypeError, ValueError):
            raise ValueError("a member has no valid arch/scales in its spec") from None


@dataclass
class MemberState:
    """What a checkpoint keeps of one member: its spec, its weights (a state dict), the optimizer's, scheduler's
    and grad scaler's states (None: not kept; ``--resume`` needs the first two) and its temperature.

    On disk it is a plain dict with these keys (:meth:`to_dict`; ``optimizer``/``scheduler`` left out when None).
    Checkpoints before #23 also hold a ``history`` list per member, always empty (the run's history is
    ``Checkpoint.history``); it is ignored when read."""

    spec: MemberSpec
    model: dict
    optimizer: dict | None = None
    scheduler: dict | None = None
    scaler: dict | None = None
    temperature: float = 1.0

    def to_dict(self) -> dict:
        d = {"spec": self.spec.to_dict(), "model": self.model}
        d.update({k: v for k, v in (("optimizer", self.optimizer), ("scheduler", self.scheduler)) if v is not None})
        return {**d, "scaler": self.scaler, "temperature": self.temperature}

    @classmethod
    def from_dict(cls, d: dict) -> "MemberState":
        """A member as a checkpoint stores it (types checked by ``Checkpoint.from_dict``); a missing or null
        temperature is 1."""
        spec = d["spec"] if isinstance(d["spec"], MemberSpec) else MemberSpec.from_dict(d["spec"])
        return cls(spec=spec, model=d["model"], optimizer=d.get("optimizer"), scheduler=d.get("scheduler"),
                   scaler=d.get("scaler"), temperature=float(d.get("temperature") or 1.0))


def _floats(v) -> tuple[float, ...] | None:
    return None if v is None else tuple(float(x) for x in v)


def _mask(value) -> float | None:
    """A config's mask value; ``auto`` that no trainer resolved (a config built by hand) masks nothing."""
    return None if value in (None, "auto", "none") else float(value)


def _plain(value, where: str = "checkpoint"):
    """``value`` as the plain data a ``weights_only`` load reads back: dicts, lists, tuples, strings, bytes,
    numbers, booleans, None, tensors (and ``torch.dtype``/``torch.device``). numpy scalars and arrays become Python
    numbers and tensors, enums their values, subclasses of the plain types (``OrderedDict``, ``torch.Size``, named
    tuples) the plain types. Anything else is a ``TypeError`` naming where it is."""
    import enum

    import numpy as np

    if value is None or isinstance(value, (torch.Tensor, torch.dtype, torch.device)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, where)
    if isinstance(value, np.generic):
        return _plain(value.item(), where)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    for plain in (bool, int, float, str, bytes):  # (bool first: it is an int)
        if isinstance(value, plain):
            return plain(value)
    if isinstance(value, dict):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    raise TypeError(f"{where}: {type(value).__module__}.{type(value).__qualname__} is not plain data, which "
                    "checkpoints are limited to")


def _count(v, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shape_problem(state: dict) -> str | None:
    """What is wrong with the types of a loaded checkpoint's entries (None: nothing), so that a crafted or
    damaged file stops with one line naming it instead of failing deep inside predict or ``--resume``."""
    for i, ms in enumerate(state["members"]):
        where = f"member {i}"
        if not isinstance(ms["spec"], dict):
            return f"{where}: spec is not a dict"
        model = ms["model"]
        if not isinstance(model, dict):
            return f"{where}: weights are not a state dict"
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()):
            return f"{where}: weights hold entries other than named tensors"
        for key in ("optimizer", "scheduler"):
            if key in ms and not isinstance(ms[key], dict):
                return f"{where}: {key} state is not a dict"
        if ms.get("scaler") is not None and not isinstance(ms["scaler"], dict):
            return f"{where}: scaler state is not a dict"
        if ms.get("temperature") is not None and not _number(ms["temperature"]):
            return f"{where}: temperature is not a number"
        if not isinstance(ms.get("history", []), list):
            return f"{where}: history is not a list"
    if not _count(state["bands"], 1):
        return f"bands = {state['bands']!r}, not a positive integer"
    config = state.get("config") or {}
    if not isinstance(config, dict):
        return "config is not a dict"
    def text(v): return isinstance(v, str)
    def flag(v): return isinstance(v, bool)
    def integer(v): return _count(v, -2**63)

    for key, ok in (("val_fraction", _number), ("seed", integer), ("channels_last", flag), ("trainer", text),
                    ("fusion", text), ("stem", text), ("amp", text)):  # (what predict and evaluate read from it)
        if config.get(key) is not None and not ok(config[key]):
            return f"config {key} = {config[key]!r}"
    for key in ("epoch", "bad_epochs"):
        if not _count(state.get(key, 0)):
            return f"{key} = {state[key]!r}, not a count"
    if not _number(state.get("best_auc", 0.0)):
        return "best_auc is not a number"
    history = state.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        return "history is not a list of epochs"
    loader = state.get("loader")
    if loader is not None:
        if not isinstance(loader, dict) or not _count(loader.get("epoch")) or \
                not _count(loader.get("batches_done", 0)) or not isinstance(loader.get("dali", ""), (str, bytes)):
            return "the loader's position is not an epoch, a step count and a DALI checkpoint"
    progress = state.get("progress")
    if progress is not None:
        sums = progress.get("loss_sums") if isinstance(progress, dict) else None
        if not _count(progress.get("steps") if isinstance(progress, dict) else None) or not isinstance(sums, dict) \
                or not all(isinstance(k, str) and _number(v) for k, v in sums.items()):
            return "the epoch's progress is not a step count and per-member loss sums"
    return None


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
                   mask_channel=cfg.mask_channel, resize_mode=cfg.resize_mode, hdus=cfg.hdus)

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
    """The content of ``best.pt``/``last.pt``. ``members``: one :class:`MemberState` per member (plain dicts
    in their on-disk form are read as such)."""

    members: list[MemberState]
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

    def __post_init__(self) -> None:
        self.members = [m if isinstance(m, MemberState) else MemberState.from_dict(m) for m in self.members]

    def to_dict(self) -> dict:
        p = self.pixels
        return _plain({"version": VERSION, "members": [m.to_dict() for m in self.members], "epoch": self.epoch,
                       "best_auc": self.best_auc, "bad_epochs": self.bad_epochs, "history": self.history, "loader": self.loader,
                       "progress": self.progress,
                       "config": self.config, "bands": self.bands, "pixels": p.to_dict(),
                       # version 1's keys, for dali-lens before #16
                       "norm": {"mean": p.mean, "std": p.std, "noise_sigma": p.noise_sigma}, "kind": p.kind})

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a checkpoint is never left half-written."""
        atomic_save_torch(self.to_dict(), path)

    @classmethod
    def from_dict(cls, state, path: str = "checkpoint") -> "Checkpoint":
        """Check and read a loaded checkpoint of any known version; ``path`` names it in errors."""
        if not isinstance(state, dict) or not isinstance(state.get("members"), list) or not state["members"]:
            raise CheckpointError(f"{path}: not a dali-lens training checkpoint (no 'members' list)")
        version = state.get("version", 1)
        if not _count(version, 1):
            raise CheckpointError(f"{path}: not a valid dali-lens checkpoint (version {version!r})")
        if version > VERSION:
            raise CheckpointError(f"{path}: checkpoint version {version!r} was written by a newer dali-lens (this "
                                  f"one reads versions up to {VERSION}); upgrade dali-lens to use it")
        for ms in state["members"]:
            if not isinstance(ms, dict) or "spec" not in ms or "model" not in ms:
                raise CheckpointError(f"{path}: not a dali-lens training checkpoint (a member without spec/weights)")
        if "bands" not in state:
            raise CheckpointError(f"{path}: checkpoint does not record the number of bands")
        if version >= 2 and not isinstance(state.get("pixels"), dict):
            raise CheckpointError(f"{path}: checkpoint version {version} without its pixel settings")
        problem = _shape_problem(state)
        if problem:
            raise CheckpointError(f"{path}: not a valid dali-lens checkpoint ({problem})")
        try:
            members = [MemberState.from_dict(ms) for ms in state["members"]]
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        try:
            pixels = PixelSettings(**state["pixels"]) if version >= 2 else PixelSettings.from_v1(state)
            LoaderOptions(**pixels.for_inference().pixel_fields())  # (the loader's own checks of each setting)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{path}: not a valid dali-lens checkpoint (pixel settings: "
                                  f"{str(exc).strip()[:200]})") from None
        return cls(members=members, bands=state["bands"], pixels=pixels,
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
            state = load_torch_plain(path, map_location)  # tensors and plain data only: nothing in the file runs
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        return cls.from_dict(state, path)
