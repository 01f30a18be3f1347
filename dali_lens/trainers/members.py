"""A *member* is one model being trained on one or more input scales.

The single-scale trainer trains one member on one scale, the multi-scale trainer one member on several
scales, the ensemble trainer several members each on its own scale. All of them read one loader that
produces the union of the scales from a single decode. What tells the trainers apart is ``base.Trainer``.
What a member is (``MemberSpec``) and what a checkpoint keeps of it (``MemberState``) live in the neutral
``dali_lens.checkpoint``, which inference reads too.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..checkpoint import MemberSpec, MemberState
from ..models import build_model
from ..scoring import channels_last_on


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


def member_state(m: Member) -> MemberState:
    """What a checkpoint keeps of a member."""
    return MemberState(spec=m.spec, model=m.core.state_dict(), optimizer=m.optimizer.state_dict(),
                       scheduler=m.scheduler.state_dict(), scaler=m.scaler.state_dict() if m.scaler else None,
                       temperature=m.temperature)


def load_member_state(m: Member, state: MemberState, weights_only: bool = False) -> None:
    """``state`` into ``m``: the weights and temperature, and (unless ``weights_only``) the optimizer's,
    scheduler's and grad scaler's states; ValueError when a state ``--resume`` needs is not kept."""
    m.core.load_state_dict(state.model)
    m.temperature = state.temperature
    if weights_only:
        return
    if state.optimizer is None or state.scheduler is None:
        raise ValueError("the checkpoint keeps no optimizer/scheduler state to resume from")
    m.optimizer.load_state_dict(state.optimizer)
    # the step reached, on this run's schedule: what depends on the run's length (OneCycleLR's total and phases)
    # stays as built for the current --epochs, so a longer resumed run stretches the schedule
    fresh = m.scheduler.state_dict()
    m.scheduler.load_state_dict({**state.scheduler,
                                 **{k: fresh[k] for k in ("total_steps", "_schedule_phases") if k in fresh}})
    with warnings.catch_warnings():  # (get_lr outside step() warns; this is the value step() set at that step)
        warnings.simplefilter("ignore")
        try:
            lrs = m.scheduler.get_lr()
        except ValueError:  # past the end of a shortened schedule: no step is left to take
            lrs = []
    for group, lr in zip(m.optimizer.param_groups, lrs):
        group["lr"] = lr
    if m.scaler is not None and state.scaler:
        m.scaler.load_state_dict(state.scaler)
