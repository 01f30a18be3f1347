"""Single-scale trainer: one model at ``--img-size``."""
from __future__ import annotations

from .base import Trainer
from ..checkpoint import MemberSpec


class SingleTrainer(Trainer):
    def member_specs(self, cfg) -> list[MemberSpec]:
        return [MemberSpec(cfg.arch, (cfg.img_size,), cfg.seed)]


TRAINER = SingleTrainer()
