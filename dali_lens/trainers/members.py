"""A *member* is one model being trained on one or more input scales.

The single-scale trainer trains one member on one scale, the multi-scale trainer one member on several
scales, the ensemble trainer several members each on its own scale. All of them read one loader that
produces the union of the scales from a single decode. What tells the trainers apart is ``base.Trainer``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..models import build_model
from ..scoring import channels_last_on


@dataclass
class MemberSpec:
    """``arch`` at ``scales`` (the first scale is its main one), seeded with ``seed``."""

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


@dataclass
class Member:
    spec: MemberSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    temperature: float = 1.0
    saved_bytes: dict = field(default_factory=dict)  # --memory-budget: bytes kept for backward per sample, by scale

    @property
    def core(self) -> torch.nn.Module:
        """The model without a DistributedDataParallel wrapper."""
        return getattr(self.model, "module", self.model)


def make_member(spec: MemberSpec, in_chans: int, cfg, steps_per_epoch: int, device: torch.device,
                distributed: bool = False) -> Member:
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, in_chans=in_chans, img_size=max(spec.scales), weights=cfg.weights,
                        stem=getattr(cfg, "stem", "auto")).to(device)
    if channels_last_on(device, cfg.channels_last):
        model = model.to(memory_format=torch.channels_last)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, steps_per_epoch * cfg.epochs)
    if cfg.lr_schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
    else:
        warm = min(total // 10, 500)

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp_dtype(device) == torch.float16 else None
    return Member(spec, model, opt, sched, scaler)


def member_state(m: Member) -> dict:
    """What a checkpoint keeps of a member. (Checkpoints before #23 also hold a ``history`` list per member,
    always empty: the run's history is ``Checkpoint.history``; it is ignored when read.)"""
    return {"spec": vars(m.spec).copy(), "model": m.core.state_dict(), "optimizer": m.optimizer.state_dict(),
            "scheduler": m.scheduler.state_dict(), "scaler": m.scaler.state_dict() if m.scaler else None,
            "temperature": m.temperature}


def load_member_state(m: Member, state: dict, weights_only: bool = False) -> None:
    m.core.load_state_dict(state["model"])
    m.temperature = float(state.get("temperature", 1.0))
    if weights_only:
        return
    m.optimizer.load_state_dict(state["optimizer"])
    # the step reached, on this run's schedule: what depends on the run's length (OneCycleLR's total and phases)
    # stays as built for the current --epochs, so a longer resumed run stretches the schedule
    fresh = m.scheduler.state_dict()
    m.scheduler.load_state_dict({**state["scheduler"],
                                 **{k: fresh[k] for k in ("total_steps", "_schedule_phases") if k in fresh}})
    with warnings.catch_warnings():  # (get_lr outside step() warns; this is the value step() set at that step)
        warnings.simplefilter("ignore")
        try:
            lrs = m.scheduler.get_lr()
        except ValueError:  # past the end of a shortened schedule: no step is left to take
            lrs = []
    for group, lr in zip(m.optimizer.param_groups, lrs):
        group["lr"] = lr
    if m.scaler is not None and state.get("scaler"):
        m.scaler.load_state_dict(state["scaler"])
