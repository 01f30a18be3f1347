"""Single-scale trainer: one model at ``--img-size``."""
from __future__ import annotations

from .members import MemberSpec, Trainer


def member_specs(cfg) -> list[MemberSpec]:
    return [MemberSpec(cfg.arch, (cfg.img_size,), cfg.seed)]


def active_scales(cfg, epoch: int) -> tuple[int, ...]:
    return (cfg.img_size,)


TRAINER = Trainer(member_specs, active_scales)
