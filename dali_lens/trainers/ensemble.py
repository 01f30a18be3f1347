"""Ensemble trainer: members differing in architecture, input scale or seed, trained side by side.

One loader decodes each image once and produces every member's scale; each member has its own optimizer.
Fusion at evaluation: mean probability, mean logit, or temperature-scaled logits (fitted on validation).
"""
from __future__ import annotations

from .members import MemberSpec, Trainer


def member_specs(cfg) -> list[MemberSpec]:
    specs = [MemberSpec.parse(t) for t in str(cfg.members).split(",") if t.strip()]
    if len(specs) < 2:
        raise ValueError(f"--trainer ensemble needs at least two --members, got {cfg.members!r}")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"ensemble members must differ (architecture, scale or seed): {names}")
    return specs


def active_scales(cfg, epoch: int) -> tuple[int, ...]:
    return tuple(sorted({s.scales[0] for s in member_specs(cfg)}))


TRAINER = Trainer(member_specs, active_scales)
